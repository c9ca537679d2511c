//! SOCKS5 to the broker, through a loopback tunnel.
//!
//! rumqttc speaks HTTP CONNECT to proxies but not SOCKS5, and offers no hook
//! for a custom connector. So the gateway listens on a loopback port; for each
//! connection rumqttc makes there, it opens a SOCKS5 stream to the broker
//! (tokio-socks) and, for TLS, does the handshake itself with the broker's real
//! host name (tokio-rustls), so that verification and SNI are right. rumqttc
//! then speaks plain MQTT (or WebSocket) to the loopback end.

use std::sync::Arc;

use rustls::pki_types::ServerName;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_socks::tcp::Socks5Stream;
use tokio_util::sync::CancellationToken;

use crate::config::Proxy;

/// Starts the tunnel to `host:port` through `proxy`; returns the loopback port.
/// Errors of the proxy leg go to `errors`, so the connection can log the real cause.
pub(crate) async fn start(
    proxy: Proxy,
    host: String,
    port: u16,
    tls: Option<Arc<rustls::ClientConfig>>,
    errors: mpsc::UnboundedSender<String>,
    cancel: CancellationToken,
) -> std::io::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let local = listener.local_addr()?.port();
    // One MQTT connection at a time: the tunnel carries the gateway's identity
    // (its client certificate), so another local process must not ride it.
    let busy = Arc::new(std::sync::atomic::AtomicBool::new(false));
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                () = cancel.cancelled() => break,
            };
            let Ok((local_stream, peer)) = accepted else { continue };
            if busy.swap(true, std::sync::atomic::Ordering::SeqCst) {
                tracing::warn!(%peer, "refusing a second connection to the SOCKS5 tunnel");
                continue;
            }
            let busy = busy.clone();
            let (proxy, host, tls, errors, cancel) = (proxy.clone(), host.clone(), tls.clone(), errors.clone(), cancel.clone());
            tokio::spawn(async move {
                let result = tokio::select! {
                    r = serve(local_stream, &proxy, &host, port, tls) => r,
                    () = cancel.cancelled() => Ok(()),
                };
                busy.store(false, std::sync::atomic::Ordering::SeqCst);
                if let Err(e) = result {
                    let _ = errors.send(format!("SOCKS5 proxy {}:{}: {e}", proxy.host, proxy.port));
                }
            });
        }
    });
    Ok(local)
}

async fn serve(mut local: TcpStream, proxy: &Proxy, host: &str, port: u16, tls: Option<Arc<rustls::ClientConfig>>) -> Result<(), String> {
    let _ = local.set_nodelay(true);
    let target = (host, port);
    let proxy_addr = (proxy.host.as_str(), proxy.port);
    let stream = match &proxy.credentials {
        Some(c) => Socks5Stream::connect_with_password(proxy_addr, target, &c.username, c.password.expose()).await,
        None => Socks5Stream::connect(proxy_addr, target).await,
    }
    .map_err(|e| format!("cannot reach {host}:{port} through the proxy: {e}"))?;
    let _ = stream.set_nodelay(true);
    match tls {
        None => {
            let mut stream = stream;
            let _ = tokio::io::copy_bidirectional(&mut local, &mut stream).await;
        }
        Some(config) => {
            let name = ServerName::try_from(host.to_string()).map_err(|e| format!("{host} is not a valid TLS server name: {e}"))?;
            let mut tls_stream = tokio_rustls::TlsConnector::from(config)
                .connect(name, stream)
                .await
                .map_err(|e| format!("TLS with {host}:{port}: {e}"))?;
            let _ = tokio::io::copy_bidirectional(&mut local, &mut tls_stream).await;
        }
    }
    Ok(())
}
