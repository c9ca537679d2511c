//! Wire time of Modbus RTU: how long frames take on an RS-485 line.
//!
//! A simulator with `baud:` holds each reply back by the time the line would
//! have taken: the request's characters, the silence that ends it, and the
//! reply's characters. A pty or a loopback socket moves bytes at once, so
//! without this a benchmark of RTU timing would measure nothing the
//! integrator's line does. Every character is 11 bits (start, 8 data,
//! parity or a second stop bit, stop); frames are separated by 3.5
//! character times of silence, fixed at 1.75 ms above 19200 Bd as the
//! Modbus serial line specification says (the gateway's default bus `delay`
//! is the same). Pure arithmetic, so the benchmarks compute the wire-time
//! limit of a poll cycle with the very functions that pace the simulator.

use std::time::Duration;

use tokio_modbus::{Request, Response};

/// Bits per character on the line: start, 8 data, parity (or a second stop), stop.
pub const BITS_PER_CHAR: u32 = 11;

/// The time one character takes at `baud`.
pub fn char_time(baud: u32) -> Duration {
    Duration::from_nanos(u64::from(BITS_PER_CHAR) * 1_000_000_000 / u64::from(baud.max(1)))
}

/// The silence that separates two frames: 3.5 characters, 1.75 ms above 19200 Bd.
pub fn frame_gap(baud: u32) -> Duration {
    if baud > 19_200 {
        Duration::from_micros(1750)
    } else {
        Duration::from_nanos(u64::from(BITS_PER_CHAR) * 3_500_000_000 / u64::from(baud.max(1)))
    }
}

/// The time a frame of `bytes` characters takes on the line.
pub fn frame_time(baud: u32, bytes: usize) -> Duration {
    Duration::from_nanos(u64::from(BITS_PER_CHAR) * 1_000_000_000 * bytes as u64 / u64::from(baud.max(1)))
}

/// How long after a request arrives (at once, on a pty or a socket) a paced
/// reply goes out: the request on the wire, the gap that ends it, the reply.
pub fn reply_delay(baud: u32, request_bytes: usize, reply_bytes: usize) -> Duration {
    frame_time(baud, request_bytes) + frame_gap(baud) + frame_time(baud, reply_bytes)
}

/// The least time one transaction holds the line: request, gap, reply, gap
/// (the silence before the next request).
pub fn transaction_time(baud: u32, request_bytes: usize, reply_bytes: usize) -> Duration {
    reply_delay(baud, request_bytes, reply_bytes) + frame_gap(baud)
}

/// Bytes of the RTU frame of a request: unit, function, data, CRC.
pub fn request_bytes(req: &Request<'_>) -> usize {
    let data = match req {
        Request::ReadCoils(..)
        | Request::ReadDiscreteInputs(..)
        | Request::ReadInputRegisters(..)
        | Request::ReadHoldingRegisters(..)
        | Request::WriteSingleCoil(..)
        | Request::WriteSingleRegister(..) => 4,
        Request::WriteMultipleCoils(_, bits) => 5 + bits.len().div_ceil(8),
        Request::WriteMultipleRegisters(_, words) => 5 + 2 * words.len(),
        Request::MaskWriteRegister(..) => 6,
        Request::ReadWriteMultipleRegisters(_, _, _, words) => 9 + 2 * words.len(),
        _ => 4,
    };
    4 + data
}

/// Bytes of the RTU frame of a reply (`None`: an exception, 5 bytes).
pub fn reply_bytes(reply: Option<&Response>) -> usize {
    let data = match reply {
        None => 1,
        Some(Response::ReadCoils(bits) | Response::ReadDiscreteInputs(bits)) => 1 + bits.len().div_ceil(8),
        Some(Response::ReadInputRegisters(words) | Response::ReadHoldingRegisters(words) | Response::ReadWriteMultipleRegisters(words)) => 1 + 2 * words.len(),
        Some(Response::MaskWriteRegister(..)) => 6,
        Some(_) => 4,
    };
    4 + data
}

/// The bytes of a read of `count` registers (or bits, with `bits`): request and reply.
pub fn read_bytes(count: u16, bits: bool) -> (usize, usize) {
    let data = if bits { usize::from(count).div_ceil(8) } else { 2 * usize::from(count) };
    (8, 5 + data)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(d: Duration) -> f64 {
        d.as_secs_f64() * 1000.0
    }

    #[test]
    fn a_character_is_eleven_bits() {
        assert_eq!(char_time(9600), Duration::from_nanos(1_145_833));
        assert_eq!(char_time(115_200), Duration::from_nanos(95_486));
    }

    #[test]
    fn the_gap_is_three_and_a_half_characters_up_to_19200_baud_then_1_75_ms() {
        assert_eq!(frame_gap(9600), Duration::from_nanos(4_010_416));
        assert_eq!(frame_gap(19_200), Duration::from_nanos(2_005_208));
        assert_eq!(frame_gap(38_400), Duration::from_micros(1750));
        assert_eq!(frame_gap(115_200), Duration::from_micros(1750));
    }

    #[test]
    fn reading_one_register_at_9600_baud_takes_about_25_ms() {
        // 8 request bytes, 7 reply bytes, two gaps: (15 + 7) × 11 / 9600 s.
        let (req, rep) = read_bytes(1, false);
        assert_eq!((req, rep), (8, 7));
        let t = ms(transaction_time(9600, req, rep));
        assert!((t - 25.208).abs() < 0.01, "{t}");
    }

    #[test]
    fn reading_125_registers_at_9600_baud_takes_about_309_ms() {
        let (req, rep) = read_bytes(125, false);
        assert_eq!(rep, 255);
        let t = ms(transaction_time(9600, req, rep));
        assert!((t - 309.375).abs() < 0.01, "{t}");
    }

    #[test]
    fn a_reply_waits_for_the_request_the_gap_and_its_own_characters() {
        let d = reply_delay(9600, 8, 7);
        assert_eq!(d, frame_time(9600, 8) + frame_gap(9600) + frame_time(9600, 7));
        assert!((ms(d) - 21.198).abs() < 0.01, "{}", ms(d));
    }

    #[test]
    fn frame_sizes_follow_the_rtu_layout() {
        assert_eq!(request_bytes(&Request::ReadHoldingRegisters(0, 10)), 8);
        assert_eq!(request_bytes(&Request::WriteSingleCoil(0, true)), 8);
        assert_eq!(request_bytes(&Request::WriteMultipleRegisters(0, vec![1, 2].into())), 13);
        assert_eq!(request_bytes(&Request::WriteMultipleCoils(0, vec![true; 9].into())), 11);
        assert_eq!(request_bytes(&Request::MaskWriteRegister(0, 1, 2)), 10);
        assert_eq!(reply_bytes(Some(&Response::ReadHoldingRegisters(vec![0; 10]))), 25);
        assert_eq!(reply_bytes(Some(&Response::ReadCoils(vec![false; 9]))), 7);
        assert_eq!(reply_bytes(Some(&Response::WriteSingleRegister(0, 1))), 8);
        assert_eq!(reply_bytes(Some(&Response::WriteMultipleRegisters(0, 2))), 8);
        assert_eq!(reply_bytes(None), 5);
    }

    #[test]
    fn faster_lines_take_proportionally_less_except_for_the_fixed_gap() {
        let slow = transaction_time(9600, 8, 255);
        let fast = transaction_time(115_200, 8, 255);
        assert!(ms(fast) > ms(frame_time(115_200, 263)) + 3.49 && ms(fast) < ms(slow) / 10.0);
    }
}
