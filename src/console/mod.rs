//! The local web console: the site at a glance, in a browser.
//!
//! Served on the gateway's one HTTP listener (`http.console: true`), under
//! `/console/`: an overview (connections, buses, devices) and a page per
//! device (every point's live value, type, registers, last change and recent
//! history; the last commands with their outcome). The page is plain HTML,
//! CSS and JavaScript embedded in the binary; it gets the data as JSON and
//! then follows it over server-sent events, one per change and at most a few
//! a second, however many devices poll.
//!
//! Policy:
//! - It is as closed as the listener: beyond loopback every request needs
//!   its login (`twinbus check` refuses the address otherwise).
//! - Writing from it (`console: { write: true }`) needs that login even on
//!   loopback, goes through a cloud command's checks (`check_set`), reads
//!   back, answers like a cloud command, is logged with the login name and
//!   recorded in the device's journal as source `console`. Nothing else in
//!   the console can change the plant.
//! - It never slows the field: it reads snapshots the device actors publish
//!   anyway, keeps its own bounded memory (see `model.rs`), and a page that
//!   is open costs one render per event, never a Modbus transaction.
//!
//! `model.rs` holds the data and its rules, without I/O; `prom.rs` reads the
//! bus and outbox figures back from `/metrics`; `routes.rs` is the HTTP side.

mod model;
mod prom;
mod routes;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Instant, SystemTime};

use futures_util::stream::{BoxStream, SelectAll};
use futures_util::StreamExt as _;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

pub use self::model::{ConnectionInfo, DeviceInfo, Model, HISTORY, PERIODS, SAMPLES, SAMPLE_EVERY};
use crate::config::{Broker, Config, ConsoleSettings};
use crate::device::{directory, DeviceHandle, Directory, Snapshot};
use crate::lifecycle::Tasks;
use crate::mqtt::ConnectionHandle;

/// The console of a running gateway; cheap to clone.
#[derive(Clone, Debug)]
pub struct Console {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    model: Mutex<Model>,
    /// The running devices, as the gateway's reloads change them.
    devices: Directory,
    /// Bumped on every change the overview shows.
    overview: watch::Sender<u64>,
    /// Per device, made when its page first asks: bumped on every change it
    /// shows. Dropped when the device leaves or restarts, which ends its
    /// pages' event streams (the browser then reconnects, afresh).
    pages: Mutex<HashMap<String, watch::Sender<u64>>>,
    /// Tells the follower that the directory changed.
    rescan: Notify,
    settings: ConsoleSettings,
    /// Ends the event streams, so that the listener can stop.
    cancel: CancellationToken,
}

/// One change the follower takes in.
enum Change {
    Snapshot(String, Arc<Snapshot>),
    Journal(String),
    Connection(usize),
}

impl Console {
    /// The console of the devices in `devices` (kept up to date with
    /// [`Console::sync`]) and of `connections` (in the order of
    /// `config.connections`); starts the task that follows them on `tasks`,
    /// until `cancel` fires.
    pub fn start(config: &Config, settings: ConsoleSettings, devices: Directory, connections: &[ConnectionHandle], tasks: &Tasks, cancel: CancellationToken) -> Console {
        let conns = config.connections.iter().map(|c| ConnectionInfo { name: c.name.clone(), broker: broker_text(c) }).collect();
        let (buses, infos) = infos(config, &devices);
        let shared = Arc::new(Shared {
            model: Mutex::new(Model::new(conns, buses, infos)),
            devices,
            overview: watch::Sender::new(0),
            pages: Mutex::new(HashMap::new()),
            rescan: Notify::new(),
            settings,
            cancel: cancel.clone(),
        });
        let console = Console { shared };
        tasks.spawn("console", console.clone().follow(connections.to_vec(), cancel));
        console
    }

    /// Follows a reload: the directory now holds the devices of `config`.
    pub fn sync(&self, config: &Config) {
        let (buses, infos) = infos(config, &self.shared.devices);
        let kept = self.shared.lock().sync(buses, infos);
        // A page of a device that left or restarted starts again, or learns
        // that it is gone.
        self.shared.pages_lock().retain(|name, _| kept.contains(name));
        self.shared.rescan.notify_one();
        self.shared.touch(None);
    }

    /// Follows every running device's snapshots and journal and every
    /// connection's state into the model, and tells the pages; starts over
    /// when the directory changes.
    async fn follow(self, connections: Vec<ConnectionHandle>, cancel: CancellationToken) {
        loop {
            // Asked for before the directory is read: a change from now on
            // is not missed (a notification waits for it).
            let rescan = self.shared.rescan.notified();
            tokio::pin!(rescan);
            let mut changes: SelectAll<BoxStream<'static, Change>> = SelectAll::new();
            let handles: Vec<DeviceHandle> = directory(&self.shared.devices).values().cloned().collect();
            for d in handles {
                let (name, snapshots) = (d.name.clone(), d.watch());
                self.shared.lock().on_snapshot(&name, snapshots.borrow().clone());
                let n = name.clone();
                changes.push(values(snapshots).map(move |s| Change::Snapshot(n.clone(), s)).boxed());
                changes.push(values(d.journal().subscribe()).map(move |_| Change::Journal(name.clone())).boxed());
            }
            for (i, c) in connections.iter().enumerate() {
                let (up, error) = (c.connected(), c.last_error());
                self.shared.lock().on_connection(i, *up.borrow(), error.borrow().clone());
                changes.push(values(up).map(move |_| Change::Connection(i)).boxed());
                changes.push(values(error).map(move |_| Change::Connection(i)).boxed());
            }
            self.shared.touch(None);
            loop {
                let change = tokio::select! {
                    () = cancel.cancelled() => return,
                    () = &mut rescan => break,
                    Some(c) = changes.next(), if !changes.is_empty() => c,
                };
                match change {
                    Change::Snapshot(name, snap) => {
                        self.shared.lock().on_snapshot(&name, snap);
                        self.shared.touch(Some(&name));
                    }
                    Change::Journal(name) => self.shared.touch(Some(&name)),
                    Change::Connection(i) => {
                        if let Some(c) = connections.get(i) {
                            let (up, error) = (*c.connected().borrow(), c.last_error().borrow().clone());
                            self.shared.lock().on_connection(i, up, error);
                        }
                        self.shared.touch(None);
                    }
                }
            }
        }
    }

    /// The console's routes, behind the listener's `login`.
    pub(crate) fn router(&self, login: crate::http::Login) -> axum::Router {
        routes::router(self.shared.clone(), login)
    }
}

/// The buses of `config`, and what the console shows of each running device.
fn infos(config: &Config, devices: &Directory) -> (Vec<String>, Vec<DeviceInfo>) {
    let running = directory(devices);
    let infos = config
        .devices
        .iter()
        .filter_map(|d| {
            let h = running.get(&d.name)?;
            Some(DeviceInfo {
                name: d.name.clone(),
                bus: config.buses.get(d.bus).map(|b| b.name.clone()).unwrap_or_default(),
                unit: d.unit,
                poll: d.poll,
                points: h.points.clone(),
            })
        })
        .collect();
    (config.buses.iter().map(|b| b.name.clone()).collect(), infos)
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Model> {
        // A poisoned lock only means a panic elsewhere; the model is still usable.
        self.model.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn pages_lock(&self) -> MutexGuard<'_, HashMap<String, watch::Sender<u64>>> {
        self.pages.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A running device, by name.
    fn handle(&self, name: &str) -> Option<DeviceHandle> {
        directory(&self.devices).get(name).cloned()
    }

    /// Follows the changes of a device's page, if the device is shown.
    fn page(&self, name: &str) -> Option<watch::Receiver<u64>> {
        if !self.lock().has_device(name) {
            return None;
        }
        Some(self.pages_lock().entry(name.to_string()).or_insert_with(|| watch::Sender::new(0)).subscribe())
    }

    /// Tells the overview, and the device's page if any, that it changed.
    fn touch(&self, device: Option<&str>) {
        self.overview.send_modify(|n| *n += 1);
        if let Some(w) = device.and_then(|name| self.pages_lock().get(name).cloned()) {
            w.send_modify(|n| *n += 1);
        }
    }

    /// The overview's JSON, with bus and outbox figures at most a second old.
    fn overview(&self) -> String {
        let now = Instant::now();
        let wants = self.lock().wants_metrics(now);
        // Rendered outside the lock: it walks every series of the process.
        let text = wants.then(|| crate::http::metrics().render());
        let mut model = self.lock();
        if let Some(text) = text {
            model.on_metrics(&text, now);
        }
        model.overview(SystemTime::now()).to_string()
    }

    /// A device page's JSON; see [`Model::device`].
    fn device(&self, name: &str, history: bool) -> Option<String> {
        let journal = self.handle(name)?.journal().recent();
        let doc = self.lock().device(name, &journal, self.settings.write, history, SystemTime::now())?;
        Some(doc.to_string())
    }
}

/// A watch's values from now on (the current one first, if not yet seen);
/// ends when its sender is gone.
fn values<T: Clone + Send + Sync + 'static>(rx: watch::Receiver<T>) -> BoxStream<'static, T> {
    futures_util::stream::unfold(rx, |mut rx| async move {
        rx.changed().await.ok()?;
        let v = rx.borrow_and_update().clone();
        Some((v, rx))
    })
    .boxed()
}

/// Where a connection goes, for a person: no user name, no password.
fn broker_text(c: &crate::config::Connection) -> String {
    match &c.broker {
        Broker::Embedded { listen, .. } => format!("embedded broker on {listen}"),
        Broker::Remote { host, port, tls, websocket_path } => {
            let scheme = match (tls.is_some(), websocket_path.is_some()) {
                (false, false) => "mqtt",
                (true, false) => "mqtts",
                (false, true) => "ws",
                (true, true) => "wss",
            };
            let path = websocket_path.as_deref().unwrap_or("");
            let via = match &c.proxy {
                Some(p) => format!(" via proxy {}:{}", p.host, p.port),
                None => String::new(),
            };
            format!("{scheme}://{host}:{port}{path}{via}")
        }
    }
}
