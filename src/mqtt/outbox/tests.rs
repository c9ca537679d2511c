use super::*;
use std::time::Duration;

const NO_LIMITS: Limits = Limits { max_messages: 1000, max_bytes: 1 << 30, max_age_ms: u64::MAX, max_payload: 1 << 20 };

fn entry(class: Class, n: u32) -> Entry {
    Entry::new(class, format!("t/{}", class.name()), Bytes::from(n.to_string()), false, None, 1000 + u64::from(n))
}

fn telemetry(n: u32) -> Entry {
    entry(Class::Telemetry, n)
}

/// Pushes and reports it stored at once, as the actor does after its commit.
fn push_stored(o: &mut Outbox, e: Entry) -> u64 {
    let pushed = o.push(e);
    if pushed.store {
        o.persisted(pushed.seq, true);
    }
    pushed.seq
}

fn send_all(o: &mut Outbox) -> Vec<Bytes> {
    let mut out = Vec::new();
    while let Next::Send(e) = o.next(Instant::now()) {
        out.push(e.payload.clone().expect("a sendable entry has its payload"));
        o.mark_sent(Instant::now());
    }
    out
}

#[test]
fn an_entry_is_sent_only_once_it_is_in_the_store() {
    let mut o = Outbox::new(NO_LIMITS, 10, 10);
    let pushed = o.push(telemetry(1));
    assert!(pushed.store);
    assert_eq!(o.next(Instant::now()), Next::Wait, "not on disk yet");
    o.persisted(pushed.seq, true);
    assert_eq!(send_all(&mut o), vec!["1"]);
}

#[test]
fn an_entry_the_store_could_not_take_is_still_sent() {
    let mut o = Outbox::new(NO_LIMITS, 10, 10);
    let pushed = o.push(telemetry(1));
    o.persisted(pushed.seq, false);
    assert_eq!(send_all(&mut o), vec!["1"]);
}

#[test]
fn volatile_entries_are_never_stored_and_go_at_once() {
    let mut o = Outbox::new(NO_LIMITS, 10, 10);
    let pushed = o.push(entry(Class::Volatile, 1));
    assert!(!pushed.store);
    assert_eq!(send_all(&mut o), vec!["1"]);
}

#[test]
fn order_is_kept_behind_an_entry_still_on_its_way_to_disk() {
    let mut o = Outbox::new(NO_LIMITS, 10, 10);
    let first = o.push(telemetry(1));
    o.push(entry(Class::Volatile, 2));
    assert_eq!(o.next(Instant::now()), Next::Wait, "the get waits for the report before it");
    o.persisted(first.seq, true);
    assert_eq!(send_all(&mut o), vec!["1", "2"]);
}

#[test]
fn an_entry_leaves_only_on_its_puback() {
    let mut o = Outbox::new(NO_LIMITS, 10, 10);
    push_stored(&mut o, telemetry(1));
    push_stored(&mut o, telemetry(2));
    send_all(&mut o);
    o.on_sent(7);
    o.on_sent(8);
    let (acked, stored) = o.on_puback(8).expect("known pkid");
    assert_eq!((acked.payload, stored), (Some(Bytes::from("2")), true));
    assert_eq!(o.len(), 1);
    o.on_puback(7);
    assert_eq!((o.len(), o.bytes()), (0, 0));
}

#[test]
fn a_reconnect_without_session_resends_everything_unacknowledged_in_order() {
    let mut o = Outbox::new(NO_LIMITS, 10, 10);
    for n in 1..=3 {
        push_stored(&mut o, telemetry(n));
    }
    send_all(&mut o);
    o.on_sent(1);
    o.on_sent(2);
    o.on_puback(1);
    push_stored(&mut o, telemetry(4));
    o.on_connected(false);
    assert_eq!(send_all(&mut o), vec!["2", "3", "4"]);
}

#[test]
fn a_lost_link_never_drops_an_entry_however_often_it_drops() {
    let mut o = Outbox::new(NO_LIMITS, 10, 10);
    push_stored(&mut o, entry(Class::Answer, 1));
    for attempt in 0..50 {
        assert_eq!(send_all(&mut o), vec!["1"], "attempt {attempt}");
        o.on_sent(1);
        assert!(o.on_connected(false).is_empty());
    }
    assert_eq!(o.len(), 1);
}

#[test]
fn a_resumed_session_leaves_resending_to_the_client() {
    let mut o = Outbox::new(NO_LIMITS, 10, 10);
    push_stored(&mut o, telemetry(1));
    send_all(&mut o);
    o.on_sent(1);
    o.on_connected(true);
    assert_eq!(o.next(Instant::now()), Next::Wait);
    o.on_sent(1); // rumqttc resends with the same id
    o.on_puback(1);
    assert_eq!(o.len(), 0);
}

#[test]
fn the_window_limits_what_is_in_flight() {
    let mut o = Outbox::new(NO_LIMITS, 2, 10);
    for n in 1..=3 {
        push_stored(&mut o, telemetry(n));
    }
    assert_eq!(send_all(&mut o).len(), 2);
    o.on_sent(1);
    o.on_puback(1);
    assert_eq!(send_all(&mut o), vec!["3"]);
}

#[test]
fn presence_goes_first_and_an_old_one_is_not_sent_on_a_new_connection() {
    let mut o = Outbox::new(NO_LIMITS, 10, 10);
    push_stored(&mut o, telemetry(1));
    o.push_front(entry(Class::Volatile, 9));
    let stale = o.on_connected(false);
    assert_eq!(stale.len(), 1, "the presence of the old connection");
    o.push_front(entry(Class::Volatile, 10));
    assert_eq!(send_all(&mut o), vec!["10", "1"]);
}

#[test]
fn a_full_outbox_drops_the_oldest_telemetry_first_and_answers_last() {
    let limits = Limits { max_messages: 4, ..NO_LIMITS };
    let mut o = Outbox::new(limits, 10, 10);
    push_stored(&mut o, entry(Class::Answer, 1));
    push_stored(&mut o, entry(Class::Telemetry, 2));
    push_stored(&mut o, entry(Class::Report, 3));
    push_stored(&mut o, entry(Class::Telemetry, 4));
    let pushed = o.push(entry(Class::Answer, 5));
    let reasons: Vec<(u64, DropReason)> = pushed.dropped.iter().map(|d| (d.seq, d.reason)).collect();
    assert_eq!(reasons, vec![(2, DropReason::Full)], "the oldest telemetry");
    o.persisted(pushed.seq, true);
    let pushed = o.push(entry(Class::Answer, 6));
    assert_eq!(pushed.dropped.iter().map(|d| d.seq).collect::<Vec<_>>(), vec![4], "then the other telemetry");
    o.persisted(pushed.seq, true);
    let pushed = o.push(entry(Class::Answer, 7));
    assert_eq!(pushed.dropped.iter().map(|d| (d.seq, d.class)).collect::<Vec<_>>(), vec![(3, Class::Report)], "then reports");
    o.persisted(pushed.seq, true);
    let pushed = o.push(entry(Class::Answer, 8));
    assert_eq!(pushed.dropped.iter().map(|d| d.seq).collect::<Vec<_>>(), vec![1], "answers last, oldest first");
    assert!(pushed.dropped.iter().all(|d| d.stored), "each is removed from the store too");
}

#[test]
fn telemetry_that_cannot_fit_beside_answers_is_itself_dropped_and_never_stored() {
    let limits = Limits { max_messages: 1, ..NO_LIMITS };
    let mut o = Outbox::new(limits, 10, 10);
    push_stored(&mut o, entry(Class::Answer, 1));
    let pushed = o.push(telemetry(2));
    assert!(!pushed.store);
    assert_eq!(pushed.dropped.iter().map(|d| d.seq).collect::<Vec<_>>(), vec![pushed.seq]);
}

#[test]
fn entries_in_flight_are_never_dropped_to_make_room() {
    let limits = Limits { max_messages: 2, ..NO_LIMITS };
    let mut o = Outbox::new(limits, 10, 10);
    push_stored(&mut o, telemetry(1));
    push_stored(&mut o, telemetry(2));
    send_all(&mut o);
    let pushed = o.push(telemetry(3));
    assert_eq!(pushed.dropped.iter().map(|d| d.seq).collect::<Vec<_>>(), vec![pushed.seq], "only the waiting one can go");
    assert_eq!(o.len(), 2);
}

#[test]
fn the_byte_bound_counts_payloads() {
    let limits = Limits { max_bytes: 3, ..NO_LIMITS };
    let mut o = Outbox::new(limits, 10, 10);
    push_stored(&mut o, telemetry(11));
    let pushed = o.push(telemetry(22));
    assert_eq!(pushed.dropped.iter().map(|d| d.seq).collect::<Vec<_>>(), vec![1]);
    assert_eq!(o.bytes(), 2);
}

#[test]
fn entries_older_than_max_age_are_dropped_and_reported() {
    let limits = Limits { max_age_ms: 100, ..NO_LIMITS };
    let mut o = Outbox::new(limits, 10, 10);
    push_stored(&mut o, telemetry(1)); // created at 1001
    push_stored(&mut o, telemetry(50)); // created at 1050
    let gone = o.expire(1120);
    assert_eq!(gone.iter().map(|d| (d.seq, d.reason)).collect::<Vec<_>>(), vec![(1, DropReason::Expired)]);
    assert_eq!(send_all(&mut o), vec!["50"]);
}

#[test]
fn a_message_larger_than_the_broker_takes_is_refused_at_once() {
    let limits = Limits { max_payload: 2, ..NO_LIMITS };
    let mut o = Outbox::new(limits, 10, 10);
    let pushed = o.push(telemetry(123));
    assert!(!pushed.store);
    assert_eq!(pushed.dropped[0].reason, DropReason::TooLarge);
    assert_eq!(o.len(), 0);
}

#[test]
fn only_the_front_keeps_payloads_in_memory_and_the_rest_is_read_back_in_order() {
    let mut o = Outbox::new(NO_LIMITS, 2, 2);
    for n in 1..=5 {
        push_stored(&mut o, telemetry(n));
    }
    assert_eq!(send_all(&mut o), vec!["1", "2"]);
    o.on_sent(1);
    o.on_puback(1);
    // 3 and 4 were beyond the two resident entries when they were stored.
    let Next::Load(seqs) = o.next(Instant::now()) else { panic!("expected a load") };
    assert_eq!(seqs, vec![3, 4]);
    let lost = o.loaded(&seqs, vec![(3, Bytes::from("3"))]);
    assert_eq!(lost.iter().map(|d| d.seq).collect::<Vec<_>>(), vec![4], "what the store no longer has is dropped");
    assert_eq!(send_all(&mut o), vec!["3"]);
}

#[test]
fn a_restored_outbox_continues_the_sequence_and_sends_in_order() {
    let mut o = Outbox::new(NO_LIMITS, 10, 1);
    let old = [telemetry(1), entry(Class::Answer, 2)];
    let restored: Vec<Entry> = old
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let stored = encode(e, e.payload.as_deref().expect("payload"));
            decode(10 + i as u64, &stored, i == 0).expect("decodes")
        })
        .collect();
    assert!(restored[1].payload.is_none(), "left on disk");
    o.restore(restored);
    let pushed = o.push(telemetry(3));
    assert_eq!(pushed.seq, 12);
    assert_eq!(send_all(&mut o), vec!["1"]);
    assert_eq!(o.next(Instant::now()), Next::Load(vec![11]));
}

#[test]
fn an_entry_survives_encoding_with_its_properties() {
    let props = Properties {
        response_topic: None,
        correlation_data: Some(Bytes::from_static(b"\x00\xffcorr")),
        user_properties: vec![("k".into(), "v".into()), ("empty".into(), String::new())],
    };
    let e = Entry::new(Class::Answer, "a/b".into(), Bytes::from_static(b"{\"x\":1}"), true, Some(props), 42);
    let back = decode(5, &encode(&e, b"{\"x\":1}"), true).expect("decodes");
    assert_eq!(back, Entry { seq: 5, ..e });
    assert_eq!(decode_payload(&encode(&back, b"p")), Some(Bytes::from_static(b"p")));
}

#[test]
fn a_damaged_record_is_refused_not_misread() {
    let e = telemetry(1);
    let good = encode(&e, b"1");
    for cut in 0..good.len() - 1 {
        // Truncated inside the header: refused (the payload is the tail, any length).
        let header = good.len() - 1;
        if cut < header {
            assert!(decode(1, &good[..cut], true).is_none(), "cut at {cut}");
        }
    }
    let mut bad_version = good.clone();
    bad_version[0] = 9;
    assert!(decode(1, &bad_version, true).is_none());
    let mut bad_class = good;
    bad_class[1] = 200;
    assert!(decode(1, &bad_class, true).is_none());
}

// ---------------------------------------------------------------------------
// Paced by the broker's publish limit

fn paced(per_second: u32) -> Outbox {
    let mut o = Outbox::new(NO_LIMITS, 64, 256).with_pace(Pace::new(Some(per_second), None));
    o.on_connected(false);
    o
}

fn on_topic(class: Class, topic: &str, payload: &str, how: Option<Coalesce>) -> Entry {
    let mut e = Entry::new(class, topic.to_string(), Bytes::from(payload.to_string()), false, None, 0);
    e.coalesce = how;
    e
}

/// Sends what may go at `now`; returns the payloads, and what stopped it.
fn send_at(o: &mut Outbox, now: Instant) -> (Vec<String>, String) {
    let mut out = Vec::new();
    loop {
        match o.next(now) {
            Next::Send(e) => {
                out.push(String::from_utf8_lossy(e.payload.as_deref().unwrap_or_default()).into_owned());
                o.mark_sent(now);
            }
            other => return (out, format!("{other:?}")),
        }
    }
}

#[test]
fn a_paced_outbox_sends_at_most_its_limit_per_window_and_says_when_the_next_may_go() {
    let t0 = Instant::now();
    let mut o = paced(3);
    for n in 0..5 {
        push_stored(&mut o, telemetry(n));
    }
    let (sent, stopped) = send_at(&mut o, t0);
    assert_eq!(sent, vec!["0", "1", "2"]);
    assert_eq!(stopped, format!("{:?}", Next::Paced(t0 + pace::WINDOW)));
    assert_eq!(send_at(&mut o, t0 + pace::WINDOW).0, vec!["3", "4"]);
}

#[test]
fn when_paced_answers_and_shadow_requests_go_before_waiting_telemetry_and_reports() {
    let t0 = Instant::now();
    let mut o = paced(2);
    for n in 0..4 {
        push_stored(&mut o, telemetry(n));
    }
    push_stored(&mut o, on_topic(Class::Report, "s/update", "report", None));
    push_stored(&mut o, on_topic(Class::Answer, "rsp", "answer", None));
    push_stored(&mut o, on_topic(Class::Volatile, "s/get", "get", None));
    assert_eq!(send_at(&mut o, t0).0, vec!["answer", "get"], "what a cloud waits for goes first");
    assert_eq!(send_at(&mut o, t0 + pace::WINDOW).0, vec!["0", "1"], "then the rest, in order");
    assert_eq!(send_at(&mut o, t0 + pace::WINDOW * 2).0, vec!["2", "3"]);
    assert_eq!(send_at(&mut o, t0 + pace::WINDOW * 3).0, vec!["report"]);

    let mut unpaced = Outbox::new(NO_LIMITS, 64, 256);
    push_stored(&mut unpaced, telemetry(1));
    push_stored(&mut unpaced, on_topic(Class::Answer, "rsp", "answer", None));
    assert_eq!(send_all(&mut unpaced), vec!["1", "answer"], "unpaced, everything keeps its order");
}

#[test]
fn while_held_at_the_limit_a_newer_document_joins_the_one_waiting_on_its_topic() {
    let t0 = Instant::now();
    let mut o = paced(1);
    push_stored(&mut o, on_topic(Class::Telemetry, "busy", "{}", None));
    let merge = Some(Coalesce::Merge);
    let first = o.push(on_topic(Class::Report, "s/update", r#"{"state":{"reported":{"a":1,"b":1}},"clientToken":"t1"}"#, merge));
    o.persisted(first.seq, true);
    assert!(!first.coalesced, "nothing held back yet: queued as is");
    assert_eq!(send_at(&mut o, t0).0, vec!["{}"]);
    o.on_sent(1);
    o.on_puback(1);

    // Held back now: the next report on the topic joins the waiting one.
    let second = o.push(on_topic(Class::Report, "s/update", r#"{"state":{"reported":{"a":2}},"clientToken":"t2"}"#, merge));
    assert!(second.coalesced && second.store, "{second:?}");
    assert_eq!(second.seq, first.seq, "it takes the waiting one's place in the queue");
    assert_eq!(o.len(), 1);
    assert!(matches!(o.next(t0 + pace::WINDOW), Next::Wait), "the joined content is stored before it goes");
    o.persisted(second.seq, true);
    let full = o.push(on_topic(Class::Telemetry, "tel", r#"{"time":1}"#, Some(Coalesce::Replace)));
    o.persisted(full.seq, true);
    let newer = o.push(on_topic(Class::Telemetry, "tel", r#"{"time":2}"#, Some(Coalesce::Replace)));
    assert!(newer.coalesced);
    o.persisted(newer.seq, true);
    let answer = o.push(on_topic(Class::Answer, "rsp", "a", None));
    o.persisted(answer.seq, true);
    assert_eq!(o.len(), 3, "a report, a telemetry document, an answer");

    assert_eq!(send_at(&mut o, t0 + pace::WINDOW).0, vec!["a"]);
    assert_eq!(send_at(&mut o, t0 + pace::WINDOW * 2).0, vec![r#"{"state":{"reported":{"a":2,"b":1}},"clientToken":"t2"}"#]);
    assert_eq!(send_at(&mut o, t0 + pace::WINDOW * 3).0, vec![r#"{"time":2}"#]);
}

#[test]
fn what_was_queued_before_this_connection_or_is_already_sent_is_never_joined() {
    let t0 = Instant::now();
    let mut o = paced(1);
    let merge = Some(Coalesce::Merge);
    push_stored(&mut o, on_topic(Class::Telemetry, "t", r#"{"a":1}"#, merge));
    push_stored(&mut o, on_topic(Class::Telemetry, "t", r#"{"a":2}"#, merge));
    assert_eq!(send_at(&mut o, t0).0, vec![r#"{"a":1}"#], "held back now");
    // The link drops: an outage backlog is history, sent whole.
    o.on_link_lost();
    let during = o.push(on_topic(Class::Telemetry, "t", r#"{"a":3}"#, merge));
    assert!(!during.coalesced);
    o.persisted(during.seq, true);
    o.on_connected(false);
    assert_eq!(send_at(&mut o, t0 + pace::WINDOW * 2).0, vec![r#"{"a":1}"#], "resent");
    let after = o.push(on_topic(Class::Telemetry, "t", r#"{"a":4}"#, merge));
    assert!(!after.coalesced, "the waiting one on its topic is from the outage");
    o.persisted(after.seq, true);
    let next = o.push(on_topic(Class::Telemetry, "t", r#"{"a":5}"#, merge));
    assert!(next.coalesced, "but one queued on this connection is joined");
    o.persisted(next.seq, true);
    let mut sent = Vec::new();
    for n in 3..8 {
        sent.extend(send_at(&mut o, t0 + pace::WINDOW * n).0);
    }
    assert_eq!(sent, vec![r#"{"a":2}"#, r#"{"a":3}"#, r#"{"a":5}"#]);
    assert_eq!(o.next(t0 + Duration::from_secs(60)), Next::Wait);
}
