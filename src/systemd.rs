//! Talking to systemd: readiness, the watchdog, and the start of a stop.
//!
//! Under `Type=notify` (deploy/twinbus.service) the service manager waits for
//! `READY=1` before it calls the service started. `twinbus run` sends it once
//! `Gateway::start` has returned: the store is open, every listener is bound
//! and every actor runs. The broker may still be unreachable and devices may
//! be dead: those are reported by `/readyz`, and a gateway that keeps trying
//! is what should run there, not a failed start. `STOPPING=1` goes out when a
//! graceful stop begins, with the reason in `STATUS=`.
//!
//! With `WatchdogSec=`, systemd expects `WATCHDOG=1` at least that often and
//! restarts the service when the pings stop. [`spawn_watchdog`] sends one
//! every half period, and only after a health probe passed within that half
//! period. What the probe asks is whether the gateway's *own machinery* turns
//! ([`Liveness::check`](crate::gateway::Liveness::check)): the runtime runs a
//! new task, and the store's writer thread commits a batch. A runtime whose
//! threads are all blocked, or a writer stuck on a hung disk, stops the pings
//! and gets the process restarted. Dead field devices and an unreachable
//! broker are not part of it: a restart would not bring them back, and the
//! gateway already recovers from them by itself (polling with backoff,
//! reconnecting); they show in `/readyz`, the metrics and the log. A part of
//! the gateway that panics or ends is not the watchdog's business either: the
//! gateway stops and exits with status 2 (see `lifecycle`). Once the stop has
//! begun, the pings go on while the runtime runs (the store is closing by
//! then), so that a long drain is bounded by `TimeoutStopSec=`, not cut by
//! the watchdog.
//!
//! The `sd-notify` crate speaks the protocol: pure Rust over `libc` (already
//! a dependency), a no-op when `NOTIFY_SOCKET` is unset (a terminal, Docker,
//! tests). A notification that cannot be sent is logged, never fatal.

use std::future::Future;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// One line of the notification protocol (a subset of `sd_notify(3)`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Note<'a> {
    /// `READY=1`: start-up is complete.
    Ready,
    /// `STOPPING=1`: a graceful stop has begun.
    Stopping,
    /// `RELOADING=1` with the monotonic time: a reload has begun (`READY=1`
    /// ends it), as `Type=notify-reload` wants and `Type=notify` accepts.
    Reloading,
    /// `WATCHDOG=1`: still alive.
    Watchdog,
    /// `STATUS=...`: free text, shown by `systemctl status`.
    Status(&'a str),
}

/// Sends `notes` to the service manager, if there is one (`NOTIFY_SOCKET`).
pub fn notify(notes: &[Note<'_>]) {
    #[cfg(unix)]
    {
        use sd_notify::NotifyState;
        let mut states: Vec<NotifyState<'_>> = Vec::new();
        for n in notes {
            match *n {
                Note::Ready => states.push(NotifyState::Ready),
                Note::Stopping => states.push(NotifyState::Stopping),
                Note::Watchdog => states.push(NotifyState::Watchdog),
                Note::Status(s) => states.push(NotifyState::Status(s)),
                Note::Reloading => {
                    states.push(NotifyState::Reloading);
                    states.extend(NotifyState::monotonic_usec_now().ok());
                }
            }
        }
        if let Err(e) = sd_notify::notify(&states) {
            tracing::warn!("cannot notify the service manager ({notes:?}): {e}");
        }
    }
    #[cfg(not(unix))]
    let _ = notes;
}

/// The watchdog period systemd asked for (`WATCHDOG_USEC`, for this process).
pub fn watchdog_period() -> Option<Duration> {
    #[cfg(unix)]
    return sd_notify::watchdog_enabled().filter(|d| !d.is_zero());
    #[cfg(not(unix))]
    None
}

/// The watchdog task; aborted when dropped.
#[derive(Debug)]
pub struct Watchdog {
    stopping: CancellationToken,
    task: JoinHandle<()>,
}

impl Watchdog {
    /// The stop has begun: from now on, ping while the runtime runs, without
    /// the probe (the parts it looks at are being closed).
    pub fn stopping(&self) {
        self.stopping.cancel();
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts pinging the watchdog every half `period` while `probe` passes
/// within that half period; `None` when systemd set no watchdog.
pub fn spawn_watchdog<P, F>(probe: P) -> Option<Watchdog>
where
    P: Fn() -> F + Send + 'static,
    F: Future<Output = Result<(), String>> + Send + 'static,
{
    let period = watchdog_period()?;
    let every = period / 2;
    tracing::info!(?period, "systemd watchdog on: pinging every {every:?} while the gateway's runtime and store answer");
    let stopping = CancellationToken::new();
    let task = tokio::spawn(run_watchdog(every, probe, stopping.clone(), |n: &[Note<'_>]| notify(n)));
    Some(Watchdog { stopping, task })
}

/// The watchdog loop, with the sending left to `send` (tests record it).
async fn run_watchdog<P, F>(every: Duration, probe: P, stopping: CancellationToken, mut send: impl FnMut(&[Note<'_>]))
where
    P: Fn() -> F,
    F: Future<Output = Result<(), String>>,
{
    // The reason of the current miss, logged once per episode.
    let mut failing: Option<String> = None;
    loop {
        let started = Instant::now();
        let verdict = if stopping.is_cancelled() {
            Ok(())
        } else {
            match tokio::time::timeout(every, probe()).await {
                Ok(v) => v,
                Err(_) => Err(format!("the gateway's runtime or store did not answer within {every:?}")),
            }
        };
        match verdict {
            Ok(()) => {
                if failing.take().is_some() {
                    tracing::info!("watchdog: the gateway answers again");
                    send(&[Note::Status("running"), Note::Watchdog]);
                } else {
                    send(&[Note::Watchdog]);
                }
            }
            Err(why) => {
                if failing.as_deref() != Some(why.as_str()) {
                    tracing::error!("watchdog: {why}; not pinging systemd, which restarts the service if this lasts past WatchdogSec");
                    send(&[Note::Status(&format!("unhealthy: {why}"))]);
                }
                failing = Some(why);
            }
        }
        tokio::time::sleep_until(started + every).await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    use super::*;

    fn recorder() -> (Arc<Mutex<Vec<String>>>, impl FnMut(&[Note<'_>])) {
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = log.clone();
        (log, move |notes: &[Note<'_>]| sink.lock().unwrap().push(format!("{notes:?}")))
    }

    #[tokio::test]
    async fn pings_stop_while_the_probe_fails_or_hangs_and_come_back_after() {
        let (log, send) = recorder();
        let healthy = Arc::new(AtomicBool::new(true));
        let hang = Arc::new(AtomicBool::new(false));
        let (h, g) = (healthy.clone(), hang.clone());
        let probe = move || {
            let (ok, hang) = (h.load(Ordering::SeqCst), g.load(Ordering::SeqCst));
            async move {
                if hang {
                    std::future::pending::<()>().await;
                }
                if ok {
                    Ok(())
                } else {
                    Err("the store's writer is gone".to_string())
                }
            }
        };
        let stopping = CancellationToken::new();
        let every = Duration::from_millis(50);
        let task = tokio::spawn(run_watchdog(every, probe, stopping.clone(), send));
        let pings = || log.lock().unwrap().iter().filter(|l| l.contains("Watchdog")).count();
        let wait = || tokio::time::sleep(every * 6);

        wait().await;
        assert!(pings() >= 3, "pings while healthy: {}", pings());
        healthy.store(false, Ordering::SeqCst);
        wait().await; // the probe in flight may still have passed
        let before = pings();
        wait().await;
        assert_eq!(pings(), before, "no ping while the probe fails");
        assert_eq!(log.lock().unwrap().iter().filter(|l| l.contains("unhealthy: the store's writer is gone")).count(), 1, "told once");
        healthy.store(true, Ordering::SeqCst);
        hang.store(true, Ordering::SeqCst);
        wait().await;
        let before = pings();
        wait().await;
        assert_eq!(pings(), before, "no ping while the probe hangs");
        assert!(log.lock().unwrap().iter().any(|l| l.contains("did not answer within 50ms")));
        hang.store(false, Ordering::SeqCst);
        wait().await;
        assert!(pings() > before, "pings again once the probe passes");
        assert!(log.lock().unwrap().iter().any(|l| l.contains("Status(\"running\")")));

        // Stopping: the probe is no longer asked.
        healthy.store(false, Ordering::SeqCst);
        stopping.cancel();
        wait().await;
        let before = pings();
        wait().await;
        assert!(pings() >= before + 3, "pings go on during the stop");
        task.abort();
    }

    #[test]
    fn without_a_notify_socket_nothing_happens() {
        // The test process is not a systemd service.
        if std::env::var_os("NOTIFY_SOCKET").is_none() {
            notify(&[Note::Ready, Note::Status("x")]);
        }
    }
}
