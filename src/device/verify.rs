//! Writing without writing twice: what to do when a write gets no answer.
//!
//! A write that times out may have reached the device with only its reply
//! lost. Sending it again blindly would pulse a "start" register twice or
//! reset a counter twice. So after a write gets no answer, the written
//! registers or coils are read back first ([`Step::Verify`]):
//! - they hold the value: the write landed; done, not sent again;
//! - they do not: the write is sent again while attempts remain, unless a
//!   point it carries is a **trigger** (pulse, reset, counter-like), which is
//!   never sent twice: the device may have acted and cleared it already;
//! - the read gets no answer either: the device is unreachable and whether
//!   the write landed is unknown; nothing more is sent.
//!
//! A write to a device already known to be offline is not verified: its
//! timeout is the expected outcome, and a verify read would cost a second
//! one. A write the device refuses (Modbus exception) was not applied and is
//! neither verified nor sent again.

use crate::modbus::{BusError, Op, Reply};

/// What a write must leave in the device, and how to read it back.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Expect {
    /// Coils from `address`.
    Coils {
        /// First coil.
        address: u16,
        /// Their states.
        bits: Vec<bool>,
    },
    /// Holding registers from `address`, compared only under `masks`.
    Registers {
        /// First register.
        address: u16,
        /// Expected values.
        words: Vec<u16>,
        /// Per register, the bits the write set (all of them for a plain write).
        masks: Vec<u16>,
    },
}

impl Expect {
    /// What a plain write or a mask write leaves in the device.
    pub(crate) fn of(op: &Op) -> Option<Expect> {
        match op {
            Op::WriteCoils(address, bits) => Some(Expect::Coils { address: *address, bits: bits.clone() }),
            Op::WriteRegisters(address, words) => {
                Some(Expect::Registers { address: *address, words: words.clone(), masks: vec![0xFFFF; words.len()] })
            }
            Op::MaskWriteRegister(address, and_mask, or_mask) => {
                Some(Expect::Registers { address: *address, words: vec![or_mask & !and_mask], masks: vec![!and_mask] })
            }
            Op::ReadCoils(..) | Op::ReadDiscreteInputs(..) | Op::ReadInputRegisters(..) | Op::ReadHoldingRegisters(..) => None,
        }
    }

    /// Only the given bits of one register (a read-modify-write sends the
    /// whole register, but the device may change its other bits meanwhile).
    pub(crate) fn bits(address: u16, bits: &[(u8, bool)]) -> Expect {
        let (mut word, mut mask) = (0u16, 0u16);
        for &(bit, on) in bits {
            let b = 1u16.checked_shl(u32::from(bit)).unwrap_or(0);
            mask |= b;
            if on {
                word |= b;
            }
        }
        Expect::Registers { address, words: vec![word], masks: vec![mask] }
    }

    /// The read that shows whether the device holds the value.
    pub(crate) fn read_op(&self) -> Op {
        match self {
            Expect::Coils { address, bits } => Op::ReadCoils(*address, bits.len() as u16),
            Expect::Registers { address, words, .. } => Op::ReadHoldingRegisters(*address, words.len() as u16),
        }
    }

    /// Whether `reply` (to [`Expect::read_op`]) shows the value.
    pub(crate) fn holds(&self, reply: &Reply) -> bool {
        match (self, reply) {
            (Expect::Coils { bits, .. }, Reply::Bits(read)) => read.get(..bits.len()) == Some(bits.as_slice()),
            (Expect::Registers { words, masks, .. }, Reply::Words(read)) => {
                read.len() >= words.len() && words.iter().zip(masks).zip(read).all(|((w, m), r)| (w & m) == (r & m))
            }
            _ => false,
        }
    }
}

/// The next thing to send.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Step {
    /// Send the write.
    Send(Op),
    /// Read back what the write should have left.
    Verify(Op),
    /// Nothing more: the verdict.
    Done(Verdict),
}

/// How a write ended.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Verdict {
    /// The device confirmed it.
    Written,
    /// Its reply was lost, and the read-back shows the value: it landed.
    Landed,
    /// The device refused it (Modbus exception): not applied.
    Refused(BusError),
    /// No answer, and the read-back shows the value is not there; not sent
    /// again (a trigger, or no attempts left).
    NotApplied {
        /// The write's own failure.
        error: BusError,
        /// Whether it was a trigger (so never sent twice).
        trigger: bool,
    },
    /// No answer, and no read-back could tell whether it landed.
    Unknown(BusError),
}

/// The decisions for one write request.
#[derive(Debug)]
pub(crate) struct WriteCheck {
    op: Op,
    expect: Expect,
    trigger: bool,
    attempts_left: u8,
    known_offline: bool,
    /// Why the last send failed.
    failure: Option<BusError>,
}

impl WriteCheck {
    /// `attempts` sends at most (a trigger gets one whatever it says);
    /// `known_offline` when the device was offline before the command.
    pub(crate) fn new(op: Op, expect: Expect, trigger: bool, attempts: u8, known_offline: bool) -> Self {
        let attempts = if trigger { 1 } else { attempts.max(1) };
        WriteCheck { op, expect, trigger, attempts_left: attempts, known_offline, failure: None }
    }

    /// The first step.
    pub(crate) fn start(&mut self) -> Step {
        self.send()
    }

    /// The write's outcome.
    pub(crate) fn on_write(&mut self, result: &Result<Reply, BusError>) -> Step {
        match result {
            Ok(_) => Step::Done(Verdict::Written),
            Err(e) if !e.is_unreachable() => Step::Done(Verdict::Refused(e.clone())),
            Err(e) if self.known_offline => Step::Done(Verdict::Unknown(e.clone())),
            Err(e) => {
                self.failure = Some(e.clone());
                Step::Verify(self.expect.read_op())
            }
        }
    }

    /// The verify read's outcome.
    pub(crate) fn on_verify(&mut self, result: &Result<Reply, BusError>) -> Step {
        let error = self.failure.clone().unwrap_or(BusError::Closed);
        match result {
            Ok(reply) if self.expect.holds(reply) => Step::Done(Verdict::Landed),
            Ok(_) if self.trigger || self.attempts_left == 0 => Step::Done(Verdict::NotApplied { error, trigger: self.trigger }),
            Ok(_) => self.send(),
            Err(_) => Step::Done(Verdict::Unknown(error)),
        }
    }

    fn send(&mut self) -> Step {
        self.attempts_left = self.attempts_left.saturating_sub(1);
        Step::Send(self.op.clone())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn timeout() -> Result<Reply, BusError> {
        Err(BusError::Timeout(Duration::from_millis(300)))
    }

    fn register_write() -> (Op, Expect) {
        let op = Op::WriteRegisters(10, vec![1, 2]);
        let expect = Expect::of(&op).expect("a write");
        (op, expect)
    }

    #[test]
    fn a_confirmed_write_is_done() {
        let (op, expect) = register_write();
        let mut c = WriteCheck::new(op.clone(), expect, false, 2, false);
        assert_eq!(c.start(), Step::Send(op));
        assert_eq!(c.on_write(&Ok(Reply::Written)), Step::Done(Verdict::Written));
    }

    #[test]
    fn a_write_whose_reply_was_lost_but_whose_value_landed_is_not_sent_again() {
        let (op, expect) = register_write();
        let mut c = WriteCheck::new(op.clone(), expect, false, 3, false);
        c.start();
        assert_eq!(c.on_write(&timeout()), Step::Verify(Op::ReadHoldingRegisters(10, 2)));
        assert_eq!(c.on_verify(&Ok(Reply::Words(vec![1, 2]))), Step::Done(Verdict::Landed));
    }

    #[test]
    fn a_write_that_did_not_land_is_sent_again_while_attempts_remain() {
        let (op, expect) = register_write();
        let mut c = WriteCheck::new(op.clone(), expect, false, 2, false);
        c.start();
        c.on_write(&timeout());
        assert_eq!(c.on_verify(&Ok(Reply::Words(vec![0, 0]))), Step::Send(op), "second attempt");
        assert!(matches!(c.on_write(&timeout()), Step::Verify(_)));
        assert_eq!(
            c.on_verify(&Ok(Reply::Words(vec![0, 0]))),
            Step::Done(Verdict::NotApplied { error: BusError::Timeout(Duration::from_millis(300)), trigger: false }),
            "no third attempt"
        );
    }

    #[test]
    fn a_trigger_is_never_sent_twice_even_when_the_read_back_differs() {
        let op = Op::WriteCoils(4, vec![true]);
        let mut c = WriteCheck::new(op.clone(), Expect::of(&op).expect("a write"), true, 5, false);
        assert_eq!(c.start(), Step::Send(op));
        assert_eq!(c.on_write(&timeout()), Step::Verify(Op::ReadCoils(4, 1)));
        // The device pulsed and cleared it, or never got it: no way to tell, so never again.
        assert_eq!(
            c.on_verify(&Ok(Reply::Bits(vec![false]))),
            Step::Done(Verdict::NotApplied { error: BusError::Timeout(Duration::from_millis(300)), trigger: true })
        );
    }

    #[test]
    fn a_trigger_whose_reply_was_lost_but_which_landed_is_done() {
        let op = Op::WriteRegisters(7, vec![1]);
        let mut c = WriteCheck::new(op.clone(), Expect::of(&op).expect("a write"), true, 1, false);
        c.start();
        c.on_write(&timeout());
        assert_eq!(c.on_verify(&Ok(Reply::Words(vec![1]))), Step::Done(Verdict::Landed));
    }

    #[test]
    fn a_write_to_a_device_known_offline_costs_one_timeout_and_no_verify_read() {
        let (op, expect) = register_write();
        let mut c = WriteCheck::new(op, expect, false, 3, true);
        c.start();
        assert_eq!(c.on_write(&timeout()), Step::Done(Verdict::Unknown(BusError::Timeout(Duration::from_millis(300)))));
    }

    #[test]
    fn a_refused_write_is_neither_verified_nor_sent_again() {
        let (op, expect) = register_write();
        let mut c = WriteCheck::new(op, expect, false, 3, false);
        c.start();
        let refused = BusError::Exception(2);
        assert_eq!(c.on_write(&Err(refused.clone())), Step::Done(Verdict::Refused(refused)));
    }

    #[test]
    fn when_the_verify_read_gets_no_answer_either_nothing_more_is_sent() {
        let (op, expect) = register_write();
        let mut c = WriteCheck::new(op, expect, false, 3, false);
        c.start();
        c.on_write(&timeout());
        assert_eq!(c.on_verify(&timeout()), Step::Done(Verdict::Unknown(BusError::Timeout(Duration::from_millis(300)))));
    }

    #[test]
    fn a_register_bit_is_verified_on_its_own_bits_only() {
        // Set bit 3, clear bit 0; the device changed bit 8 meanwhile.
        let expect = Expect::bits(5, &[(3, true), (0, false)]);
        assert_eq!(expect.read_op(), Op::ReadHoldingRegisters(5, 1));
        assert!(expect.holds(&Reply::Words(vec![0b1_0000_1000])));
        assert!(!expect.holds(&Reply::Words(vec![0b1_0000_1001])));
        let masked = Expect::of(&Op::MaskWriteRegister(5, !0b1001, 0b1000)).expect("a write");
        assert_eq!(masked, expect, "a mask write expects the same");
    }

    #[test]
    fn a_short_or_mismatched_read_back_never_counts_as_landed() {
        let (_, expect) = register_write();
        assert!(!expect.holds(&Reply::Words(vec![1])));
        assert!(!expect.holds(&Reply::Bits(vec![true, true])));
        assert!(!expect.holds(&Reply::Written));
    }
}
