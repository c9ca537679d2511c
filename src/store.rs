//! What the gateway must remember across restarts: shadow versions and
//! executed command ids.
//!
//! Without it, a restart would re-apply an old shadow delta or run a command a
//! second time. Backed by redb (an embedded, crash-safe key-value store: every
//! commit is durable before it returns), in one file under the state
//! directory. Keys are the shadow's topic prefix, so two gateways sharing
//! nothing but a broker never collide.
//!
//! Failures to write are returned, not swallowed: a gateway that cannot
//! remember must say so, because it can no longer promise "at most once".

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

/// Shadow key → last version acted upon.
const VERSIONS: TableDefinition<&str, u64> = TableDefinition::new("shadow_versions");
/// "shadow key\0point path" → (`metadata` timestamp, JSON text) of the
/// desired value last applied. The value is kept because AWS timestamps are
/// whole seconds: two writes within one second differ only by their value.
const DESIRED: TableDefinition<&str, (u64, &str)> = TableDefinition::new("desired_applied_values");
/// "shadow key\0command id" → epoch ms when it was executed.
const COMMANDS: TableDefinition<&str, u64> = TableDefinition::new("executed_commands");

/// Command ids kept per shadow; older ones are forgotten (their commands have
/// long expired by then).
const KEPT_COMMANDS: usize = 1000;

/// A desired value that was applied: when the application wrote it (shadow
/// `metadata` timestamp, epoch s) and its JSON text.
#[derive(Clone, Debug, PartialEq)]
pub struct Applied {
    pub timestamp: u64,
    pub value: String,
}

impl Applied {
    /// Whether `self`, seen in a delta, is that same write again (a delta that
    /// persists), or an older one arriving late.
    pub fn is_covered_by(&self, done: &Applied) -> bool {
        self.timestamp < done.timestamp || (self.timestamp == done.timestamp && self.value == done.value)
    }
}

/// The gateway's persistent state; cheap to clone.
#[derive(Clone, Debug)]
pub struct Store {
    db: Arc<Database>,
    path: PathBuf,
}

impl Store {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path) -> anyhow::Result<Store> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create the state directory {}", dir.display()))?;
        let path = dir.join("twinbus.redb");
        let db = Database::create(&path).with_context(|| format!("cannot open the state store {}", path.display()))?;
        let store = Store { db: Arc::new(db), path };
        // Create the tables, so that reads never meet a missing table.
        let tx = store.db.begin_write()?;
        tx.open_table(VERSIONS)?;
        tx.open_table(COMMANDS)?;
        tx.open_table(DESIRED)?;
        tx.commit()?;
        Ok(store)
    }

    /// Runs a write transaction on the blocking pool: a commit waits for the
    /// disk (fsync), milliseconds on an SD card, which would otherwise stall
    /// every task sharing the runtime thread (a bus owner timing a reply).
    async fn write(&self, f: impl FnOnce(&Database) -> anyhow::Result<()> + Send + 'static) -> anyhow::Result<()> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || f(&db)).await.context("the store's writer stopped")?
    }

    /// Where the store lives, for messages.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The last shadow version acted upon.
    pub fn shadow_version(&self, shadow: &str) -> anyhow::Result<Option<u64>> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(VERSIONS)?;
        Ok(table.get(shadow)?.map(|v| v.value()))
    }

    /// Records a version; never moves backwards.
    pub async fn set_shadow_version(&self, shadow: &str, version: u64) -> anyhow::Result<()> {
        let shadow = shadow.to_string();
        self.write(move |db| {
            let shadow = shadow.as_str();
            let tx = db.begin_write()?;
            {
                let mut table = tx.open_table(VERSIONS)?;
                let current = table.get(shadow)?.map(|v| v.value());
                if current.is_none_or(|c| version > c) {
                    table.insert(shadow, version)?;
                }
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }

    /// The desired value of a point last applied: when it was written (its
    /// `metadata` timestamp) and what it was (JSON text), so that a delta
    /// that persists (a refused or clamped value, a write-only point) is not
    /// applied again and again.
    pub fn desired_applied(&self, shadow: &str, path: &str) -> anyhow::Result<Option<Applied>> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(DESIRED)?;
        Ok(table.get(command_key(shadow, path).as_str())?.map(|v| {
            let (timestamp, value) = v.value();
            Applied { timestamp, value: value.to_string() }
        }))
    }

    /// Records desired values as applied: (point path, what was applied).
    pub async fn set_desired_applied(&self, shadow: &str, applied: &[(String, Applied)]) -> anyhow::Result<()> {
        let (shadow, applied) = (shadow.to_string(), applied.to_vec());
        self.write(move |db| {
            let tx = db.begin_write()?;
            {
                let mut table = tx.open_table(DESIRED)?;
                for (path, a) in applied {
                    table.insert(command_key(&shadow, &path).as_str(), (a.timestamp, a.value.as_str()))?;
                }
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }

    /// Forgets what was applied to a shadow (it was deleted and created again).
    pub async fn reset_shadow(&self, shadow: &str, version: u64) -> anyhow::Result<()> {
        let shadow = shadow.to_string();
        self.write(move |db| {
            let shadow = shadow.as_str();
            let prefix = command_key(shadow, "");
            let tx = db.begin_write()?;
            {
                let mut versions = tx.open_table(VERSIONS)?;
                versions.insert(shadow, version)?;
                let mut desired = tx.open_table(DESIRED)?;
                let keys: Vec<String> = desired
                    .range(prefix.as_str()..)?
                    .map_while(|item| item.ok().map(|(k, _)| k.value().to_string()).filter(|k| k.starts_with(&prefix)))
                    .collect();
                for k in keys {
                    desired.remove(k.as_str())?;
                }
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }

    /// Whether a command id was executed (or started) before.
    pub fn command_seen(&self, shadow: &str, id: &str) -> anyhow::Result<bool> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(COMMANDS)?;
        Ok(table.get(command_key(shadow, id).as_str())?.is_some())
    }

    /// Records a command id before it runs: a crash mid-command must not run it twice.
    pub async fn mark_command(&self, shadow: &str, id: &str, at_ms: u64) -> anyhow::Result<()> {
        let (shadow, id) = (shadow.to_string(), id.to_string());
        self.write(move |db| {
            let (shadow, id) = (shadow.as_str(), id.as_str());
            let prefix = command_key(shadow, "");
            let tx = db.begin_write()?;
            {
                let mut table = tx.open_table(COMMANDS)?;
                table.insert(command_key(shadow, id).as_str(), at_ms)?;
                // Forget the oldest ids of this shadow beyond the limit.
                let mut entries: Vec<(String, u64)> = Vec::new();
                for item in table.range(prefix.as_str()..)? {
                    let (k, v) = item?;
                    if !k.value().starts_with(&prefix) {
                        break;
                    }
                    entries.push((k.value().to_string(), v.value()));
                }
                if entries.len() > KEPT_COMMANDS {
                    entries.sort_by_key(|(_, at)| *at);
                    for (k, _) in &entries[..entries.len() - KEPT_COMMANDS] {
                        table.remove(k.as_str())?;
                    }
                }
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }
}

fn command_key(shadow: &str, id: &str) -> String {
    format!("{shadow}\0{id}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("twinbus-store-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[tokio::test]
    async fn versions_survive_a_reopen_and_never_go_backwards() {
        let dir = temp_dir("versions");
        {
            let store = Store::open(&dir).expect("open");
            assert_eq!(store.shadow_version("a").expect("read"), None);
            store.set_shadow_version("a", 7).await.expect("write");
            store.set_shadow_version("a", 5).await.expect("write");
        }
        let store = Store::open(&dir).expect("reopen");
        assert_eq!(store.shadow_version("a").expect("read"), Some(7));
        assert_eq!(store.shadow_version("b").expect("read"), None);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn command_ids_are_remembered_per_shadow_across_a_reopen() {
        let dir = temp_dir("commands");
        {
            let store = Store::open(&dir).expect("open");
            store.mark_command("thing-1", "c-1", 1).await.expect("write");
        }
        let store = Store::open(&dir).expect("reopen");
        assert!(store.command_seen("thing-1", "c-1").expect("read"));
        assert!(!store.command_seen("thing-2", "c-1").expect("read"), "ids are per shadow");
        assert!(!store.command_seen("thing-1", "c-2").expect("read"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn an_applied_desired_value_is_recognised_again_but_a_new_write_in_the_same_second_is_not() {
        let dir = temp_dir("desired");
        let at = |timestamp, value: &str| Applied { timestamp, value: value.to_string() };
        {
            let store = Store::open(&dir).expect("open");
            store.set_desired_applied("t", &[("speed".to_string(), at(100, "30"))]).await.expect("write");
        }
        let store = Store::open(&dir).expect("reopen");
        let done = store.desired_applied("t", "speed").expect("read").expect("kept across a reopen");
        assert!(at(100, "30").is_covered_by(&done), "the same write, back in a later delta");
        assert!(at(99, "40").is_covered_by(&done), "an older write arriving late");
        assert!(!at(100, "40").is_covered_by(&done), "another value written within the same second");
        assert!(!at(101, "30").is_covered_by(&done), "the same value written again later");
        assert_eq!(store.desired_applied("u", "speed").expect("read"), None, "per shadow");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn only_the_newest_command_ids_are_kept() {
        let dir = temp_dir("prune");
        let store = Store::open(&dir).expect("open");
        for n in 0..(KEPT_COMMANDS as u64 + 5) {
            store.mark_command("t", &format!("c-{n}"), n).await.expect("write");
        }
        assert!(!store.command_seen("t", "c-0").expect("read"), "the oldest is forgotten");
        assert!(store.command_seen("t", &format!("c-{}", KEPT_COMMANDS + 4)).expect("read"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
