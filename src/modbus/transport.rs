//! Opening the wire of a bus: a serial port for RTU, a socket for TCP, a
//! socket carrying RTU frames for a serial device server.
//!
//! All give the same `tokio_modbus` client context, so the bus owner does not
//! care which it has. Opening is retried by the bus owner on the next request,
//! so a missing USB adapter or an unreachable PLC is an error for that request,
//! never a crash.
//!
//! RTU over TCP keeps its connection when a device behind the device server
//! stays silent: the server and its socket are fine, and reconnecting at
//! every timeout (a dead unit on the line times out at every probe) would
//! churn connections on a server that may take only one or two at a time
//! and free a closed one late. RTU frames carry no transaction number, so a
//! late reply must not be read as the answer to the next request: what
//! arrived unasked is discarded before each request is sent
//! ([`DiscardStale`]), and a reply that still does not match its request
//! (another unit, another function) is a transport error, after which the
//! bus owner reconnects.

use std::io;
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_modbus::client::Context;
use tokio_modbus::Slave;
use tokio_serial::SerialPortBuilderExt;

use crate::config::{Parity, Transport};

/// Opens the transport; `timeout` bounds a Modbus TCP connect (RTU over TCP
/// has its own `connect_timeout`).
pub(super) async fn open(transport: &Transport, timeout: Duration) -> io::Result<Context> {
    match transport {
        Transport::Tcp { host, port } => {
            let stream = connect(host, *port, timeout, "").await?;
            Ok(tokio_modbus::client::tcp::attach_slave(stream, Slave(1)))
        }
        Transport::RtuTcp { host, port, connect_timeout } => {
            let stream = connect(host, *port, *connect_timeout, "the device server ").await?;
            Ok(tokio_modbus::client::rtu::attach_slave(DiscardStale::new(stream), Slave(1)))
        }
        Transport::Rtu(s) => {
            let parity = match s.parity {
                Parity::None => tokio_serial::Parity::None,
                Parity::Even => tokio_serial::Parity::Even,
                Parity::Odd => tokio_serial::Parity::Odd,
            };
            let data_bits = if s.data_bits == 7 { tokio_serial::DataBits::Seven } else { tokio_serial::DataBits::Eight };
            let stop_bits = if s.stop_bits == 2 { tokio_serial::StopBits::Two } else { tokio_serial::StopBits::One };
            let port = tokio_serial::new(&s.port, s.baud)
                .parity(parity)
                .data_bits(data_bits)
                .stop_bits(stop_bits)
                .open_native_async()
                .map_err(|e| io::Error::other(format!("cannot open serial port {}: {e}", s.port)))?;
            Ok(tokio_modbus::client::rtu::attach_slave(port, Slave(1)))
        }
    }
}

async fn connect(host: &str, port: u16, timeout: Duration, what: &str) -> io::Result<TcpStream> {
    let connect = async {
        let stream = TcpStream::connect((host, port)).await?;
        // Modbus frames are tiny; without this a reply can wait ~40 ms
        // for the peer's delayed ACK.
        stream.set_nodelay(true)?;
        Ok::<_, io::Error>(stream)
    };
    match tokio::time::timeout(timeout, connect).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(e)) => Err(io::Error::new(e.kind(), format!("cannot connect to {what}{host}:{port}: {e}"))),
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, format!("cannot connect to {what}{host}:{port}: no answer within {}", humantime::format_duration(timeout)))),
    }
}

/// A socket that drops whatever arrived since the last request was
/// answered (or given up on) before it sends the next one: bytes that
/// arrive unasked can only be a late reply to an earlier request.
#[derive(Debug)]
pub(super) struct DiscardStale {
    stream: TcpStream,
    /// Set once the client reads, so that its next write starts a request.
    read_since_write: bool,
}

impl DiscardStale {
    fn new(stream: TcpStream) -> Self {
        DiscardStale { stream, read_since_write: false }
    }

    /// Reads and drops what is readable now, without waiting. An end of
    /// stream is left for the next read to find.
    fn discard(&mut self) -> io::Result<usize> {
        let mut scratch = [0u8; 256];
        let mut dropped = 0;
        loop {
            match self.stream.try_read(&mut scratch) {
                Ok(0) => return Ok(dropped),
                Ok(n) => dropped += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(dropped),
                Err(e) => return Err(e),
            }
        }
    }
}

impl AsyncRead for DiscardStale {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        self.read_since_write = true;
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for DiscardStale {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if self.read_since_write {
            self.read_since_write = false;
            match self.discard() {
                Ok(0) => {}
                Ok(n) => tracing::debug!(bytes = n, "RTU over TCP: dropped a late reply before the next request"),
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    #[tokio::test]
    async fn bytes_that_arrived_unasked_are_dropped_before_the_next_request() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let device = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.expect("accept");
            let mut request = [0u8; 1];
            s.read_exact(&mut request).await.expect("first request");
            s.write_all(&[10]).await.expect("first reply");
            // A late reply to a request the client gave up on.
            s.write_all(&[66, 66, 66]).await.expect("late reply");
            s.read_exact(&mut request).await.expect("second request");
            s.write_all(&[20]).await.expect("second reply");
        });
        let mut client = DiscardStale::new(TcpStream::connect(addr).await.expect("connect"));
        let mut reply = [0u8; 1];
        client.write_all(&[1]).await.expect("send");
        client.read_exact(&mut reply).await.expect("read");
        assert_eq!(reply, [10]);
        tokio::time::sleep(Duration::from_millis(100)).await;
        client.write_all(&[2]).await.expect("send");
        client.read_exact(&mut reply).await.expect("read");
        assert_eq!(reply, [20], "the late bytes were dropped, not read as the answer");
        device.await.expect("device");
    }
}
