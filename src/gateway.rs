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
//!
//! A reload ([`Gateway::reload`]) applies a [`crate::reload::Plan`]: each
//! device is a unit (its actor and adapters, its own stop tokens and task
//! groups, the topics it routes), so that one can be stopped the same way
//! the whole gateway is, and started again, while the others and every
//! connection run on untouched.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::{Broker, Bus, Config, Device, ShadowBinding};
use crate::device::{spawn_device, DeviceHandle, Directory};
use crate::http::Readiness;
use crate::lifecycle::Tasks;
use crate::modbus::{spawn_bus, BusHandle};
use crate::mqtt::{spawn_connection, ConnectionHandle, Inbox, Routes};
use crate::reload::Plan;
use crate::sim::{self, SimHandle};
use crate::store::Store;
use crate::twin::{raw_adapter, run_commands, run_shadow, run_telemetry, shadow_inbox, shadow_topics, RawWorker, ShadowInbox};

/// The longest part of the stop deadline spent flushing outboxes: what is
/// not acknowledged by then is in the store and goes out after the restart.
const FLUSH_AT_MOST: Duration = Duration::from_secs(3);

/// A running gateway.
#[derive(Debug)]
pub struct Gateway {
    root: Tasks,
    failures: mpsc::UnboundedReceiver<String>,
    connections_tasks: Tasks,
    rest: Tasks,
    connections: Vec<ConnectionHandle>,
    buses: HashMap<String, BusUnit>,
    devices: BTreeMap<String, DeviceUnit>,
    /// What readiness looks at; follows `devices`.
    directory: Directory,
    simulators: Vec<(String, SimHandle)>,
    /// Embedded brokers, by the index of their connection.
    #[cfg(feature = "embedded-broker")]
    brokers: Vec<(usize, crate::mqtt::EmbeddedBroker)>,
    store: Option<Store>,
    http: Option<std::net::SocketAddr>,
    /// The local web console, when configured; told about every reload.
    console: Option<crate::console::Console>,
    /// The config running now.
    config: Config,
    stop_adapters: CancellationToken,
    stop_devices: CancellationToken,
    stop_connections: CancellationToken,
    stop_simulators: CancellationToken,
    remote_shutdown: CancellationToken,
}

/// A bus owner, held open by the gateway while the bus is in the config.
#[derive(Debug)]
struct BusUnit {
    config: Bus,
    handle: BusHandle,
    tasks: Tasks,
}

/// One device: its actor, its twin's adapters, and the topics they route.
#[derive(Debug)]
struct DeviceUnit {
    handle: DeviceHandle,
    /// Index of its twin's connection, and the topics routed to it there.
    routes: Option<(usize, Vec<String>)>,
    adapters: Tasks,
    actor: Tasks,
    stop_adapters: CancellationToken,
    stop_actor: CancellationToken,
}

/// A device's inboxes, made (and routed) before its adapters run.
struct Inboxes {
    routes: Routes,
    raw: Option<RawWorker>,
    shadows: Vec<(ShadowBinding, ShadowInbox)>,
}

/// What a reload did, for the log and for tests.
#[derive(Debug, Default, PartialEq)]
pub struct Reloaded {
    /// The plan it applied.
    pub plan: Plan,
    /// Units that were still finishing a command at the deadline; they were
    /// told to stop and end on their own.
    pub slow: Vec<String>,
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
        let stop_adapters = CancellationToken::new();
        let mut gateway = Gateway {
            connections_tasks: root.group(),
            rest: root.group(),
            root,
            failures,
            connections: Vec::new(),
            buses: HashMap::new(),
            devices: BTreeMap::new(),
            directory: Directory::default(),
            simulators: Vec::new(),
            #[cfg(feature = "embedded-broker")]
            brokers: Vec::new(),
            store: None,
            http: None,
            console: None,
            config: config.clone(),
            stop_adapters,
            stop_devices: CancellationToken::new(),
            stop_connections: CancellationToken::new(),
            stop_simulators: CancellationToken::new(),
            remote_shutdown: CancellationToken::new(),
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
                    self.brokers.push((index, crate::mqtt::EmbeddedBroker::start(*listen, policy)?));
                    tracing::info!(connection = %c.name, %listen, users = access.users.len(), "embedded MQTT broker listening");
                    c.credentials = Some(login);
                }
                #[cfg(not(feature = "embedded-broker"))]
                {
                    let _ = (index, access);
                    anyhow::bail!("connection `{}` uses the embedded broker ({listen}), but this build has no `embedded-broker` feature", c.name);
                }
            }
        }

        for s in &config.simulators {
            let (handle, task) = sim::start_with_task(s, self.stop_simulators.clone()).await?;
            self.simulators.push((s.name.clone(), handle));
            self.rest.spawn(&format!("simulator {}", s.name), async move {
                let _ = task.await;
            });
        }

        for b in &config.buses {
            self.start_bus(b);
        }
        let mut routes: Vec<Routes> = vec![HashMap::new(); config.connections.len()];
        let mut inboxes = Vec::new();
        for d in &config.devices {
            let mut i = inboxes_of(d, &store, true);
            if let Some(t) = &d.twin {
                routes[t.connection].extend(std::mem::take(&mut i.routes));
            }
            inboxes.push(i);
        }
        for (c, r) in connections.iter().zip(routes) {
            let handle = spawn_connection(c, r, store.clone(), &self.connections_tasks, self.stop_connections.clone())
                .await
                .with_context(|| format!("connection `{}`", c.name))?;
            self.connections.push(handle);
        }
        for (d, i) in config.devices.iter().zip(inboxes) {
            self.start_device(config, d, i, &store);
        }

        if let Some(http) = &config.http {
            let readiness = Readiness {
                connections: self.connections.iter().map(|c| (c.name.clone(), c.sessions())).collect(),
                connected: self.connections.iter().map(|c| (c.name.clone(), c.connected())).collect(),
                devices: self.directory.clone(),
            };
            let console = http.console.map(|c| crate::console::Console::start(config, c, self.directory.clone(), &self.connections, &self.rest, self.stop_connections.clone()));
            let addr = crate::http::start(http, readiness, console.clone(), &self.rest, self.stop_connections.clone()).await?;
            tracing::info!("metrics on http://{addr}/metrics, health on /healthz and /readyz");
            if console.is_some() {
                tracing::info!("console: open http://{addr}/console/ in a browser");
            }
            self.console = console;
            self.http = Some(addr);
        }
        Ok(())
    }

    fn start_bus(&mut self, b: &Bus) {
        let tasks = self.rest.group();
        let handle = spawn_bus(b.clone(), &tasks);
        self.buses.insert(b.name.clone(), BusUnit { config: b.clone(), handle, tasks });
    }

    /// Starts a device's actor and its twin's adapters; its topics are
    /// already routed to `inboxes`.
    fn start_device(&mut self, config: &Config, d: &Device, inboxes: Inboxes, store: &Store) {
        let Some(bus) = config.buses.get(d.bus).and_then(|b| self.buses.get(&b.name)) else {
            // Validation ties every device to a bus of the same config.
            tracing::error!(device = %d.name, "device not started: its bus is not running");
            return;
        };
        let (actor, adapters) = (self.root.group(), self.root.group());
        let (stop_actor, stop_adapters) = (self.stop_devices.child_token(), self.stop_adapters.child_token());
        let device = spawn_device(d, bus.handle.clone(), bus.config.retries, &actor, stop_actor.clone());
        let mut routes = None;
        if let Some(twin) = &d.twin {
            let conn = self.connections[twin.connection].clone();
            routes = Some((twin.connection, topics_of(d)));
            if let Some(worker) = inboxes.raw {
                let task = run_commands(twin.clone(), worker, device.clone(), conn.clone(), stop_adapters.clone(), self.remote_shutdown.clone());
                adapters.spawn(&format!("commands of {}", d.name), task);
            }
            for (binding, inbox) in inboxes.shadows {
                let name = format!("shadow {} of {}", binding.prefix(), d.name);
                let task = run_shadow(binding, d.commands.clone(), device.clone(), conn.clone(), store.clone(), inbox, stop_adapters.clone());
                adapters.spawn(&name, task);
            }
            if twin.telemetry.is_some() {
                adapters.spawn(&format!("telemetry of {}", d.name), run_telemetry(twin.clone(), device.clone(), conn, stop_adapters.clone()));
            }
        }
        self.directory.write().unwrap_or_else(std::sync::PoisonError::into_inner).insert(d.name.clone(), device.clone());
        // A device actor ends when the last handle to it is gone: the unit's
        // keeps one without a twin (polled for the console and metrics) alive.
        self.devices.insert(d.name.clone(), DeviceUnit { handle: device, routes, adapters, actor, stop_adapters, stop_actor });
    }

    /// Applies a new, validated config: starts added devices and buses,
    /// stops removed ones, restarts changed ones; leaves the others, and
    /// every connection, as they run. `Err` lists what needs a restart
    /// instead; then nothing changed.
    pub async fn reload(&mut self, new: Config) -> Result<Reloaded, Vec<String>> {
        let plan = crate::reload::plan(&self.config, &new)?;
        for w in &plan.warnings {
            tracing::warn!("reload: {w}");
        }
        let Some(store) = self.store.clone() else { return Err(vec!["the gateway is not running".to_string()]) };
        let restarted: Vec<&str> = plan.restart_devices.iter().map(|(n, _)| n.as_str()).collect();
        let leaving: Vec<String> = plan.remove_devices.iter().map(String::as_str).chain(restarted.iter().copied()).map(str::to_string).collect();
        let arriving: Vec<&Device> = new.devices.iter().filter(|d| plan.add_devices.contains(&d.name) || restarted.contains(&d.name.as_str())).collect();

        // The leaving units' tasks may end from here on: swapping the routes
        // closes their inboxes, and an adapter whose inbox closed finishes
        // what it holds and returns, which is not a failure during a reload.
        for name in &leaving {
            if let Some(u) = self.devices.get(name) {
                u.adapters.stopping();
                u.actor.stopping();
            }
        }

        // Routes first, in one step per connection: a restarted device's
        // topics change hands without a gap (what arrives meanwhile waits in
        // the new inboxes), removed ones are unsubscribed, added ones subscribed.
        let mut add: Vec<Routes> = vec![HashMap::new(); self.connections.len()];
        let mut remove: Vec<Vec<String>> = vec![Vec::new(); self.connections.len()];
        let mut inboxes = HashMap::new();
        for d in &arriving {
            let mut i = inboxes_of(d, &store, !restarted.contains(&d.name.as_str()));
            if let Some(t) = &d.twin {
                add[t.connection].extend(std::mem::take(&mut i.routes));
            }
            inboxes.insert(d.name.clone(), i);
        }
        for name in &leaving {
            if let Some((c, topics)) = self.devices.get(name).and_then(|u| u.routes.as_ref()) {
                remove[*c].extend(topics.iter().cloned());
            }
        }
        for (c, (a, r)) in add.into_iter().zip(remove).enumerate() {
            if !a.is_empty() || !r.is_empty() {
                self.connections[c].update_routes(a, r).await;
            }
        }

        let timeout = new.shutdown_timeout;
        let units: Vec<(String, DeviceUnit)> = leaving.iter().filter_map(|n| self.devices.remove(n).map(|u| (n.clone(), u))).collect();
        {
            let mut directory = self.directory.write().unwrap_or_else(std::sync::PoisonError::into_inner);
            for (n, _) in &units {
                directory.remove(n);
            }
        }
        let mut slow = stop_units(units, timeout).await;
        for name in plan.remove_buses.iter().chain(&plan.restart_buses) {
            if let Some(bus) = self.buses.remove(name) {
                bus.tasks.stopping();
                drop(bus.handle);
                if !bus.tasks.wait(timeout).await {
                    slow.push(format!("bus {name}"));
                }
            }
        }
        for b in new.buses.iter().filter(|b| plan.add_buses.contains(&b.name) || plan.restart_buses.contains(&b.name)) {
            self.start_bus(b);
        }
        for d in arriving {
            if let Some(i) = inboxes.remove(&d.name) {
                self.start_device(&new, d, i, &store);
            }
        }
        #[cfg(feature = "embedded-broker")]
        for (index, broker) in &self.brokers {
            broker.set_defaults(twin_permissions(&new, *index));
        }
        for w in new.warnings.iter().filter(|w| !self.config.warnings.contains(w)) {
            tracing::warn!("{w}");
        }
        tracing::info!(
            added = ?plan.add_devices,
            removed = ?plan.remove_devices,
            restarted = ?plan.restart_devices,
            unchanged = plan.unchanged,
            "config reloaded from {}",
            new.source.display()
        );
        if !slow.is_empty() {
            tracing::warn!(?slow, "reload: these were still finishing a command when the time was up; they stop on their own");
        }
        self.config = new;
        if let Some(console) = &self.console {
            console.sync(&self.config);
        }
        Ok(Reloaded { plan, slow })
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

    /// A failure already reported, if any, without waiting.
    pub fn failure(&mut self) -> Option<String> {
        self.failures.try_recv().ok()
    }

    /// Resolves when a part of the gateway failed (a task panicked or ended
    /// on its own, the store's writer died), with what failed.
    pub async fn failed(&mut self) -> String {
        self.failures.recv().await.unwrap_or_else(|| "the gateway's tasks are gone".to_string())
    }

    /// A running device, by name.
    pub fn device(&self, name: &str) -> Option<DeviceHandle> {
        self.devices.get(name).map(|u| u.handle.clone())
    }

    /// The running devices (what a reload changes), for readiness and the console.
    pub fn directory(&self) -> Directory {
        self.directory.clone()
    }

    /// A connection, by name.
    pub fn connection(&self, name: &str) -> Option<&ConnectionHandle> {
        self.connections.iter().find(|c| c.name == name)
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
        let timeout = self.config.shutdown_timeout;
        let deadline = started + timeout;
        let left = || deadline.saturating_duration_since(Instant::now());
        // Keep some of the deadline for the flush, unless it is short.
        let flush = FLUSH_AT_MOST.min(timeout / 3);
        tracing::info!(deadline = ?timeout, "shutting down: no new commands");
        self.root.stopping();

        self.stop_adapters.cancel();
        self.stop_devices.cancel();
        let mut clean = true;
        for unit in self.devices.values() {
            clean &= unit.adapters.wait(left().saturating_sub(flush)).await;
        }
        for unit in self.devices.values() {
            clean &= unit.actor.wait(left().saturating_sub(flush)).await;
        }
        if !clean {
            tracing::warn!("a command was still running when the time to finish commands was up; it is abandoned");
        }
        drop(self.devices);
        self.directory.write().unwrap_or_else(std::sync::PoisonError::into_inner).clear();

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
        // Each bus owner ends once its last handle is gone.
        let buses: Vec<Tasks> = self.buses.into_values().map(|b| b.tasks).collect();
        for tasks in &buses {
            clean &= tasks.wait(left()).await;
        }
        clean &= self.rest.wait(left()).await;
        if let Some(store) = &self.store {
            store.close().await;
        }
        #[cfg(feature = "embedded-broker")]
        for (_, b) in self.brokers {
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

/// Stops units as the gateway stops: adapters refuse what is queued and
/// finish the command they run, then the actors finish theirs; at most
/// `timeout` in all. Returns the units that were not done by then.
async fn stop_units(units: Vec<(String, DeviceUnit)>, timeout: Duration) -> Vec<String> {
    let deadline = Instant::now() + timeout;
    let left = || deadline.saturating_duration_since(Instant::now());
    for (_, u) in &units {
        u.adapters.stopping();
        u.actor.stopping();
        u.stop_adapters.cancel();
        u.stop_actor.cancel();
    }
    let mut slow = Vec::new();
    for (name, u) in units {
        let done = u.adapters.wait(left()).await;
        drop(u.handle);
        if !(done && u.actor.wait(left()).await) {
            slow.push(format!("device {name}"));
        }
    }
    slow
}

/// A device's inboxes, one per command topic and shadow, before anything
/// runs: routed first, so that nothing arriving meanwhile is lost.
fn inboxes_of(d: &Device, store: &Store, recover_unfinished: bool) -> Inboxes {
    let mut out = Inboxes { routes: HashMap::new(), raw: None, shadows: Vec::new() };
    let Some(t) = &d.twin else { return out };
    if let (Some(topic), Some((inbox, worker))) = (&t.commands, raw_adapter(t, &d.name, store.clone(), recover_unfinished)) {
        out.routes.insert(topic.clone(), inbox as Arc<dyn Inbox>);
        out.raw = Some(worker);
    }
    for s in &t.shadows {
        let (route, inbox) = shadow_inbox();
        for topic in shadow_topics(s) {
            out.routes.insert(topic, route.clone() as Arc<dyn Inbox>);
        }
        out.shadows.push((s.clone(), inbox));
    }
    out
}

/// The topics a device's twin receives on.
fn topics_of(d: &Device) -> Vec<String> {
    let Some(t) = &d.twin else { return Vec::new() };
    let mut topics: Vec<String> = t.commands.iter().cloned().collect();
    topics.extend(t.shadows.iter().flat_map(shadow_topics));
    topics
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
