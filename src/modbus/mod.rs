//! The field side: one owner task per bus line, and the read planner.
//!
//! Device actors talk to a bus only through a [`BusHandle`], with typed
//! requests ([`Op`]) that name a unit, a table and addresses; the bus owner
//! never sees points or JSON. Only `bus.rs` touches the serial port or socket.

mod bus;
mod plan;
mod transport;

pub use bus::{spawn_bus, BusError, BusHandle, Op, Priority, Reply};
pub use plan::{plan_reads, plan_writes, ReadBlock, WriteOp};
