//! What the gateway must remember across restarts and crashes: the outbox
//! (every message not yet acknowledged by the broker), raw command ids with
//! their answers, shadow versions, applied desired values and shadow command
//! states.
//!
//! Without it, a restart would lose queued answers and telemetry, run a
//! command a second time, or re-apply an old shadow delta. Backed by redb (an
//! embedded, crash-safe key-value store) in one file under the state
//! directory (0700, the file 0600: it holds what commands were sent).
//!
//! One writer thread owns every write. Callers hand it [`Op`]s and get a
//! future that resolves once they are committed; the thread applies whatever
//! has queued up in one transaction and one fsync (group commit), so a burst
//! of answers or telemetry costs a few disk syncs, not one each. A job may be
//! *durable* (the future resolves only after the fsync: an answer in the
//! outbox, a command recorded before its first write) or not (an outbox entry
//! removed after its PUBACK: if a crash loses that, the message is sent once
//! more, which at-least-once delivery allows). Ops in one job commit together
//! or not at all, which is how an answer and the record "command X answered"
//! enter the store as one. Reads go straight to the database (redb readers
//! never wait for the writer).
//!
//! Failures are returned, not swallowed: a gateway that cannot remember must
//! say so, because it can no longer promise "at most once" or "nothing lost".

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{mpsc as std_mpsc, Arc, Mutex};
use std::task::{Context, Poll};

use anyhow::{anyhow, Context as _};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

/// Shadow key → last version acted upon.
const VERSIONS: TableDefinition<&str, u64> = TableDefinition::new("shadow_versions");
/// "shadow key\0point path" → (`metadata` timestamp, JSON text) of the
/// desired value last applied. The value is kept because AWS timestamps are
/// whole seconds: two writes within one second differ only by their value.
const DESIRED: TableDefinition<&str, (u64, &str)> = TableDefinition::new("desired_applied_values");
/// "shadow key\0command id" → (epoch ms when it started, [`CommandState`]).
const SHADOW_COMMANDS: TableDefinition<&str, (u64, u8)> = TableDefinition::new("shadow_commands");
/// (device, id as JSON text) → (epoch ms, [`CommandState`], the adapter's record).
const RAW_COMMANDS: TableDefinition<(&str, &str), (u64, u8, &[u8])> = TableDefinition::new("raw_commands");
/// (connection, sequence number) → the outbox's encoded entry.
const OUTBOX: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("outbox");
/// Tables of earlier builds (no release used them): removed at open.
const RETIRED: TableDefinition<&str, u64> = TableDefinition::new("executed_commands");

/// Shadow command ids kept per shadow; older ones are forgotten (their
/// commands have long expired by then).
const KEPT_SHADOW_COMMANDS: usize = 1000;

/// Jobs applied in one transaction, at most: bounds the time a commit holds
/// the writer and the memory of one batch.
const MAX_BATCH: usize = 4096;

/// A desired value that was applied: when the application wrote it (shadow
/// `metadata` timestamp, epoch s) and its JSON text.
#[derive(Clone, Debug, PartialEq)]
pub struct Applied {
    /// The `metadata` timestamp of the desired value.
    pub timestamp: u64,
    /// Its JSON text.
    pub value: String,
}

impl Applied {
    /// Whether `self`, seen in a delta, is that same write again (a delta that
    /// persists), or an older one arriving late.
    pub fn is_covered_by(&self, done: &Applied) -> bool {
        self.timestamp < done.timestamp || (self.timestamp == done.timestamp && self.value == done.value)
    }
}

/// Where a command stands, as recorded before and after it runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CommandState {
    /// Recorded before its first write; still so after a crash means the
    /// outcome is unknown.
    Started,
    /// Finished; its answer (or final state) is recorded with it.
    Done,
}

impl CommandState {
    fn code(self) -> u8 {
        match self {
            CommandState::Started => 0,
            CommandState::Done => 1,
        }
    }

    fn from_code(code: u8) -> CommandState {
        if code == 0 {
            CommandState::Started
        } else {
            CommandState::Done
        }
    }
}

/// One change to the store. Ops of one [`Store::submit`] commit together.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// Adds (or replaces) an outbox entry.
    OutboxPut {
        /// Connection name.
        connection: String,
        /// The entry's sequence number (send order).
        seq: u64,
        /// The encoded entry (see `mqtt::outbox`).
        record: Vec<u8>,
    },
    /// Removes outbox entries (acknowledged or dropped).
    OutboxRemove {
        /// Connection name.
        connection: String,
        /// Their sequence numbers.
        seqs: Vec<u64>,
    },
    /// Records a shadow version as acted upon; never moves backwards.
    ShadowVersion {
        /// Shadow key.
        shadow: String,
        /// The version.
        version: u64,
    },
    /// Forgets what was applied to a shadow (it was deleted and created again)
    /// and sets its version.
    ShadowReset {
        /// Shadow key.
        shadow: String,
        /// The version to start from.
        version: u64,
    },
    /// Records desired values as applied: (point path, what was applied).
    DesiredApplied {
        /// Shadow key.
        shadow: String,
        /// Per point path.
        applied: Vec<(String, Applied)>,
    },
    /// Records a shadow command's state.
    ShadowCommand {
        /// Shadow key.
        shadow: String,
        /// Command id.
        id: String,
        /// Epoch ms when it started.
        at_ms: u64,
        /// Started or done.
        state: CommandState,
    },
    /// Records a raw command: started (before its first write) or done, with
    /// the adapter's record (reply route, answer).
    RawCommand {
        /// Device name.
        device: String,
        /// The command id as JSON text (`"7"` and `7` are different ids).
        id: String,
        /// Epoch ms.
        at_ms: u64,
        /// Started or done.
        state: CommandState,
        /// Opaque to the store.
        record: Vec<u8>,
    },
    /// Forgets a device's raw command ids older than `before_ms`, and the
    /// oldest beyond `keep`.
    PruneRawCommands {
        /// Device name.
        device: String,
        /// Ids to keep at most.
        keep: usize,
        /// Epoch ms: older ids are forgotten.
        before_ms: u64,
    },
}

/// A job for the writer thread.
struct Job {
    ops: Vec<Op>,
    durable: bool,
    done: Option<oneshot::Sender<Result<(), String>>>,
}

/// The gateway's persistent state; cheap to clone.
#[derive(Clone, Debug)]
pub struct Store {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    db: Arc<Database>,
    path: PathBuf,
    jobs: Mutex<Option<std_mpsc::Sender<Job>>>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Fires if the writer thread ends while the store is open (a panic in
    /// redb): the gateway can no longer keep its promises and must stop.
    failed: CancellationToken,
}

/// A submitted job: resolves once it is committed (or failed).
#[derive(Debug)]
pub struct Pending(Option<oneshot::Receiver<Result<(), String>>>);

impl Future for Pending {
    type Output = anyhow::Result<()>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let Some(rx) = self.0.as_mut() else {
            return Poll::Ready(Err(anyhow!("the store is closed")));
        };
        Pin::new(rx).poll(cx).map(|r| match r {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(anyhow!(e)),
            Err(_) => Err(anyhow!("the store's writer stopped")),
        })
    }
}

impl Store {
    /// Opens (or creates) the store in `dir`, made private to this user.
    pub fn open(dir: &Path) -> anyhow::Result<Store> {
        create_private_dir(dir).with_context(|| format!("cannot create the state directory {}", dir.display()))?;
        let path = dir.join("twinbus.redb");
        let db = Database::create(&path).with_context(|| format!("cannot open the state store {}", path.display()))?;
        restrict_file(&path).with_context(|| format!("cannot make {} private", path.display()))?;
        let tx = db.begin_write()?;
        // Create the tables, so that reads never meet a missing table.
        tx.open_table(VERSIONS)?;
        tx.open_table(DESIRED)?;
        tx.open_table(SHADOW_COMMANDS)?;
        tx.open_table(RAW_COMMANDS)?;
        tx.open_table(OUTBOX)?;
        tx.delete_table(RETIRED)?;
        tx.commit()?;
        let db = Arc::new(db);
        let (jobs, rx) = std_mpsc::channel();
        let failed = CancellationToken::new();
        let writer = {
            let (db, failed) = (db.clone(), failed.clone());
            std::thread::Builder::new()
                .name("store-writer".to_string())
                .spawn(move || write_loop(&db, &rx, &failed))
                .context("cannot start the store's writer thread")?
        };
        Ok(Store {
            inner: Arc::new(Inner { db, path, jobs: Mutex::new(Some(jobs)), writer: Mutex::new(Some(writer)), failed }),
        })
    }

    /// Where the store lives, for messages.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Fires when the writer thread died: nothing can be recorded any more.
    pub fn failed(&self) -> CancellationToken {
        self.inner.failed.clone()
    }

    /// Queues ops for the writer; they commit together. `durable`: the result
    /// comes after the data is on disk (fsync); otherwise it may be lost in a
    /// crash until a later durable commit.
    pub fn submit(&self, ops: Vec<Op>, durable: bool) -> Pending {
        let (done, rx) = oneshot::channel();
        let sent = lock(&self.inner.jobs).as_ref().is_some_and(|jobs| jobs.send(Job { ops, durable, done: Some(done) }).is_ok());
        Pending(sent.then_some(rx))
    }

    /// Queues ops without waiting for the outcome (errors are logged).
    pub fn submit_detached(&self, ops: Vec<Op>) {
        let sent = lock(&self.inner.jobs).as_ref().is_some_and(|jobs| jobs.send(Job { ops, durable: false, done: None }).is_ok());
        if !sent {
            tracing::warn!(store = %self.inner.path.display(), "the store is closed: a change was not recorded");
        }
    }

    /// Commits `ops` durably.
    pub async fn apply(&self, ops: Vec<Op>) -> anyhow::Result<()> {
        self.submit(ops, true).await
    }

    /// Commits everything queued, durably, and stops the writer. Later
    /// submissions fail with "the store is closed".
    pub async fn close(&self) {
        let sender = lock(&self.inner.jobs).take();
        if let Some(jobs) = sender {
            let (done, rx) = oneshot::channel();
            if jobs.send(Job { ops: Vec::new(), durable: true, done: Some(done) }).is_ok() {
                let _ = rx.await;
            }
        }
        let writer = lock(&self.inner.writer).take();
        if let Some(writer) = writer {
            // The channel is closed: the thread ends after the last batch.
            let _ = tokio::task::spawn_blocking(move || writer.join()).await;
        }
    }

    /// The last shadow version acted upon.
    pub fn shadow_version(&self, shadow: &str) -> anyhow::Result<Option<u64>> {
        let tx = self.inner.db.begin_read()?;
        let table = tx.open_table(VERSIONS)?;
        Ok(table.get(shadow)?.map(|v| v.value()))
    }

    /// The desired value of a point last applied: when it was written (its
    /// `metadata` timestamp) and what it was (JSON text), so that a delta
    /// that persists (a refused or clamped value, a write-only point) is not
    /// applied again and again.
    pub fn desired_applied(&self, shadow: &str, path: &str) -> anyhow::Result<Option<Applied>> {
        let tx = self.inner.db.begin_read()?;
        let table = tx.open_table(DESIRED)?;
        Ok(table.get(joined(shadow, path).as_str())?.map(|v| {
            let (timestamp, value) = v.value();
            Applied { timestamp, value: value.to_string() }
        }))
    }

    /// Every desired value applied to a shadow: (point path, what was applied).
    /// Read once when its adapter starts; it keeps them in memory after.
    pub fn desired_applied_all(&self, shadow: &str) -> anyhow::Result<Vec<(String, Applied)>> {
        let prefix = joined(shadow, "");
        let tx = self.inner.db.begin_read()?;
        let table = tx.open_table(DESIRED)?;
        let mut out = Vec::new();
        for item in table.range(prefix.as_str()..)? {
            let (k, v) = item?;
            let Some(path) = k.value().strip_prefix(prefix.as_str()).map(str::to_string) else { break };
            let (timestamp, value) = v.value();
            out.push((path, Applied { timestamp, value: value.to_string() }));
        }
        Ok(out)
    }

    /// Every command id a shadow recorded, with its state.
    pub fn shadow_commands(&self, shadow: &str) -> anyhow::Result<Vec<(String, CommandState)>> {
        let prefix = joined(shadow, "");
        let tx = self.inner.db.begin_read()?;
        let table = tx.open_table(SHADOW_COMMANDS)?;
        let mut out = Vec::new();
        for item in table.range(prefix.as_str()..)? {
            let (k, v) = item?;
            let Some(id) = k.value().strip_prefix(prefix.as_str()).map(str::to_string) else { break };
            out.push((id, CommandState::from_code(v.value().1)));
        }
        Ok(out)
    }

    /// A shadow command's recorded state, if it ever started.
    pub fn shadow_command(&self, shadow: &str, id: &str) -> anyhow::Result<Option<CommandState>> {
        let tx = self.inner.db.begin_read()?;
        let table = tx.open_table(SHADOW_COMMANDS)?;
        Ok(table.get(joined(shadow, id).as_str())?.map(|v| CommandState::from_code(v.value().1)))
    }

    /// Ids of a shadow's commands that started and never finished (the
    /// gateway stopped in the middle), oldest first.
    pub fn shadow_commands_started(&self, shadow: &str) -> anyhow::Result<Vec<String>> {
        let prefix = joined(shadow, "");
        let tx = self.inner.db.begin_read()?;
        let table = tx.open_table(SHADOW_COMMANDS)?;
        let mut started = Vec::new();
        for item in table.range(prefix.as_str()..)? {
            let (k, v) = item?;
            let Some(id) = k.value().strip_prefix(prefix.as_str()).map(str::to_string) else { break };
            let (at, state) = v.value();
            if CommandState::from_code(state) == CommandState::Started {
                started.push((at, id));
            }
        }
        started.sort();
        Ok(started.into_iter().map(|(_, id)| id).collect())
    }

    /// A raw command's record: (epoch ms, state, the adapter's record).
    pub fn raw_command(&self, device: &str, id: &str) -> anyhow::Result<Option<(u64, CommandState, Vec<u8>)>> {
        let tx = self.inner.db.begin_read()?;
        let table = tx.open_table(RAW_COMMANDS)?;
        Ok(table.get((device, id))?.map(|v| {
            let (at, state, record) = v.value();
            (at, CommandState::from_code(state), record.to_vec())
        }))
    }

    /// A device's raw commands recorded as started and never finished: (id, record).
    pub fn raw_commands_started(&self, device: &str) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
        let tx = self.inner.db.begin_read()?;
        let table = tx.open_table(RAW_COMMANDS)?;
        let mut started = Vec::new();
        for item in table.range((device, "")..)? {
            let (k, v) = item?;
            let (d, id) = k.value();
            if d != device {
                break;
            }
            let (at, state, record) = v.value();
            if CommandState::from_code(state) == CommandState::Started {
                started.push((at, id.to_string(), record.to_vec()));
            }
        }
        started.sort_by_key(|(at, _, _)| *at);
        Ok(started.into_iter().map(|(_, id, r)| (id, r)).collect())
    }

    /// How many raw command ids a device has recorded.
    pub fn raw_command_count(&self, device: &str) -> anyhow::Result<usize> {
        let tx = self.inner.db.begin_read()?;
        let table = tx.open_table(RAW_COMMANDS)?;
        let mut n = 0;
        for item in table.range((device, "")..)? {
            if item?.0.value().0 != device {
                break;
            }
            n += 1;
        }
        Ok(n)
    }

    /// Every outbox entry of a connection, in sequence order, passed to `each`
    /// (so that a long outbox need not be held in memory at once).
    pub fn outbox_scan(&self, connection: &str, mut each: impl FnMut(u64, &[u8])) -> anyhow::Result<()> {
        let tx = self.inner.db.begin_read()?;
        let table = tx.open_table(OUTBOX)?;
        for item in table.range((connection, 0)..=(connection, u64::MAX))? {
            let (k, v) = item?;
            each(k.value().1, v.value());
        }
        Ok(())
    }

    /// Some outbox entries by sequence number; missing ones are left out.
    pub fn outbox_get(&self, connection: &str, seqs: &[u64]) -> anyhow::Result<Vec<(u64, Vec<u8>)>> {
        let tx = self.inner.db.begin_read()?;
        let table = tx.open_table(OUTBOX)?;
        let mut found = Vec::with_capacity(seqs.len());
        for &seq in seqs {
            if let Some(v) = table.get((connection, seq))? {
                found.push((seq, v.value().to_vec()));
            }
        }
        Ok(found)
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the channel ends the writer after its last batch.
        lock(&self.jobs).take();
        if let Some(writer) = lock(&self.writer).take() {
            let _ = writer.join();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A poisoned lock only means a panic elsewhere; the data is still usable.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The writer thread: one transaction per batch of whatever has queued up.
fn write_loop(db: &Database, jobs: &std_mpsc::Receiver<Job>, failed: &CancellationToken) {
    // Fires `failed` if this thread unwinds (redb panics on a corrupt file).
    struct Guard<'a>(&'a CancellationToken);
    impl Drop for Guard<'_> {
        fn drop(&mut self) {
            if std::thread::panicking() {
                self.0.cancel();
            }
        }
    }
    let _guard = Guard(failed);
    while let Ok(first) = jobs.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let durable = batch.iter().any(|j| j.durable);
        match commit(db, batch.iter().flat_map(|j| j.ops.iter()), durable) {
            Ok(()) => {
                for job in batch {
                    if let Some(done) = job.done {
                        let _ = done.send(Ok(()));
                    }
                }
            }
            // One bad job must not fail the others: each alone, for its own result.
            Err(_) => {
                for job in batch {
                    let result = commit(db, job.ops.iter(), job.durable || durable).map_err(|e| format!("{e:#}"));
                    if let Err(e) = &result {
                        if job.done.is_none() {
                            tracing::error!("cannot update the state store: {e}");
                        }
                    }
                    if let Some(done) = job.done {
                        let _ = done.send(result);
                    }
                }
            }
        }
    }
}

fn commit<'a>(db: &Database, ops: impl Iterator<Item = &'a Op>, durable: bool) -> anyhow::Result<()> {
    let mut tx = db.begin_write()?;
    if !durable {
        tx.set_durability(Durability::None)?;
    }
    for op in ops {
        apply(&tx, op)?;
    }
    tx.commit()?;
    Ok(())
}

fn apply(tx: &WriteTransaction, op: &Op) -> anyhow::Result<()> {
    match op {
        Op::OutboxPut { connection, seq, record } => {
            tx.open_table(OUTBOX)?.insert((connection.as_str(), *seq), record.as_slice())?;
        }
        Op::OutboxRemove { connection, seqs } => {
            let mut table = tx.open_table(OUTBOX)?;
            for seq in seqs {
                table.remove((connection.as_str(), *seq))?;
            }
        }
        Op::ShadowVersion { shadow, version } => {
            let mut table = tx.open_table(VERSIONS)?;
            let current = table.get(shadow.as_str())?.map(|v| v.value());
            if current.is_none_or(|c| *version > c) {
                table.insert(shadow.as_str(), *version)?;
            }
        }
        Op::ShadowReset { shadow, version } => {
            tx.open_table(VERSIONS)?.insert(shadow.as_str(), *version)?;
            let mut desired = tx.open_table(DESIRED)?;
            let prefix = joined(shadow, "");
            let keys: Vec<String> = desired
                .range(prefix.as_str()..)?
                .map_while(|item| item.ok().map(|(k, _)| k.value().to_string()).filter(|k| k.starts_with(&prefix)))
                .collect();
            for k in keys {
                desired.remove(k.as_str())?;
            }
        }
        Op::DesiredApplied { shadow, applied } => {
            let mut table = tx.open_table(DESIRED)?;
            for (path, a) in applied {
                table.insert(joined(shadow, path).as_str(), (a.timestamp, a.value.as_str()))?;
            }
        }
        Op::ShadowCommand { shadow, id, at_ms, state } => {
            let mut table = tx.open_table(SHADOW_COMMANDS)?;
            let started = table.get(joined(shadow, id).as_str())?.map_or(*at_ms, |v| v.value().0);
            table.insert(joined(shadow, id).as_str(), (started, state.code()))?;
            if *state == CommandState::Started {
                prune_shadow_commands(&mut table, shadow)?;
            }
        }
        Op::RawCommand { device, id, at_ms, state, record } => {
            tx.open_table(RAW_COMMANDS)?.insert((device.as_str(), id.as_str()), (*at_ms, state.code(), record.as_slice()))?;
        }
        Op::PruneRawCommands { device, keep, before_ms } => {
            let mut table = tx.open_table(RAW_COMMANDS)?;
            let mut entries: Vec<(u64, String)> = Vec::new();
            for item in table.range((device.as_str(), "")..)? {
                let (k, v) = item?;
                let (d, id) = k.value();
                if d != device {
                    break;
                }
                entries.push((v.value().0, id.to_string()));
            }
            entries.sort();
            let beyond = entries.len().saturating_sub(*keep);
            for (n, (at, id)) in entries.iter().enumerate() {
                if n < beyond || *at < *before_ms {
                    table.remove((device.as_str(), id.as_str()))?;
                }
            }
        }
    }
    Ok(())
}

/// Forgets the oldest command ids of a shadow beyond the limit.
fn prune_shadow_commands(table: &mut redb::Table<&str, (u64, u8)>, shadow: &str) -> anyhow::Result<()> {
    let prefix = joined(shadow, "");
    let mut entries: Vec<(u64, String)> = Vec::new();
    for item in table.range(prefix.as_str()..)? {
        let (k, v) = item?;
        if !k.value().starts_with(&prefix) {
            break;
        }
        entries.push((v.value().0, k.value().to_string()));
    }
    if entries.len() > KEPT_SHADOW_COMMANDS {
        entries.sort();
        for (_, k) in &entries[..entries.len() - KEPT_SHADOW_COMMANDS] {
            table.remove(k.as_str())?;
        }
    }
    Ok(())
}

fn joined(a: &str, b: &str) -> String {
    format!("{a}\0{b}")
}

/// Creates `dir` (and its parents) and makes it 0700: the store records what
/// commands were sent and answered.
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

fn restrict_file(path: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("twinbus-store-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    fn version(shadow: &str, version: u64) -> Op {
        Op::ShadowVersion { shadow: shadow.to_string(), version }
    }

    #[tokio::test]
    async fn versions_survive_a_reopen_and_never_go_backwards() {
        let dir = temp_dir("versions");
        {
            let store = Store::open(&dir).expect("open");
            assert_eq!(store.shadow_version("a").expect("read"), None);
            store.apply(vec![version("a", 7)]).await.expect("write");
            store.apply(vec![version("a", 5)]).await.expect("write");
            store.close().await;
        }
        let store = Store::open(&dir).expect("reopen");
        assert_eq!(store.shadow_version("a").expect("read"), Some(7));
        assert_eq!(store.shadow_version("b").expect("read"), None);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn the_state_directory_and_the_store_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = temp_dir("private");
        let store = Store::open(&dir).expect("open");
        let mode = |p: &Path| std::fs::metadata(p).expect("metadata").permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(store.path()), 0o600);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn shadow_command_states_are_kept_per_shadow_across_a_reopen() {
        let dir = temp_dir("commands");
        let cmd = |shadow: &str, id: &str, at_ms, state| Op::ShadowCommand { shadow: shadow.into(), id: id.into(), at_ms, state };
        {
            let store = Store::open(&dir).expect("open");
            store.apply(vec![cmd("thing-1", "c-1", 1, CommandState::Started)]).await.expect("write");
            store.apply(vec![cmd("thing-1", "c-2", 2, CommandState::Started)]).await.expect("write");
            store.apply(vec![cmd("thing-1", "c-1", 3, CommandState::Done)]).await.expect("write");
        }
        let store = Store::open(&dir).expect("reopen");
        assert_eq!(store.shadow_command("thing-1", "c-1").expect("read"), Some(CommandState::Done));
        assert_eq!(store.shadow_command("thing-2", "c-1").expect("read"), None, "ids are per shadow");
        assert_eq!(store.shadow_commands_started("thing-1").expect("read"), vec!["c-2".to_string()], "the one cut off");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn an_applied_desired_value_is_recognised_again_but_a_new_write_in_the_same_second_is_not() {
        let dir = temp_dir("desired");
        let at = |timestamp, value: &str| Applied { timestamp, value: value.to_string() };
        {
            let store = Store::open(&dir).expect("open");
            let op = Op::DesiredApplied { shadow: "t".into(), applied: vec![("speed".to_string(), at(100, "30"))] };
            store.apply(vec![op]).await.expect("write");
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
    async fn a_shadows_whole_memory_reads_back_and_stays_apart_from_other_shadows() {
        let dir = temp_dir("whole");
        let store = Store::open(&dir).expect("open");
        let applied = |timestamp, value: &str| Applied { timestamp, value: value.to_string() };
        let ops = vec![
            Op::DesiredApplied { shadow: "a".into(), applied: vec![("x".into(), applied(1, "1")), ("y.z".into(), applied(2, "\"on\""))] },
            Op::DesiredApplied { shadow: "ab".into(), applied: vec![("x".into(), applied(3, "3"))] },
            Op::ShadowCommand { shadow: "a".into(), id: "c-1".into(), at_ms: 1, state: CommandState::Done },
            Op::ShadowCommand { shadow: "a".into(), id: "c-2".into(), at_ms: 2, state: CommandState::Started },
            Op::ShadowCommand { shadow: "b".into(), id: "c-3".into(), at_ms: 3, state: CommandState::Done },
        ];
        store.apply(ops).await.expect("write");
        assert_eq!(store.desired_applied_all("a").expect("read"), vec![("x".to_string(), applied(1, "1")), ("y.z".to_string(), applied(2, "\"on\""))]);
        assert_eq!(store.shadow_commands("a").expect("read"), vec![("c-1".to_string(), CommandState::Done), ("c-2".to_string(), CommandState::Started)]);
        assert!(store.desired_applied_all("none").expect("read").is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn only_the_newest_shadow_command_ids_are_kept() {
        let dir = temp_dir("prune");
        let store = Store::open(&dir).expect("open");
        for n in 0..(KEPT_SHADOW_COMMANDS as u64 + 5) {
            let op = Op::ShadowCommand { shadow: "t".into(), id: format!("c-{n}"), at_ms: n, state: CommandState::Started };
            store.submit(vec![op], false);
        }
        store.apply(Vec::new()).await.expect("flush");
        assert_eq!(store.shadow_command("t", "c-0").expect("read"), None, "the oldest is forgotten");
        assert!(store.shadow_command("t", &format!("c-{}", KEPT_SHADOW_COMMANDS + 4)).expect("read").is_some());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn raw_command_ids_are_pruned_by_count_and_age_per_device() {
        let dir = temp_dir("raw");
        let store = Store::open(&dir).expect("open");
        let raw = |device: &str, id: &str, at_ms, state| Op::RawCommand {
            device: device.into(),
            id: id.into(),
            at_ms,
            state,
            record: id.as_bytes().to_vec(),
        };
        let mut ops: Vec<Op> = (0..10).map(|n| raw("pump", &format!("\"{n}\""), 100 + n, CommandState::Done)).collect();
        ops.push(raw("pump", "7", 50, CommandState::Started));
        ops.push(raw("fan", "\"0\"", 1, CommandState::Done));
        store.apply(ops).await.expect("write");
        assert_eq!(store.raw_command_count("pump").expect("count"), 11);
        assert_eq!(store.raw_commands_started("pump").expect("read"), vec![("7".to_string(), b"7".to_vec())]);
        assert_eq!(store.raw_command("pump", "7").expect("read").map(|r| r.1), Some(CommandState::Started), "\"7\" and 7 are two ids");

        store.apply(vec![Op::PruneRawCommands { device: "pump".into(), keep: 5, before_ms: 103 }]).await.expect("prune");
        assert_eq!(store.raw_command_count("pump").expect("count"), 5, "the five newest");
        assert!(store.raw_command("pump", "\"9\"").expect("read").is_some());
        assert!(store.raw_command("pump", "\"4\"").expect("read").is_none());
        assert_eq!(store.raw_command_count("fan").expect("count"), 1, "another device's ids stay");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn outbox_entries_come_back_in_sequence_order_per_connection() {
        let dir = temp_dir("outbox");
        let put = |c: &str, seq, r: &[u8]| Op::OutboxPut { connection: c.into(), seq, record: r.to_vec() };
        {
            let store = Store::open(&dir).expect("open");
            store.apply(vec![put("a", 2, b"two"), put("a", 1, b"one"), put("b", 1, b"other"), put("a", 3, b"three")]).await.expect("write");
            store.submit(vec![Op::OutboxRemove { connection: "a".into(), seqs: vec![2] }], false);
            store.close().await;
        }
        let store = Store::open(&dir).expect("reopen");
        let mut seen = Vec::new();
        store.outbox_scan("a", |seq, r| seen.push((seq, r.to_vec()))).expect("scan");
        assert_eq!(seen, vec![(1, b"one".to_vec()), (3, b"three".to_vec())]);
        assert_eq!(store.outbox_get("a", &[3, 9]).expect("get"), vec![(3, b"three".to_vec())]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_closed_store_refuses_new_work_with_a_clear_error() {
        let dir = temp_dir("closed");
        let store = Store::open(&dir).expect("open");
        store.close().await;
        let e = store.apply(vec![version("a", 1)]).await.expect_err("closed");
        assert!(e.to_string().contains("closed"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
