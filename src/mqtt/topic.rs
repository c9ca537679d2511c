//! MQTT topic names and filters, as pure functions: what is valid, what a
//! filter matches, and whether one filter only ever matches what another
//! allows. Used wherever a topic comes from outside (a broker login's
//! permissions, an MQTT 5 Response Topic, a relay command's topic) and must
//! stay inside what the configuration allows.

/// Why `filter` is not a valid MQTT topic filter (`+` and `#` only as whole
/// levels, `#` last), if it is not.
pub fn valid_filter(filter: &str) -> Result<(), &'static str> {
    if filter.is_empty() {
        return Err("it is empty");
    }
    if filter.contains('\0') {
        return Err("it contains a NUL character");
    }
    let levels: Vec<&str> = filter.split('/').collect();
    for (i, level) in levels.iter().enumerate() {
        if level.contains('#') && (*level != "#" || i + 1 != levels.len()) {
            return Err("`#` must be a whole level, and the last one");
        }
        if level.contains('+') && *level != "+" {
            return Err("`+` must be a whole level");
        }
    }
    Ok(())
}

/// Whether `topic` is a topic name one may publish to (no wildcards).
pub fn valid_topic(topic: &str) -> bool {
    !topic.is_empty() && !topic.contains(['+', '#', '\0'])
}

/// Whether `filter` matches the topic name `topic`. Like a broker, a filter
/// starting with a wildcard does not match topics starting with `$`.
pub fn matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Whether every topic `inner` can match is also matched by `outer`: a
/// subscription to `inner` stays within what `outer` allows.
fn covers(outer: &str, inner: &str) -> bool {
    if inner.starts_with('$') && outer.starts_with(['+', '#']) {
        return false; // a leading wildcard never reaches `$` topics
    }
    let mut o = outer.split('/');
    let mut i = inner.split('/');
    loop {
        match (o.next(), i.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(l)) if l != "#" => {}
            (Some(a), Some(b)) if a == b && b != "+" && b != "#" => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Whether any of `allowed` covers `filter`.
pub fn allowed_by(allowed: &[String], filter: &str) -> bool {
    allowed.iter().any(|a| covers(a, filter))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_take_wildcards_only_as_whole_levels() {
        for ok in ["a/b", "a/+/c", "a/#", "#", "+", "+/+", "$aws/things/+/shadow/#"] {
            assert_eq!(valid_filter(ok), Ok(()), "{ok}");
        }
        for bad in ["", "a/b#", "a/#/c", "a+/b", "a/\0"] {
            assert!(valid_filter(bad).is_err(), "{bad:?}");
        }
        assert!(valid_topic("a/b") && !valid_topic("a/+") && !valid_topic("#") && !valid_topic(""));
    }

    #[test]
    fn a_filter_matches_topics_level_by_level() {
        assert!(matches("a/+/c", "a/b/c"));
        assert!(matches("a/#", "a"), "`#` also matches the parent level");
        assert!(matches("a/#", "a/b/c"));
        assert!(!matches("a/+", "a/b/c"));
        assert!(!matches("a/b", "a/b/c"));
        assert!(!matches("#", "$aws/things/x"), "wildcards never reach $ topics");
        assert!(matches("$aws/things/+/shadow/get", "$aws/things/x/shadow/get"));
    }

    #[test]
    fn a_filter_is_covered_only_when_everything_it_matches_is_allowed() {
        assert!(covers("site/#", "site/pump/rsp"));
        assert!(covers("site/#", "site/+/rsp"));
        assert!(covers("site/+/rsp", "site/pump/rsp"));
        assert!(covers("site/pump/rsp", "site/pump/rsp"));
        assert!(!covers("site/pump/rsp", "site/+/rsp"), "a wildcard reaches other pumps");
        assert!(!covers("site/+/rsp", "site/#"));
        assert!(!covers("site/+", "site/+/x"));
        assert!(!covers("#", "$aws/things/x/shadow/get"), "`#` never covers $ topics");
        assert!(covers("$aws/things/x/shadow/#", "$aws/things/x/shadow/get/accepted"));
        assert!(!covers("$aws/things/x/shadow/#", "$aws/things/+/shadow/get"));
        assert!(allowed_by(&["a/b".into(), "c/#".into()], "c/d"));
        assert!(!allowed_by(&[], "a"));
    }
}
