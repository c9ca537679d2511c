//! The built-in Modbus TCP simulator: a slave that serves configured devices.
//!
//! It lets the shipped demo and the tests run the whole loop over a real
//! Modbus TCP socket with no hardware; with `framing: rtu` it speaks RTU
//! frames over TCP instead, like a serial device server in raw TCP mode
//! with an RS-485 line behind it, and with `serial:` it serves RTU on a
//! serial port or one end of a pty pair. With `baud:` each reply waits for
//! the time the request and the reply would take on an RS-485 line at that
//! speed ([`pace`]), so RTU timing can be measured without hardware. It serves the points of each device it
//! is given, with plausible behaviour: written values are held, a `mirror`
//! point reads whatever its leader holds (a status register that follows a
//! coil), and `drift` points wander slowly (a temperature). It refuses
//! addresses no point covers (Modbus exception 2), never answers a unit it
//! does not serve (a dead device), and records every write it receives so
//! that tests can prove what was, and was not, written. Tests can also make a
//! unit go silent, or carry out a request and lose its reply (the case that
//! tempts a gateway to write twice), and read a log of when each unit was
//! asked what (benchmarks measure poll gaps from it).
//!
//! Device quirks met in the field can be switched on per unit, for the
//! tests of the options that cope with them: a unit that refuses some
//! functions (15 and 16, say), one whose read-back shows a write only some
//! time after it acknowledged it, one that answers "busy" (exception 0x06)
//! a number of times, one that sits behind a Modbus gateway that answers
//! 0x0A or 0x0B for it, and one that answers late. Connections can be cut
//! from the simulator's side (a device server restarting).

pub mod pace;
mod wire;

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio_modbus::{ExceptionCode, Request, Response, SlaveRequest};
use tokio_util::sync::CancellationToken;

use crate::config::{Framing, SimListen, SimulatedDevice, Simulator};
use crate::point::{Encoded, Point, Table, Value};

/// One write the simulator received.
#[derive(Clone, Debug, PartialEq)]
pub struct WriteRecord {
    /// Unit id written to.
    pub unit: u8,
    /// Table written.
    pub table: Table,
    /// First address.
    pub address: u16,
    /// Registers written (for function 22, the register's new value), or bits as 0/1.
    pub values: Vec<u16>,
    /// The Modbus function code of the request (5, 6, 15, 16 or 22).
    pub function: u8,
}

/// One request the simulator received, for the request log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestRecord {
    /// When it arrived.
    pub at: Instant,
    /// Unit id asked.
    pub unit: u8,
    /// The Modbus function code.
    pub function: u8,
    /// Whether a reply (or an exception) was sent back.
    pub answered: bool,
}

/// The request log keeps this many of the latest requests: enough for a
/// benchmark's minutes, bounded for a simulator that runs for days.
const LOG_LIMIT: usize = 1 << 16;

#[derive(Debug, Default)]
struct Unit {
    bits: HashMap<(Table, u16), bool>,
    words: HashMap<(Table, u16), u16>,
    points: Arc<Vec<Point>>,
    drift: Vec<(usize, f64)>,
    mirror: Vec<(usize, usize)>,
    silent: bool,
    /// Requests still to be carried out without a reply.
    drop_replies: u32,
    /// Function codes answered with "illegal function".
    refused: Vec<u8>,
    /// Requests still to be answered "busy" (0x06) without being carried out.
    busy: u32,
    /// Every request answered with this exception (0x0A, 0x0B: a Modbus
    /// gateway with nothing answering behind it).
    gateway_failure: Option<u8>,
    /// How long after acknowledging a write the device holds the value.
    lag: Duration,
    /// Writes acknowledged and not yet applied: (when, table, address, values).
    lagging: Vec<(Instant, Table, u16, Vec<u16>)>,
    /// How long the unit takes to answer.
    reply_delay: Duration,
}

#[derive(Debug, Default)]
struct State {
    units: HashMap<u8, Unit>,
    writes: Vec<WriteRecord>,
    requests: u64,
    log: VecDeque<RequestRecord>,
}

/// A change to one unit's behaviour, for tests.
fn with_unit(state: &Mutex<State>, unit: u8, change: impl FnOnce(&mut Unit)) {
    if let Some(u) = state.lock().unwrap_or_else(|e| e.into_inner()).units.get_mut(&unit) {
        change(u);
    }
}

/// A running simulator; cloning shares it. Dropping the last clone does not
/// stop it: cancel the token given to [`start`].
#[derive(Clone, Debug)]
pub struct SimHandle {
    state: Arc<Mutex<State>>,
    connections: wire::Connections,
    /// The address it listens on (useful with port 0); `0.0.0.0:0` for a
    /// simulator on a serial port.
    pub addr: SocketAddr,
}

impl SimHandle {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every write received so far.
    pub fn writes(&self) -> Vec<WriteRecord> {
        self.lock().writes.clone()
    }

    /// Requests received so far (reads and writes, answered or not).
    pub fn requests(&self) -> u64 {
        self.lock().requests
    }

    /// Makes a unit stop (or resume) answering, like a device losing power.
    pub fn set_silent(&self, unit: u8, silent: bool) {
        if let Some(u) = self.lock().units.get_mut(&unit) {
            u.silent = silent;
        }
    }

    /// Makes a unit carry out its next `count` requests (writes included)
    /// and send no reply, as if each reply were lost on the way back.
    pub fn drop_replies(&self, unit: u8, count: u32) {
        with_unit(&self.state, unit, |u| u.drop_replies = count);
    }

    /// Makes a unit answer these function codes with "illegal function"
    /// (e.g. 15 and 16, for a device that writes only with 5 and 6).
    pub fn refuse_functions(&self, unit: u8, functions: &[u8]) {
        with_unit(&self.state, unit, |u| u.refused = functions.to_vec());
    }

    /// Makes a unit answer its next `count` requests with exception 0x06
    /// (busy), carrying none of them out.
    pub fn answer_busy(&self, unit: u8, count: u32) {
        with_unit(&self.state, unit, |u| u.busy = count);
    }

    /// Makes every request to a unit be answered with this exception, as a
    /// Modbus gateway does when the device behind it does not answer (0x0A,
    /// 0x0B); `None` lets the unit answer again.
    pub fn fail_as_gateway(&self, unit: u8, code: Option<u8>) {
        with_unit(&self.state, unit, |u| u.gateway_failure = code);
    }

    /// Makes a unit acknowledge writes at once but hold the new values only
    /// `lag` later (reads show the old ones until then).
    pub fn lag_writes(&self, unit: u8, lag: Duration) {
        with_unit(&self.state, unit, |u| u.lag = lag);
    }

    /// Makes a unit take `delay` to answer each request.
    pub fn delay_replies(&self, unit: u8, delay: Duration) {
        with_unit(&self.state, unit, |u| u.reply_delay = delay);
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.connections.accepted()
    }

    /// Closes every open connection from the simulator's side, as a device
    /// server does when it restarts; new ones are accepted as before.
    pub fn disconnect_all(&self) {
        self.connections.cut();
    }

    /// The latest requests received (up to 65536), oldest first.
    pub fn request_log(&self) -> Vec<RequestRecord> {
        self.lock().log.iter().copied().collect()
    }

    /// The value a point of a unit holds now, decoded as the gateway would.
    pub fn value(&self, unit: u8, path: &str) -> Option<Value> {
        let mut st = self.lock();
        let u = st.units.get_mut(&unit)?;
        u.apply_lagging(Instant::now());
        u.apply_mirrors();
        let p = u.points.iter().find(|p| p.path == path)?.clone();
        u.read_point(&p).ok()
    }

    /// Sets a point's value on the device side (as if the process changed it).
    pub fn set_value(&self, unit: u8, path: &str, value: &Value) -> Result<(), String> {
        let mut st = self.lock();
        let u = st.units.get_mut(&unit).ok_or("no such unit")?;
        let p = u.points.iter().find(|p| p.path == path).ok_or("no such point")?.clone();
        u.store_point(&p, value)
    }
}

/// Starts a simulator from its configuration; runs until `cancel` fires.
pub async fn start(sim: &Simulator, cancel: CancellationToken) -> anyhow::Result<SimHandle> {
    Ok(start_with_task(sim, cancel).await?.0)
}

/// Like [`start`], also returning the server task: it ends (and the port is
/// free again) after `cancel` fires.
pub async fn start_with_task(sim: &Simulator, cancel: CancellationToken) -> anyhow::Result<(SimHandle, tokio::task::JoinHandle<()>)> {
    let listener = match &sim.listen {
        SimListen::Tcp(addr) => {
            Some(TcpListener::bind(addr).await.with_context(|| format!("simulator `{}` cannot listen on {addr}", sim.name))?)
        }
        SimListen::Serial { .. } => None,
    };
    let addr = match &listener {
        Some(l) => l.local_addr()?,
        None => SocketAddr::from(([0, 0, 0, 0], 0)),
    };
    let mut state = State::default();
    for d in &sim.devices {
        state.units.insert(d.unit, Unit::from_config(d));
    }
    let state = Arc::new(Mutex::new(state));
    let connections = wire::Connections::default();
    let handle = SimHandle { state: state.clone(), connections: connections.clone(), addr };

    let drift_state = state.clone();
    let drift_cancel = cancel.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut t = 0u64;
        loop {
            tokio::select! {
                () = drift_cancel.cancelled() => break,
                _ = tick.tick() => {}
            }
            t += 1;
            let mut st = drift_state.lock().unwrap_or_else(|e| e.into_inner());
            for u in st.units.values_mut() {
                u.drift(t);
            }
        }
    });

    let service = Service { state, pace: sim.pace };
    let paced = sim.pace.map(|b| format!(", replies paced to {b} Bd")).unwrap_or_default();
    let task = match (listener, &sim.listen) {
        (Some(listener), _) => {
            let framing = match sim.framing {
                Framing::Tcp => "Modbus TCP",
                Framing::Rtu => "Modbus RTU over TCP",
            };
            tracing::info!(simulator = %sim.name, %addr, units = sim.devices.len(), "{framing} simulator listening{paced}");
            tokio::spawn(wire::serve(listener, sim.framing, service, connections, cancel))
        }
        (None, SimListen::Serial { path, baud }) => {
            // Opened here once, so that a wrong path fails the start loudly.
            let port = wire::open_serial(path, *baud).with_context(|| format!("simulator `{}` cannot open {}", sim.name, path.display()))?;
            tracing::info!(simulator = %sim.name, port = %path.display(), baud, units = sim.devices.len(), "Modbus RTU simulator on a serial port{paced}");
            tokio::spawn(wire::serve_serial(port, path.clone(), *baud, service, connections, cancel))
        }
        (None, SimListen::Tcp(_)) => anyhow::bail!("simulator `{}`: no listener", sim.name),
    };
    Ok((handle, task))
}

impl Unit {
    fn from_config(d: &SimulatedDevice) -> Unit {
        let mut u = Unit { points: d.points.clone(), ..Unit::default() };
        // Every address a point covers exists, zeroed; the rest do not.
        for p in d.points.iter() {
            let (start, end) = p.span();
            for a in start..=end {
                let a = a as u16;
                if p.location.table.is_bits() {
                    u.bits.insert((p.location.table, a), false);
                } else {
                    u.words.insert((p.location.table, a), 0);
                }
            }
        }
        for (path, v) in &d.initial {
            if let Some(p) = d.points.iter().find(|p| &p.path == path).cloned() {
                if let Err(e) = u.store_point(&p, v) {
                    tracing::warn!(point = %path, "simulator: bad initial value: {e}");
                }
            }
        }
        let index = |path: &str| d.points.iter().position(|p| p.path == path);
        for path in &d.drift {
            if let Some(i) = index(path) {
                let base = u.read_point(&d.points[i]).ok().and_then(|v| v.as_f64()).unwrap_or(0.0);
                u.drift.push((i, base));
            }
        }
        for (follower, leader) in &d.mirror {
            if let (Some(f), Some(l)) = (index(follower), index(leader)) {
                u.mirror.push((f, l));
            }
        }
        u
    }

    fn read_point(&self, p: &Point) -> Result<Value, String> {
        let (start, end) = p.span();
        let t = p.location.table;
        if t.is_bits() {
            let b = *self.bits.get(&(t, start as u16)).ok_or("unmapped")?;
            p.decode_bits(&[b])
        } else {
            let words: Option<Vec<u16>> = (start..=end).map(|a| self.words.get(&(t, a as u16)).copied()).collect();
            p.decode_words(&words.ok_or("unmapped")?)
        }
    }

    /// Stores a value the device side produced (ignores access and limits).
    fn store_point(&mut self, p: &Point, v: &Value) -> Result<(), String> {
        let t = p.location.table;
        let a = p.location.address;
        match p.encode_device_value(v)? {
            Encoded::Bits(bits) => {
                self.bits.insert((t, a), bits.first().copied().unwrap_or(false));
            }
            Encoded::Words(words) => {
                for (k, w) in words.into_iter().enumerate() {
                    self.words.insert((t, a + k as u16), w);
                }
            }
            Encoded::RegisterBit { bit, value } => {
                let w = self.words.entry((t, a)).or_insert(0);
                if value {
                    *w |= 1 << bit;
                } else {
                    *w &= !(1 << bit);
                }
            }
        }
        Ok(())
    }

    /// Applies the lagging writes whose time has come.
    fn apply_lagging(&mut self, now: Instant) {
        let (due, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.lagging).into_iter().partition(|(at, ..)| *at <= now);
        self.lagging = waiting;
        for (_, table, a, values) in due {
            self.apply(table, a, &values);
        }
    }

    fn apply(&mut self, table: Table, a: u16, values: &[u16]) {
        for (k, v) in values.iter().enumerate() {
            let at = (table, a.wrapping_add(k as u16));
            if table.is_bits() {
                self.bits.insert(at, *v != 0);
            } else {
                self.words.insert(at, *v);
            }
        }
    }

    fn apply_mirrors(&mut self) {
        for (f, l) in self.mirror.clone() {
            let leader = self.points[l].clone();
            let follower = self.points[f].clone();
            if let Ok(v) = self.read_point(&leader) {
                let v = match (v, follower.location.table.is_bits() || !follower.labels.is_empty()) {
                    // A bool leader drives a numeric register as 0/1.
                    (Value::Bool(b), false) => Value::Int(i64::from(b)),
                    (Value::Text(label), false) => leader.labels.iter().find(|x| x.name == label).map_or(Value::Int(0), |x| Value::Int(x.raw)),
                    (v, _) => v,
                };
                let _ = self.store_point(&follower, &v);
            }
        }
    }

    fn drift(&mut self, t: u64) {
        for (i, base) in self.drift.clone() {
            let p = self.points[i].clone();
            let amplitude = (p.deadband * 4.0).max(0.5);
            let x = base + amplitude * ((t as f64) / 15.0).sin();
            // Round to the point's resolution so the encoder accepts it.
            let step = if p.scale != 1.0 { p.scale.abs() } else { 0.01 };
            let x = (x / step).round() * step;
            let v = if matches!(p.data_type, crate::point::DataType::F32 | crate::point::DataType::F64) || p.scale != 1.0 {
                Value::Float(x)
            } else {
                Value::Int(x.round() as i64)
            };
            let _ = self.store_point(&p, &v);
        }
    }
}

#[derive(Clone, Debug)]
struct Service {
    state: Arc<Mutex<State>>,
    /// The baud rate whose wire time paces each reply, if any.
    pace: Option<u32>,
}

type Answer = Result<Option<Response>, ExceptionCode>;

impl tokio_modbus::server::Service for Service {
    type Request = SlaveRequest<'static>;
    type Response = Option<Response>;
    type Exception = ExceptionCode;
    type Future = Pin<Box<dyn Future<Output = Answer> + Send>>;

    fn call(&self, req: Self::Request) -> Self::Future {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.requests += 1;
        let function = req.request.function_code().value();
        let request_bytes = pace::request_bytes(&req.request);
        let mut answer = serve(&mut st, req.slave, function, req.request);
        let mut delay = Duration::ZERO;
        if let Some(u) = st.units.get_mut(&req.slave) {
            if u.drop_replies > 0 && !u.silent {
                u.drop_replies -= 1;
                answer = Ok(None);
            }
            delay = u.reply_delay;
        }
        if st.log.len() >= LOG_LIMIT {
            st.log.pop_front();
        }
        let answered = !matches!(answer, Ok(None));
        if let (Some(baud), true) = (self.pace, answered) {
            delay += pace::reply_delay(baud, request_bytes, pace::reply_bytes(answer.as_ref().ok().and_then(Option::as_ref)));
        }
        st.log.push_back(RequestRecord { at: Instant::now(), unit: req.slave, function, answered });
        let at = Instant::now() + delay;
        Box::pin(async move {
            // Paced to a baud rate: the reply's wire time and its gap, to the microsecond.
            crate::modbus::timer::sleep_until(at).await;
            answer
        })
    }
}

fn serve(st: &mut State, unit_id: u8, function: u8, req: Request<'_>) -> Answer {
    let Some(unit) = st.units.get_mut(&unit_id) else { return Ok(None) };
    if unit.silent {
        return Ok(None);
    }
    if let Some(code) = unit.gateway_failure {
        return Err(ExceptionCode::new(code));
    }
    if unit.busy > 0 {
        unit.busy -= 1;
        return Err(ExceptionCode::ServerDeviceBusy);
    }
    if unit.refused.contains(&function) {
        return Err(ExceptionCode::IllegalFunction);
    }
    unit.apply_lagging(Instant::now());
    unit.apply_mirrors();
    // Sized once (collecting a `Result` would grow the vector step by step):
    // the gateway's allocations per poll are counted with the simulator's.
    fn read<T: Copy>(table: &HashMap<(Table, u16), T>, t: Table, a: u16, n: u16) -> Result<Vec<T>, ExceptionCode> {
        let mut out = Vec::with_capacity(usize::from(n));
        for k in 0..n {
            out.push(*table.get(&(t, a.wrapping_add(k))).ok_or(ExceptionCode::IllegalDataAddress)?);
        }
        Ok(out)
    }
    let bits = |u: &Unit, t: Table, a: u16, n: u16| read(&u.bits, t, a, n);
    let words = |u: &Unit, t: Table, a: u16, n: u16| read(&u.words, t, a, n);
    let response = match req {
        Request::ReadCoils(a, n) => Response::ReadCoils(bits(unit, Table::Coil, a, n)?),
        Request::ReadDiscreteInputs(a, n) => Response::ReadDiscreteInputs(bits(unit, Table::DiscreteInput, a, n)?),
        Request::ReadInputRegisters(a, n) => Response::ReadInputRegisters(words(unit, Table::InputRegister, a, n)?),
        Request::ReadHoldingRegisters(a, n) => Response::ReadHoldingRegisters(words(unit, Table::HoldingRegister, a, n)?),
        Request::WriteSingleCoil(a, v) => {
            write_bits(st, unit_id, a, &[v], 5)?;
            Response::WriteSingleCoil(a, v)
        }
        Request::WriteMultipleCoils(a, vs) => {
            write_bits(st, unit_id, a, &vs, 15)?;
            Response::WriteMultipleCoils(a, vs.len() as u16)
        }
        Request::WriteSingleRegister(a, v) => {
            write_words(st, unit_id, a, &[v], 6)?;
            Response::WriteSingleRegister(a, v)
        }
        Request::WriteMultipleRegisters(a, vs) => {
            write_words(st, unit_id, a, &vs, 16)?;
            Response::WriteMultipleRegisters(a, vs.len() as u16)
        }
        Request::MaskWriteRegister(a, and_mask, or_mask) => {
            let current = words(unit, Table::HoldingRegister, a, 1)?[0];
            write_words(st, unit_id, a, &[(current & and_mask) | (or_mask & !and_mask)], 22)?;
            Response::MaskWriteRegister(a, and_mask, or_mask)
        }
        _ => return Err(ExceptionCode::IllegalFunction),
    };
    Ok(Some(response))
}

fn write_bits(st: &mut State, unit_id: u8, a: u16, vs: &[bool], function: u8) -> Result<(), ExceptionCode> {
    let values: Vec<u16> = vs.iter().map(|&b| u16::from(b)).collect();
    write(st, unit_id, Table::Coil, a, values, function)
}

fn write_words(st: &mut State, unit_id: u8, a: u16, vs: &[u16], function: u8) -> Result<(), ExceptionCode> {
    write(st, unit_id, Table::HoldingRegister, a, vs.to_vec(), function)
}

/// Records a write and applies it, now or after the unit's lag.
fn write(st: &mut State, unit_id: u8, table: Table, a: u16, values: Vec<u16>, function: u8) -> Result<(), ExceptionCode> {
    let unit = st.units.get_mut(&unit_id).ok_or(ExceptionCode::IllegalDataAddress)?;
    let all_mapped = (0..values.len()).all(|k| {
        let at = (table, a.wrapping_add(k as u16));
        if table.is_bits() { unit.bits.contains_key(&at) } else { unit.words.contains_key(&at) }
    });
    if !all_mapped {
        return Err(ExceptionCode::IllegalDataAddress);
    }
    if unit.lag.is_zero() {
        unit.apply(table, a, &values);
    } else {
        unit.lagging.push((Instant::now() + unit.lag, table, a, values.clone()));
    }
    st.writes.push(WriteRecord { unit: unit_id, table, address: a, values, function });
    Ok(())
}
