//! Waits shorter than tokio's timer can keep: the silence between RTU frames.
//!
//! tokio's timer counts whole milliseconds and wakes at the first tick after
//! the deadline, so the 1.75 ms gap that Modbus RTU keeps between frames
//! above 19,200 Bd became 2 to 3 ms. At 115,200 Bd a read of a few registers
//! is about 5 ms on the wire, and the two gaps of each transaction (the
//! gateway's before its request, the device's before its reply) made the poll
//! cycle 1.5 times the wire time. On Linux a `timerfd` wakes the runtime
//! within microseconds of its deadline, without spinning; anywhere else, and
//! for waits of whole milliseconds, tokio's timer is used.

use std::time::{Duration, Instant};

/// Waits longer than this go to tokio's timer: rounding up by under a
/// millisecond is then a small part of the wait.
const PRECISE_BELOW: Duration = Duration::from_millis(10);

/// Returns at `deadline` or soon after, never before.
pub async fn sleep_until(deadline: Instant) {
    let remaining = deadline.saturating_duration_since(Instant::now());
    if remaining.is_zero() {
        return;
    }
    #[cfg(target_os = "linux")]
    if remaining < PRECISE_BELOW && linux::sleep(remaining).await.is_ok() {
        return;
    }
    // Elsewhere, or a timerfd refused (out of descriptors): tokio's timer, late by up to 1 ms.
    tokio::time::sleep_until(deadline.into()).await;
}

#[cfg(target_os = "linux")]
mod linux {
    use std::io;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::time::Duration;

    use tokio::io::unix::AsyncFd;
    use tokio::io::Interest;

    /// One-shot `timerfd` on the monotonic clock, awaited through the runtime's epoll.
    pub(super) async fn sleep(d: Duration) -> io::Result<()> {
        // SAFETY: a plain syscall; the descriptor it returns is owned at once below.
        let raw = unsafe { libc::timerfd_create(libc::CLOCK_MONOTONIC, libc::TFD_NONBLOCK | libc::TFD_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // Zeroed first: some 32-bit targets pad these structs with private fields. A zero
        // interval makes the timer one-shot.
        // SAFETY: itimerspec is plain integers, for which all zeroes is a valid value.
        let mut spec: libc::itimerspec = unsafe { std::mem::zeroed() };
        // `d` is under `PRECISE_BELOW`, so both fields fit.
        spec.it_value.tv_sec = d.as_secs() as libc::time_t;
        spec.it_value.tv_nsec = libc::c_long::from(d.subsec_nanos() as i32);
        // SAFETY: `fd` is a timerfd, `spec` a valid itimerspec, the old value is not asked for.
        if unsafe { libc::timerfd_settime(fd.as_raw_fd(), 0, &spec, std::ptr::null_mut()) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the AsyncFd owns `fd` (an OwnedFd), which stays open and the same
        // descriptor until the AsyncFd is dropped.
        let fd = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }.map_err(|e| e.into_parts().1)?;
        loop {
            let mut ready = fd.readable().await?;
            let mut expirations = [0u8; 8];
            // SAFETY: reads at most 8 bytes into an 8-byte buffer from a descriptor we own.
            let n = unsafe { libc::read(fd.as_raw_fd(), expirations.as_mut_ptr().cast(), expirations.len()) };
            if n == 8 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if n >= 0 || e.kind() != io::ErrorKind::WouldBlock {
                // Never seen; the caller falls back to tokio's timer rather than wait on
                // a readiness that will not come again.
                return Err(e);
            }
            // Not expired yet: wait for the next readiness.
            ready.clear_ready();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn never_wakes_before_the_deadline() {
        for micros in [0, 50, 400, 1_750, 4_010, 12_000] {
            let deadline = Instant::now() + Duration::from_micros(micros);
            sleep_until(deadline).await;
            assert!(Instant::now() >= deadline, "woke before a deadline {micros} µs away");
        }
    }
}
