//! Wiring: build every part from a validated config, run it, shut it down.
//!
//! Start order follows the data flow from the field up: the store, embedded
//! brokers and simulators, bus owners, device actors, MQTT connections, twin
//! adapters. If any step fails, what was already started is stopped again
//! before the error is returned. Every task is spawned through
//! [`Tasks`](crate::lifecycle::Tasks): one that panics or ends on its own is
//! a failure of the gateway ([`Gateway::failed`]).
//!
//! Shutdown goes the other way within one deadline (`shutdown_timeout`,
//! default 10 s), however many devices are dead:
//! 1. adapters stop taking commands (queued ones are answered with a refusal)
//!    and finish the one they are executing;
//! 2. device actors stop polling at once, finish the command they execute,
//!    and refuse what is queued without touching the line;
//! 3. connections flush their outboxes until PUBACK (for what is left of the
//!    deadline, at most a few seconds; what is not acknowledged stays in the
//!    store) and disconnect;
//! 4. bus owners, simulators, the store and embedded brokers stop.
//!
//! What still runs at the deadline is aborted and named in the log.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::{Broker, Config};
use crate::device::spawn_device;
use crate::http::Readiness;
use crate::lifecycle::Tasks;
use crate::modbus::spawn_bus;
use crate::mqtt::{spawn_connection, ConnectionHandle, Inbox, Routes};
use crate::sim::{self, SimHandle};
use crate::store::Store;
use crate::twin::{raw_adapter, run_commands, run_shadow, run_telemetry, shadow_inbox, shadow_topics};

/// The longest part of the stop deadline spent flushing outboxes: what is
/// not acknowledged by then is in the store and goes out after the restart.
const FLUSH_AT_MOST: Duration = Duration::from_secs(3);

/// A running gateway.
#[derive(Debug)]
pub struct Gateway {
    root: Tasks,
    failures: mpsc::UnboundedReceiver<String>,
    adapters: Tasks,
    devices: Tasks,
    connections_tasks: Tasks,
    rest: Tasks,
    connections: Vec<ConnectionHandle>,
    simulators: Vec<(String, SimHandle)>,
    #[cfg(feature = "embedded-broker")]
    brokers: Vec<crate::mqtt::EmbeddedBroker>,
    store: Option<Store>,
    http: Option<std::net::SocketAddr>,
    /// Every device's handle, held for the gateway's life.
    device_handles: Vec<crate::device::DeviceHandle>,
    stop_adapters: CancellationToken,
    stop_devices: CancellationToken,
    stop_connections: CancellationToken,
    stop_simulators: CancellationToken,
    remote_shutdown: CancellationToken,
    shutdown_timeout: Duration,
}

impl Gateway {
    /// Starts everything the config describes; on an error, stops what it
    /// had started and returns the error.
    pub async fn start(config: &Config) -> anyhow::Result<Gateway> {
        // ring is the only provider we build with; installing it explicitly
        // keeps rustls from guessing (it panics if it finds two).
        let _ = rustls::crypto::ring::default_provider().install_default();
        for w in &config.warnings {
            tracing::warn!("{w}");
        }
        let (root, failures) = Tasks::new();
        let mut gateway = Gateway {
            adapters: root.group(),
            devices: root.group(),
            connections_tasks: root.group(),
            rest: root.group(),
            root,
            failures,
            connections: Vec::new(),
            simulators: Vec::new(),
            #[cfg(feature = "embedded-broker")]
            brokers: Vec::new(),
            store: None,
            http: None,
            device_handles: Vec::new(),
            stop_adapters: CancellationToken::new(),
            stop_devices: CancellationToken::new(),
            stop_connections: CancellationToken::new(),
            stop_simulators: CancellationToken::new(),
            remote_shutdown: CancellationToken::new(),
            shutdown_timeout: config.shutdown_timeout,
        };
        match gateway.build(config).await {
            Ok(()) => {
                tracing::info!(
                    devices = config.devices.len(),
                    buses = config.buses.len(),
                    connections = config.connections.len(),
                    "twinbus running (config {})",
                    config.source.display()
                );
                Ok(gateway)
            }
            Err(e) => {
                gateway.shutdown().await;
                Err(e)
            }
        }
    }

    async fn build(&mut self, config: &Config) -> anyhow::Result<()> {
        if config.http.is_some() {
            // Before anything counts: what is counted before the recorder exists is lost.
            crate::http::metrics();
        }
        let store = Store::open(&config.state_dir)?;
        self.store = Some(store.clone());
        // The writer is a thread, not a task: this one stands for it, and
        // ends (a failure, unless stopping) when the thread dies.
        let (store_failed, stop) = (store.failed(), self.stop_connections.clone());
        self.rest.spawn("the state store's writer thread", async move {
            tokio::select! {
                () = store_failed.cancelled() => {}
                () = stop.cancelled() => {}
            }
        });

        let mut connections = config.connections.clone();
        for (index, c) in connections.iter_mut().enumerate() {
            if let Broker::Embedded { listen, access } = &c.broker {
                #[cfg(feature = "embedded-broker")]
                {
                    // The gateway's own login, so that nobody else can use its client id.
                    let login = crate::config::Credentials { username: "twinbus-gateway".to_string(), password: crate::config::Secret::new(fresh_secret()) };
                    let policy = crate::mqtt::Access {
                        gateway: Some((c.client_id.clone(), login.username.clone(), login.password.clone())),
                        users: access.users.clone(),
                        defaults: twin_permissions(config, index),
                        max_connections: access.max_connections,
                    };
                    self.brokers.push(crate::mqtt::EmbeddedBroker::start(*listen, policy)?);
                    tracing::info!(connection = %c.name, %listen, users = access.users.len(), "embedded MQTT broker listening");
                    c.credentials = Some(login);
                }
                #[cfg(not(feature = "embedded-broker"))]
                anyhow::bail!("connection `{}` uses the embedded broker ({listen}), but this build has no `embedded-broker` feature", c.name);
            }
        }

        for s in &config.simulators {
            let (handle, task) = sim::start_with_task(s, self.stop_simulators.clone()).await?;
            self.simulators.push((s.name.clone(), handle));
            self.rest.spawn(&format!("simulator {}", s.name), async move {
                let _ = task.await;
            });
        }

        let buses: Vec<_> = config.buses.iter().map(|b| spawn_bus(b.clone(), &self.rest)).collect();
        let mut devices = Vec::new();
        for d in &config.devices {
            let bus = &config.buses[d.bus];
            devices.push(spawn_device(d, buses[d.bus].clone(), bus.retries, &self.devices, self.stop_devices.clone()));
        }
        drop(buses); // each bus owner ends when its last device actor does

        let mut routes: Vec<Routes> = vec![HashMap::new(); config.connections.len()];
        let mut raw_workers = HashMap::new();
        let mut shadow_inboxes = HashMap::new();
        for d in &config.devices {
            let Some(t) = &d.twin else { continue };
            if let (Some(topic), Some((inbox, worker))) = (&t.commands, raw_adapter(t, &d.name, store.clone())) {
                routes[t.connection].insert(topic.clone(), inbox as Arc<dyn Inbox>);
                raw_workers.insert(d.name.clone(), worker);
            }
            for s in &t.shadows {
                let (route, inbox) = shadow_inbox();
                for topic in shadow_topics(s) {
                    routes[t.connection].insert(topic, route.clone() as Arc<dyn Inbox>);
                }
                shadow_inboxes.insert((d.name.clone(), s.prefix()), inbox);
            }
        }
        for (c, r) in connections.iter().zip(routes) {
            let handle = spawn_connection(c, r, store.clone(), &self.connections_tasks, self.stop_connections.clone())
                .await
                .with_context(|| format!("connection `{}`", c.name))?;
            self.connections.push(handle);
        }

        for (d, device) in config.devices.iter().zip(&devices) {
            let Some(twin) = &d.twin else { continue };
            let conn = self.connections[twin.connection].clone();
            if let Some(worker) = raw_workers.remove(&d.name) {
                let task = run_commands(twin.clone(), worker, device.clone(), conn.clone(), self.stop_adapters.clone(), self.remote_shutdown.clone());
                self.adapters.spawn(&format!("commands of {}", d.name), task);
            }
            for binding in &twin.shadows {
                let Some(inbox) = shadow_inboxes.remove(&(d.name.clone(), binding.prefix())) else { continue };
                let task = run_shadow(binding.clone(), d.commands.clone(), device.clone(), conn.clone(), store.clone(), inbox, self.stop_adapters.clone());
                self.adapters.spawn(&format!("shadow {} of {}", binding.prefix(), d.name), task);
            }
            if twin.telemetry.is_some() {
                self.adapters.spawn(&format!("telemetry of {}", d.name), run_telemetry(twin.clone(), device.clone(), conn, self.stop_adapters.clone()));
            }
        }

        if let Some(http) = &config.http {
            let readiness = Readiness {
                connections: self.connections.iter().map(|c| (c.name.clone(), c.sessions())).collect(),
                connected: self.connections.iter().map(|c| (c.name.clone(), c.connected())).collect(),
                devices: devices.iter().map(|d| (d.name.clone(), d.watch())).collect(),
            };
            let addr = crate::http::start(http, readiness, &self.rest, self.stop_connections.clone()).await?;
            tracing::info!("metrics on http://{addr}/metrics, health on /healthz and /readyz");
            self.http = Some(addr);
        }
        // A device actor ends when the last handle to it is gone: a device
        // without a twin (polled for the console and metrics only) must live on.
        self.device_handles = devices;
        Ok(())
    }

    /// Where the HTTP listener (metrics, health) listens, if configured.
    pub fn http_addr(&self) -> Option<std::net::SocketAddr> {
        self.http
    }

    /// Waits until every connection is up with its subscriptions acknowledged
    /// (commands published from then on reach their twins). Returns false on timeout.
    pub async fn wait_ready(&self, timeout: Duration) -> bool {
        let all = async {
            for c in &self.connections {
                let mut sessions = c.sessions();
                if sessions.wait_for(|n| *n > 0).await.is_err() {
                    return;
                }
            }
        };
        tokio::time::timeout(timeout, all).await.is_ok()
    }

    /// A probe of the gateway's own machinery, for the service manager's
    /// watchdog (see [`Liveness`]).
    pub fn liveness(&self) -> Liveness {
        Liveness { store: self.store.clone() }
    }

    /// Fires when a twin allowed to do so sent `{"shutdown": true}`.
    pub fn remote_shutdown(&self) -> CancellationToken {
        self.remote_shutdown.clone()
    }

    /// Resolves when a part of the gateway failed (a task panicked or ended
    /// on its own, the store's writer died), with what failed.
    pub async fn failed(&mut self) -> String {
        self.failures.recv().await.unwrap_or_else(|| "the gateway's tasks are gone".to_string())
    }

    /// A simulator started by the config, by name.
    pub fn simulator(&self, name: &str) -> Option<&SimHandle> {
        self.simulators.iter().find(|(n, _)| n == name).map(|(_, s)| s)
    }

    /// Stops everything in order within `shutdown_timeout`; see the module
    /// docs. Returns true when everything stopped by itself (nothing had to
    /// be aborted at the deadline).
    pub async fn shutdown(self) -> bool {
        let started = Instant::now();
        let deadline = started + self.shutdown_timeout;
        let left = || deadline.saturating_duration_since(Instant::now());
        // Keep some of the deadline for the flush, unless it is short.
        let flush = FLUSH_AT_MOST.min(self.shutdown_timeout / 3);
        tracing::info!(deadline = ?self.shutdown_timeout, "shutting down: no new commands");
        self.root.stopping();

        self.stop_adapters.cancel();
        self.stop_devices.cancel();
        let mut clean = self.adapters.wait(left().saturating_sub(flush)).await;
        clean &= self.devices.wait(left().saturating_sub(flush)).await;
        if !clean {
            tracing::warn!("a command was still running when the time to finish commands was up; it is abandoned");
        }

        // In parallel: each waits for its PUBACKs.
        let flush_for = left().saturating_sub(Duration::from_millis(300)).min(flush.max(Duration::from_millis(500)));
        let mut closing = tokio::task::JoinSet::new();
        for c in self.connections {
            closing.spawn(async move { c.close(flush_for).await });
        }
        while closing.join_next().await.is_some() {}
        self.stop_connections.cancel();
        self.stop_simulators.cancel();
        clean &= self.connections_tasks.wait(left()).await;
        clean &= self.rest.wait(left()).await;
        if let Some(store) = &self.store {
            store.close().await;
        }
        #[cfg(feature = "embedded-broker")]
        for b in self.brokers {
            b.stop();
        }
        let aborted = self.root.abort_all();
        if aborted.is_empty() && clean {
            tracing::info!(took = ?started.elapsed(), "stopped");
            true
        } else {
            tracing::warn!(took = ?started.elapsed(), aborted = ?aborted, "stopped; these were still running at the deadline and were aborted");
            false
        }
    }
}

/// What clients of an embedded broker may do by default: publish the
/// commands and shadow documents of the twins on connection `index`, and
/// subscribe to their answers, telemetry, presence and shadows.
#[cfg(feature = "embedded-broker")]
fn twin_permissions(config: &Config, index: usize) -> crate::mqtt::Permissions {
    let mut p = crate::mqtt::Permissions::default();
    if let Some(presence) = &config.connections[index].presence {
        p.subscribe.push(presence.topic.clone());
    }
    for twin in config.devices.iter().filter_map(|d| d.twin.as_ref()).filter(|t| t.connection == index) {
        p.publish.extend(twin.commands.iter().cloned());
        p.subscribe.extend(twin.responses.iter().chain(&twin.telemetry).chain(&twin.response_topics).cloned());
        for s in &twin.shadows {
            let all = format!("{}/#", s.prefix());
            p.publish.push(all.clone());
            p.subscribe.push(all);
        }
    }
    p
}

/// 128 random bits as hex, from the kernel.
#[cfg(feature = "embedded-broker")]
fn fresh_secret() -> String {
    use std::io::Read as _;
    let mut bytes = [0u8; 16];
    let read = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes));
    if read.is_err() {
        // No /dev/urandom (not Linux): the hasher's per-process random keys.
        use std::hash::{BuildHasher, Hasher};
        for (i, chunk) in bytes.chunks_mut(8).enumerate() {
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_usize(i);
            chunk.copy_from_slice(&h.finish().to_le_bytes());
        }
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether the gateway's own machinery turns: what a watchdog should restart
/// the process for. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Liveness {
    store: Option<Store>,
}

impl Liveness {
    /// `Ok` when the runtime runs a newly spawned task and the store's writer
    /// thread commits an (empty, not synced) batch; else what did not. Dead
    /// devices and an unreachable broker do not count: a restart would not
    /// change them, and the gateway recovers from them by itself.
    pub async fn check(&self) -> Result<(), String> {
        tokio::spawn(async {}).await.map_err(|e| format!("the runtime cannot run a task: {e}"))?;
        if let Some(store) = &self.store {
            store.submit(Vec::new(), false).await.map_err(|e| format!("the state store: {e:#}"))?;
        }
        Ok(())
    }
}
