//! The read planner: the fewest requests that cover a set of points.
//!
//! Other gateways send one request per configured value, which makes serial
//! polling crawl. Here points of one table that sit next to each other (or
//! within `max_gap` unconfigured addresses) share one request, up to the
//! device's per-request limit. Writes are merged the same way when their
//! addresses are contiguous, except a trigger point's: its write goes alone,
//! so that no retry of a neighbour's value can send it a second time.

use crate::config::ReadLimits;
use crate::point::{Encoded, Point, Table};

use super::Op;

/// One read request and the points it serves.
#[derive(Clone, Debug, PartialEq)]
pub struct ReadBlock {
    /// Table read.
    pub table: Table,
    /// First address.
    pub start: u16,
    /// Number of bits or registers.
    pub count: u16,
    /// Indices (into the point list given to [`plan_reads`]) of the points served.
    pub points: Vec<usize>,
}

impl ReadBlock {
    /// The request to send.
    pub fn op(&self) -> Op {
        match self.table {
            Table::Coil => Op::ReadCoils(self.start, self.count),
            Table::DiscreteInput => Op::ReadDiscreteInputs(self.start, self.count),
            Table::InputRegister => Op::ReadInputRegisters(self.start, self.count),
            Table::HoldingRegister => Op::ReadHoldingRegisters(self.start, self.count),
        }
    }
}

/// Plans reads for the points at `indices` of `points`.
pub fn plan_reads(points: &[Point], indices: &[usize], limits: &ReadLimits) -> Vec<ReadBlock> {
    let mut sorted: Vec<usize> = indices.to_vec();
    sorted.sort_by_key(|&i| (points[i].location.table, points[i].span()));
    let mut blocks: Vec<ReadBlock> = Vec::new();
    for i in sorted {
        let p = &points[i];
        let table = p.location.table;
        let (start, end) = p.span();
        let max = u32::from(if table.is_bits() { limits.max_bits } else { limits.max_registers });
        if let Some(b) = blocks.last_mut() {
            let b_end = u32::from(b.start) + u32::from(b.count) - 1;
            let new_end = b_end.max(end);
            let near = start <= b_end + 1 + u32::from(limits.max_gap);
            if b.table == table && near && new_end - u32::from(b.start) < max {
                b.count = (new_end - u32::from(b.start) + 1) as u16;
                b.points.push(i);
                continue;
            }
        }
        blocks.push(ReadBlock { table, start: start as u16, count: (end - start + 1) as u16, points: vec![i] });
    }
    blocks
}

/// One write request and the points it carries.
#[derive(Clone, Debug, PartialEq)]
pub enum WriteOp {
    /// A plain write.
    Write {
        /// The request.
        op: Op,
        /// Indices of the points written.
        points: Vec<usize>,
    },
    /// Bits of one holding register: read it, change the bits, write it back.
    RegisterBits {
        /// Register address.
        address: u16,
        /// (bit, new state) pairs.
        bits: Vec<(u8, bool)>,
        /// Indices of the points written.
        points: Vec<usize>,
    },
}

impl WriteOp {
    /// Indices of the points written.
    pub fn points(&self) -> &[usize] {
        match self {
            WriteOp::Write { points, .. } | WriteOp::RegisterBits { points, .. } => points,
        }
    }
}

/// Plans the writes of already-validated values. Writes go out in the order
/// given (a setpoint written before the motor is switched on must stay
/// first); a write merges with the one before it when it continues it and
/// neither carries a trigger point. With `single` (a device that refuses
/// functions 15 and 16) nothing is merged and a value of several registers
/// becomes one request per register, in address order.
pub fn plan_writes(points: &[Point], writes: &[(usize, Encoded)], single: bool) -> Vec<WriteOp> {
    let mut ops: Vec<WriteOp> = Vec::new();
    for (i, enc) in writes {
        let addr = points[*i].location.address;
        if single {
            if let Encoded::Words(words) = enc {
                for (k, w) in words.iter().enumerate() {
                    let op = Op::WriteRegisters(addr.wrapping_add(k as u16), vec![*w]);
                    ops.push(WriteOp::Write { op, points: vec![*i] });
                }
                continue;
            }
        }
        let alone = single || points[*i].trigger || ops.last().is_some_and(|op| op.points().iter().any(|&j| points[j].trigger));
        match (ops.last_mut().filter(|_| !alone), enc) {
            (Some(WriteOp::Write { op: Op::WriteCoils(start, bits), points: ps }), Encoded::Bits(new))
                if usize::from(*start) + bits.len() == usize::from(addr) && bits.len() + new.len() <= 1968 =>
            {
                bits.extend_from_slice(new);
                ps.push(*i);
            }
            (Some(WriteOp::Write { op: Op::WriteRegisters(start, words), points: ps }), Encoded::Words(new))
                if usize::from(*start) + words.len() == usize::from(addr) && words.len() + new.len() <= 123 =>
            {
                words.extend_from_slice(new);
                ps.push(*i);
            }
            (Some(WriteOp::RegisterBits { address, bits, points: ps }), Encoded::RegisterBit { bit, value })
                if *address == addr =>
            {
                bits.push((*bit, *value));
                ps.push(*i);
            }
            (_, Encoded::Bits(b)) => ops.push(WriteOp::Write { op: Op::WriteCoils(addr, b.clone()), points: vec![*i] }),
            (_, Encoded::Words(w)) => ops.push(WriteOp::Write { op: Op::WriteRegisters(addr, w.clone()), points: vec![*i] }),
            (_, Encoded::RegisterBit { bit, value }) => {
                ops.push(WriteOp::RegisterBits { address: addr, bits: vec![(*bit, *value)], points: vec![*i] })
            }
        }
    }
    ops
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::point::{Access, DataType, Location, Order};

    fn pt(table: Table, address: u16, data_type: DataType) -> Point {
        Point {
            path: format!("p{address}"),
            location: Location { table, address, bit: None },
            data_type,
            word_order: Order::Big,
            byte_order: Order::Big,
            scale: 1.0,
            offset: 0.0,
            labels: vec![],
            access: Access::ReadWrite,
            min: None,
            max: None,
            allowed: vec![],
            deadband: 0.0,
            trigger: false,
        }
    }

    fn all(points: &[Point]) -> Vec<usize> {
        (0..points.len()).collect()
    }

    #[test]
    fn contiguous_registers_share_one_request() {
        let points = vec![
            pt(Table::HoldingRegister, 10, DataType::F32),
            pt(Table::HoldingRegister, 12, DataType::U16),
            pt(Table::HoldingRegister, 13, DataType::U64),
        ];
        let plan = plan_reads(&points, &all(&points), &ReadLimits::default());
        assert_eq!(plan.len(), 1);
        assert_eq!(plan[0].op(), Op::ReadHoldingRegisters(10, 7));
        assert_eq!(plan[0].points, vec![0, 1, 2]);
    }

    #[test]
    fn gaps_split_requests_unless_allowed() {
        let points = vec![pt(Table::InputRegister, 0, DataType::U16), pt(Table::InputRegister, 5, DataType::U16)];
        assert_eq!(plan_reads(&points, &all(&points), &ReadLimits::default()).len(), 2);
        let limits = ReadLimits { max_gap: 4, ..ReadLimits::default() };
        let plan = plan_reads(&points, &all(&points), &limits);
        assert_eq!(plan.len(), 1);
        assert_eq!(plan[0].op(), Op::ReadInputRegisters(0, 6));
    }

    #[test]
    fn tables_are_never_mixed_and_the_device_limit_holds() {
        let points: Vec<Point> = (0..10).map(|a| pt(Table::HoldingRegister, a, DataType::U16)).chain([pt(Table::Coil, 0, DataType::Bool)]).collect();
        let limits = ReadLimits { max_registers: 4, ..ReadLimits::default() };
        let plan = plan_reads(&points, &all(&points), &limits);
        let counts: Vec<(Table, u16)> = plan.iter().map(|b| (b.table, b.count)).collect();
        assert_eq!(counts, vec![(Table::Coil, 1), (Table::HoldingRegister, 4), (Table::HoldingRegister, 4), (Table::HoldingRegister, 2)]);
    }

    #[test]
    fn writes_keep_their_order_and_merge_when_one_continues_the_last() {
        let points = vec![
            pt(Table::HoldingRegister, 10, DataType::F32),
            pt(Table::HoldingRegister, 12, DataType::U16),
            pt(Table::HoldingRegister, 20, DataType::U16),
            pt(Table::Coil, 0, DataType::Bool),
        ];
        let writes = vec![
            (2, Encoded::Words(vec![7])),
            (0, Encoded::Words(vec![1, 2])),
            (1, Encoded::Words(vec![3])),
            (3, Encoded::Bits(vec![true])),
        ];
        let plan = plan_writes(&points, &writes, false);
        assert_eq!(plan, vec![
            WriteOp::Write { op: Op::WriteRegisters(20, vec![7]), points: vec![2] },
            WriteOp::Write { op: Op::WriteRegisters(10, vec![1, 2, 3]), points: vec![0, 1] },
            WriteOp::Write { op: Op::WriteCoils(0, vec![true]), points: vec![3] },
        ]);
    }

    #[test]
    fn a_trigger_point_is_written_alone_even_between_contiguous_neighbours() {
        let trigger = Point { trigger: true, ..pt(Table::HoldingRegister, 11, DataType::U16) };
        let points = vec![pt(Table::HoldingRegister, 10, DataType::U16), trigger, pt(Table::HoldingRegister, 12, DataType::U16)];
        let writes = vec![(0, Encoded::Words(vec![1])), (1, Encoded::Words(vec![2])), (2, Encoded::Words(vec![3]))];
        assert_eq!(plan_writes(&points, &writes, false), vec![
            WriteOp::Write { op: Op::WriteRegisters(10, vec![1]), points: vec![0] },
            WriteOp::Write { op: Op::WriteRegisters(11, vec![2]), points: vec![1] },
            WriteOp::Write { op: Op::WriteRegisters(12, vec![3]), points: vec![2] },
        ]);
        let bits = vec![
            Point { location: Location { table: Table::HoldingRegister, address: 5, bit: Some(0) }, trigger: true, ..pt(Table::HoldingRegister, 5, DataType::Bool) },
            Point { location: Location { table: Table::HoldingRegister, address: 5, bit: Some(1) }, ..pt(Table::HoldingRegister, 5, DataType::Bool) },
        ];
        let writes = vec![(0, Encoded::RegisterBit { bit: 0, value: true }), (1, Encoded::RegisterBit { bit: 1, value: true })];
        assert_eq!(plan_writes(&bits, &writes, false).len(), 2, "not even two bits of one register");
    }

    #[test]
    fn single_writes_send_one_register_or_coil_per_request_in_order() {
        let points = vec![
            pt(Table::HoldingRegister, 10, DataType::F32),
            pt(Table::HoldingRegister, 12, DataType::U16),
            pt(Table::Coil, 0, DataType::Bool),
            pt(Table::Coil, 1, DataType::Bool),
        ];
        let writes = vec![
            (0, Encoded::Words(vec![0x422A, 0])),
            (1, Encoded::Words(vec![3])),
            (2, Encoded::Bits(vec![true])),
            (3, Encoded::Bits(vec![false])),
        ];
        let ops: Vec<Op> = plan_writes(&points, &writes, true)
            .into_iter()
            .map(|w| match w {
                WriteOp::Write { op, .. } => op,
                other => panic!("a plain write: {other:?}"),
            })
            .collect();
        assert_eq!(ops, vec![
            Op::WriteRegisters(10, vec![0x422A]),
            Op::WriteRegisters(11, vec![0]),
            Op::WriteRegisters(12, vec![3]),
            Op::WriteCoils(0, vec![true]),
            Op::WriteCoils(1, vec![false]),
        ]);
    }
}
