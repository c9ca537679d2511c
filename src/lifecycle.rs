//! One lifecycle for every task the gateway runs.
//!
//! Every long-running task is spawned through [`Tasks`], under a name. A task
//! that panics, or ends while the gateway is not stopping, is a failure: it
//! is logged with its name and reported on one channel, and the gateway then
//! stops and exits non-zero, so that the service manager restarts the whole
//! process. (Restarting one task in place was rejected: an actor that
//! panicked may have left its peers waiting on a channel it owned, and a
//! clean process start rebuilds every piece from the config and the store,
//! which is what a restart after a crash must do anyway.) Tasks are grouped
//! (adapters, devices, connections, ...) so that shutdown can wait for one
//! layer before stopping the next; what is still running at the shutdown
//! deadline is aborted and named in the log.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::AbortHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// A group of tasks, sharing the failure channel of the whole gateway.
#[derive(Clone, Debug)]
pub struct Tasks {
    tracker: TaskTracker,
    /// Once fired, this group's tasks that end are expected to: a child of
    /// the root's, so that stopping the gateway stops expecting every group,
    /// and stopping one device (a reload) only its own.
    stopping: CancellationToken,
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    failures: mpsc::UnboundedSender<String>,
    running: Mutex<HashMap<tokio::task::Id, (String, AbortHandle)>>,
}

impl Tasks {
    /// A first group, and the receiving end of the failure channel.
    pub fn new() -> (Tasks, mpsc::UnboundedReceiver<String>) {
        let (failures, rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared { failures, running: Mutex::new(HashMap::new()) });
        (Tasks { tracker: TaskTracker::new(), stopping: CancellationToken::new(), shared }, rx)
    }

    /// Another group reporting to the same channel, stopping with this one.
    pub fn group(&self) -> Tasks {
        Tasks { tracker: TaskTracker::new(), stopping: self.stopping.child_token(), shared: self.shared.clone() }
    }

    /// From now on, a task of this group (or of its subgroups) that ends is
    /// not a failure.
    pub fn stopping(&self) {
        self.stopping.cancel();
    }

    /// Whether [`Tasks::stopping`] was called on this group or above it.
    pub fn is_stopping(&self) -> bool {
        self.stopping.is_cancelled()
    }

    /// Runs `task` under `name`, watched.
    pub fn spawn<F>(&self, name: &str, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        // The task runs on its own so that a panic reaches us as a JoinError
        // instead of unwinding through the watcher.
        let inner = tokio::spawn(task);
        let id = inner.id();
        lock(&self.shared.running).insert(id, (name.to_string(), inner.abort_handle()));
        let (shared, stopping) = (self.shared.clone(), self.stopping.clone());
        let name = name.to_string();
        self.tracker.spawn(async move {
            let result = inner.await;
            lock(&shared.running).remove(&id);
            let failure = match result {
                Ok(()) if stopping.is_cancelled() => None,
                Ok(()) => Some(format!("{name} ended unexpectedly")),
                Err(e) if e.is_panic() => Some(format!("{name} panicked: {}", panic_message(e.into_panic()))),
                Err(_) => None, // aborted at the shutdown deadline, already logged
            };
            if let Some(f) = failure {
                tracing::error!("{f}");
                let _ = shared.failures.send(f);
            }
        });
    }

    /// Waits for every task of this group, at most `timeout`. Returns false
    /// when some were still running.
    pub async fn wait(&self, timeout: Duration) -> bool {
        self.tracker.close();
        tokio::time::timeout(timeout, self.tracker.wait()).await.is_ok()
    }

    /// Aborts whatever is still running, in every group; returns their names.
    pub fn abort_all(&self) -> Vec<String> {
        let running: Vec<(String, AbortHandle)> = lock(&self.shared.running).drain().map(|(_, v)| v).collect();
        let mut names = Vec::new();
        for (name, handle) in running {
            handle.abort();
            names.push(name);
        }
        names.sort();
        names
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_task_that_panics_or_ends_early_is_reported_by_name() {
        let (tasks, mut failures) = Tasks::new();
        tasks.spawn("device pump-1", async { panic!("boom") });
        let f = failures.recv().await.expect("a failure");
        assert_eq!(f, "device pump-1 panicked: boom");
        tasks.spawn("bus line", async {});
        assert_eq!(failures.recv().await.expect("a failure"), "bus line ended unexpectedly");
    }

    #[tokio::test]
    async fn stopping_one_group_expects_only_its_own_tasks_to_end() {
        let (tasks, mut failures) = Tasks::new();
        let (one, other) = (tasks.group(), tasks.group());
        one.stopping();
        one.spawn("device removed", async {});
        assert!(one.wait(Duration::from_secs(5)).await);
        other.spawn("device kept", async {});
        assert_eq!(failures.recv().await.expect("a failure"), "device kept ended unexpectedly");
    }

    #[tokio::test]
    async fn tasks_ending_during_shutdown_are_not_failures_and_stragglers_are_aborted_by_name() {
        let (tasks, mut failures) = Tasks::new();
        let devices = tasks.group();
        tasks.stopping();
        devices.spawn("device quick", async {});
        devices.spawn("device stuck", std::future::pending());
        assert!(!devices.wait(Duration::from_millis(50)).await, "one is stuck");
        assert_eq!(tasks.abort_all(), vec!["device stuck".to_string()]);
        assert!(devices.wait(Duration::from_secs(5)).await);
        assert!(failures.try_recv().is_err(), "nothing failed");
    }
}
