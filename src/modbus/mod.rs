//! The field side: one owner task per bus line, its queue, and the read planner.
//!
//! Device actors talk to a bus only through a [`BusHandle`], with typed
//! requests ([`Op`]) that name a unit, a table and addresses; the bus owner
//! never sees points or JSON. Only `bus.rs` touches the serial port or socket.
//! `queue.rs` decides what goes on the wire next (commands, then polls, then
//! probes of offline devices), without I/O.

mod bus;
mod plan;
mod queue;
pub mod timer;
mod transport;

pub use bus::{exception_name, spawn_bus, BusError, BusHandle, Done, Lease, Op, PendingPoll, Priority, Reply};
pub use plan::{plan_reads, plan_writes, ReadBlock, WriteOp};
pub use queue::PollKind;
