//! The simulator's sockets: Modbus TCP or RTU-over-TCP framing on each
//! accepted connection, a count of connections, and a way to cut them all
//! from the simulator's side (a device server that restarts); or RTU on a
//! serial port (a pty pair's end in tests and benchmarks).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use super::Service;
use crate::config::Framing;

/// The simulator's connections: how many were accepted, and the token that
/// ends the open ones (replaced after each cut, so later ones live on).
#[derive(Clone, Debug, Default)]
pub(super) struct Connections {
    accepted: Arc<AtomicU64>,
    cut: Arc<Mutex<CancellationToken>>,
}

impl Connections {
    pub(super) fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    pub(super) fn cut(&self) {
        let mut token = self.cut.lock().unwrap_or_else(|e| e.into_inner());
        token.cancel();
        *token = CancellationToken::new();
    }

    fn accept(&self, stream: TcpStream) -> Cuttable {
        self.accepted.fetch_add(1, Ordering::Relaxed);
        let _ = stream.set_nodelay(true);
        let token = self.cut.lock().unwrap_or_else(|e| e.into_inner()).clone();
        Cuttable { stream, cut: Box::pin(token.cancelled_owned()) }
    }
}

/// Serves `service` on every connection of `listener` until `cancel` fires.
pub(super) async fn serve(listener: TcpListener, framing: Framing, service: Service, connections: Connections, cancel: CancellationToken) {
    let on_connected = |stream: TcpStream, _peer: SocketAddr| {
        let (service, stream) = (service.clone(), connections.accept(stream));
        async move { Ok::<_, io::Error>(Some((service, stream))) }
    };
    let on_error = |e| tracing::debug!("simulator connection ended: {e}");
    let served = async {
        match framing {
            Framing::Tcp => tokio_modbus::server::tcp::Server::new(listener).serve(&on_connected, on_error).await,
            Framing::Rtu => tokio_modbus::server::rtu_over_tcp::Server::new(listener).serve(&on_connected, on_error).await,
        }
    };
    tokio::select! {
        r = served => if let Err(e) = r { tracing::error!("simulator stopped: {e}") },
        () = cancel.cancelled() => {}
    }
}

/// Opens a serial port for the simulator: 8 data bits, even parity, 1 stop
/// bit (the 11-bit character the pacing assumes).
pub(super) fn open_serial(path: &Path, baud: u32) -> io::Result<tokio_serial::SerialStream> {
    let builder = tokio_serial::new(path.to_string_lossy(), baud)
        .data_bits(tokio_serial::DataBits::Eight)
        .parity(tokio_serial::Parity::Even)
        .stop_bits(tokio_serial::StopBits::One);
    tokio_serial::SerialStream::open(&builder).map_err(io::Error::other)
}

/// Serves `service` as Modbus RTU on a serial port until `cancel` fires. A
/// port that fails (a pty whose other end went away, an unplugged adapter)
/// is opened again after a second; each opening counts as a connection.
pub(super) async fn serve_serial(port: tokio_serial::SerialStream, path: PathBuf, baud: u32, service: Service, connections: Connections, cancel: CancellationToken) {
    let mut port = Some(port);
    loop {
        let stream = match port.take() {
            Some(p) => Ok(p),
            None => open_serial(&path, baud),
        };
        match stream {
            Ok(stream) => {
                connections.accepted.fetch_add(1, Ordering::Relaxed);
                let server = tokio_modbus::server::rtu::Server::new(stream);
                match server.serve_until(service.clone(), cancel.clone().cancelled_owned()).await {
                    Ok(tokio_modbus::server::Terminated::Aborted) => return,
                    Ok(_) => tracing::debug!(port = %path.display(), "simulator: serial port closed"),
                    Err(e) => tracing::debug!(port = %path.display(), "simulator: serial port failed: {e}"),
                }
            }
            Err(e) => tracing::warn!(port = %path.display(), "simulator cannot open the serial port: {e}"),
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// A connection that reads as closed once cut, so that the server's task
/// for it ends and drops (closes) the socket.
struct Cuttable {
    stream: TcpStream,
    cut: Pin<Box<WaitForCancellationFutureOwned>>,
}

impl AsyncRead for Cuttable {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if self.cut.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Cuttable {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
