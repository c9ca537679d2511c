//! Opening the wire of a bus: a serial port for RTU, a socket for TCP.
//!
//! Both give the same `tokio_modbus` client context, so the bus owner does not
//! care which it has. Opening is retried by the bus owner on the next request,
//! so a missing USB adapter or an unreachable PLC is an error for that request,
//! never a crash.

use std::io;
use std::time::Duration;

use tokio_modbus::client::Context;
use tokio_modbus::Slave;
use tokio_serial::SerialPortBuilderExt;

use crate::config::{Parity, Transport};

/// Opens the transport, within `timeout`.
pub(super) async fn open(transport: &Transport, timeout: Duration) -> io::Result<Context> {
    match transport {
        Transport::Tcp { host, port } => {
            let connect = async {
                let stream = tokio::net::TcpStream::connect((host.as_str(), *port)).await?;
                // Modbus frames are tiny; without this a reply can wait ~40 ms
                // for the peer's delayed ACK.
                stream.set_nodelay(true)?;
                Ok::<_, io::Error>(tokio_modbus::client::tcp::attach_slave(stream, Slave(1)))
            };
            match tokio::time::timeout(timeout, connect).await {
                Ok(Ok(ctx)) => Ok(ctx),
                Ok(Err(e)) => Err(io::Error::new(e.kind(), format!("cannot connect to {host}:{port}: {e}"))),
                Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, format!("cannot connect to {host}:{port}: no answer within {timeout:?}"))),
            }
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
