//! Wiring: build every part from a validated config, run it, shut it down.
//!
//! Start order follows the data flow from the field up: embedded brokers and
//! simulators, bus owners, device actors, MQTT connections, twin adapters.
//! Shutdown goes the other way, so that nothing in flight is cut off:
//! 1. adapters stop taking commands (queued ones are answered with a refusal)
//!    and finish the one they are executing;
//! 2. device actors finish what they were asked and stop polling;
//! 3. connections flush their answers (until PUBACK, at most 2 s) and disconnect;
//! 4. bus owners, simulators and embedded brokers stop.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Broker, Config};
use crate::device::{spawn_device, DeviceHandle};
use crate::modbus::spawn_bus;
use crate::mqtt::{spawn_connection, ConnectionHandle, Route, Routes};
use crate::sim::{self, SimHandle};
use crate::store::Store;
use crate::twin::{run_commands, run_shadow, run_telemetry, shadow_topics, ShadowInbox};

/// How long shutdown waits for answers to reach the broker.
const FLUSH_DEADLINE: Duration = Duration::from_secs(2);
/// How long shutdown waits for a command on the wire to finish.
const COMMAND_DEADLINE: Duration = Duration::from_secs(10);

/// A running gateway.
#[derive(Debug)]
pub struct Gateway {
    adapters: TaskTracker,
    devices: Vec<(DeviceHandle, tokio::task::JoinHandle<()>)>,
    connections: Vec<ConnectionHandle>,
    simulators: Vec<(String, SimHandle)>,
    simulator_tasks: Vec<tokio::task::JoinHandle<()>>,
    #[cfg(feature = "embedded-broker")]
    brokers: Vec<crate::mqtt::EmbeddedBroker>,
    stop_adapters: CancellationToken,
    stop_devices: CancellationToken,
    stop_connections: CancellationToken,
    stop_simulators: CancellationToken,
    remote_shutdown: CancellationToken,
}

impl Gateway {
    /// Starts everything the config describes.
    pub async fn start(config: &Config) -> anyhow::Result<Gateway> {
        // ring is the only provider we build with; installing it explicitly
        // keeps rustls from guessing (it panics if it finds two).
        let _ = rustls::crypto::ring::default_provider().install_default();
        for w in &config.warnings {
            tracing::warn!("{w}");
        }
        let stop_simulators = CancellationToken::new();
        let stop_adapters = CancellationToken::new();
        let stop_devices = CancellationToken::new();
        let stop_connections = CancellationToken::new();
        let remote_shutdown = CancellationToken::new();

        #[cfg(feature = "embedded-broker")]
        let mut brokers = Vec::new();
        for c in &config.connections {
            if let Broker::Embedded { listen } = &c.broker {
                #[cfg(feature = "embedded-broker")]
                {
                    brokers.push(crate::mqtt::EmbeddedBroker::start(*listen)?);
                    tracing::info!(connection = %c.name, %listen, "embedded MQTT broker listening");
                }
                #[cfg(not(feature = "embedded-broker"))]
                anyhow::bail!("connection `{}` uses the embedded broker ({listen}), but this build has no `embedded-broker` feature", c.name);
            }
        }

        let mut simulators = Vec::new();
        let mut simulator_tasks = Vec::new();
        for s in &config.simulators {
            let (handle, task) = sim::start_with_task(s, stop_simulators.clone()).await?;
            simulators.push((s.name.clone(), handle));
            simulator_tasks.push(task);
        }

        let buses: Vec<_> = config.buses.iter().map(|b| spawn_bus(b.clone())).collect();
        let mut devices = Vec::new();
        for d in &config.devices {
            let bus = &config.buses[d.bus];
            devices.push(spawn_device(d, buses[d.bus].clone(), bus.retries, stop_devices.clone()));
        }
        drop(buses); // each bus owner ends when its last device actor does

        let mut routes: Vec<Routes> = vec![HashMap::new(); config.connections.len()];
        let mut inboxes = HashMap::new();
        let mut shadow_inboxes = HashMap::new();
        for d in &config.devices {
            let Some(t) = &d.twin else { continue };
            if let Some(topic) = &t.commands {
                let (tx, rx) = mpsc::channel(64);
                routes[t.connection].insert(topic.clone(), Route::new(tx));
                inboxes.insert(d.name.clone(), rx);
            }
            if let Some(s) = &t.shadow {
                let (tx, rx) = mpsc::channel(64);
                let overflow = Arc::new(Notify::new());
                for topic in shadow_topics(s) {
                    routes[t.connection].insert(topic, Route::with_overflow(tx.clone(), overflow.clone()));
                }
                shadow_inboxes.insert(d.name.clone(), ShadowInbox { messages: rx, overflow });
            }
        }
        let store = match shadow_inboxes.is_empty() {
            true => None,
            false => Some(Store::open(&config.state_dir)?),
        };
        let mut connections = Vec::new();
        for (c, r) in config.connections.iter().zip(routes) {
            let handle = spawn_connection(c, r, stop_connections.clone()).await.with_context(|| format!("connection `{}`", c.name))?;
            connections.push(handle);
        }

        let adapters = TaskTracker::new();
        for (d, (device, _)) in config.devices.iter().zip(&devices) {
            let Some(twin) = &d.twin else { continue };
            let conn = connections[twin.connection].clone();
            if let Some(inbox) = inboxes.remove(&d.name) {
                adapters.spawn(run_commands(twin.clone(), device.clone(), conn.clone(), inbox, stop_adapters.clone(), remote_shutdown.clone()));
            }
            if let (Some(binding), Some(inbox), Some(store)) = (&twin.shadow, shadow_inboxes.remove(&d.name), &store) {
                adapters.spawn(run_shadow(binding.clone(), d.commands.clone(), device.clone(), conn.clone(), store.clone(), inbox, stop_adapters.clone()));
            }
            adapters.spawn(run_telemetry(twin.clone(), device.clone(), conn, stop_adapters.clone()));
        }
        adapters.close();
        tracing::info!(
            devices = config.devices.len(),
            buses = config.buses.len(),
            connections = config.connections.len(),
            "twinbus running (config {})",
            config.source.display()
        );
        Ok(Gateway {
            adapters,
            devices,
            connections,
            simulators,
            simulator_tasks,
            #[cfg(feature = "embedded-broker")]
            brokers,
            stop_adapters,
            stop_devices,
            stop_connections,
            stop_simulators,
            remote_shutdown,
        })
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

    /// Fires when a twin allowed to do so sent `{"shutdown": true}`.
    pub fn remote_shutdown(&self) -> CancellationToken {
        self.remote_shutdown.clone()
    }

    /// A simulator started by the config, by name.
    pub fn simulator(&self, name: &str) -> Option<&SimHandle> {
        self.simulators.iter().find(|(n, _)| n == name).map(|(_, s)| s)
    }

    /// Stops everything in order; see the module docs.
    pub async fn shutdown(self) {
        tracing::info!("shutting down: no new commands");
        self.stop_adapters.cancel();
        if tokio::time::timeout(COMMAND_DEADLINE, self.adapters.wait()).await.is_err() {
            tracing::warn!("a command was still running after {COMMAND_DEADLINE:?}; it was abandoned");
        }
        self.stop_devices.cancel();
        for (device, task) in self.devices {
            if tokio::time::timeout(COMMAND_DEADLINE, task).await.is_err() {
                tracing::warn!(device = %device.name, "device actor did not stop in time");
            }
        }
        // In parallel: each waits up to its deadline for PUBACKs.
        let mut closing = tokio::task::JoinSet::new();
        for c in self.connections {
            closing.spawn(async move { c.close(FLUSH_DEADLINE).await });
        }
        while closing.join_next().await.is_some() {}
        self.stop_connections.cancel();
        self.stop_simulators.cancel();
        for task in self.simulator_tasks {
            let _ = task.await; // its port is free once it returns
        }
        #[cfg(feature = "embedded-broker")]
        for b in self.brokers {
            b.stop();
        }
        tracing::info!("stopped");
    }
}
