//! Reaching the broker, layer by layer: a TCP stream (direct, through an
//! HTTP CONNECT proxy or through SOCKS5), then TLS with the broker's real
//! name, then a WebSocket. Each failure comes back as one line that names
//! the layer and the cause, which `session::explain` turns into a hint.
//! Nothing here formats a password: the proxy's only goes into the CONNECT
//! request or the SOCKS5 handshake.

use std::sync::Arc;

use async_tungstenite::tungstenite::client::IntoClientRequest;
use async_tungstenite::tungstenite::http::HeaderValue;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_socks::tcp::Socks5Stream;
use ws_stream_tungstenite::WsStream;

use crate::config::{Proxy, ProxyKind};

/// A byte stream to the broker, whatever it runs over.
pub(crate) trait Stream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Stream for T {}

/// Where the broker is and how to reach it.
#[derive(Clone, Debug)]
pub(crate) struct Target {
    pub(crate) host: String,
    pub(crate) port: u16,
    /// TLS with this configuration (its ALPN included), for `mqtts://` and `wss://`.
    pub(crate) tls: Option<Arc<rustls::ClientConfig>>,
    /// WebSocket on this HTTP path, for `ws://` and `wss://`.
    pub(crate) websocket_path: Option<String>,
    pub(crate) proxy: Option<Proxy>,
}

impl Target {
    /// `host:port`, with brackets around an IPv6 address.
    fn authority(&self) -> String {
        authority(&self.host, self.port)
    }
}

fn authority(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Opens a stream to the broker, ready for MQTT bytes.
pub(crate) async fn dial(t: &Target) -> Result<Box<dyn Stream>, String> {
    let tcp = match &t.proxy {
        None => tcp(&t.host, t.port).await?,
        Some(p) if p.kind == ProxyKind::Http => http_connect(p, &t.host, t.port).await?,
        Some(p) => socks5(p, &t.host, t.port).await?,
    };
    let stream: Box<dyn Stream> = match &t.tls {
        None => Box::new(tcp),
        Some(config) => {
            let name = ServerName::try_from(t.host.clone()).map_err(|e| format!("{} is not a valid TLS server name: {e}", t.host))?;
            let tls = tokio_rustls::TlsConnector::from(config.clone())
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS with {}: {e}", t.authority()))?;
            Box::new(tls)
        }
    };
    match &t.websocket_path {
        None => Ok(stream),
        Some(path) => websocket(stream, t, path).await,
    }
}

/// Resolves, then tries each address in turn (as rumqttc did); no Nagle,
/// or a small answer waits for the peer's delayed ACK.
async fn tcp(host: &str, port: u16) -> Result<TcpStream, String> {
    let addrs: Vec<_> = tokio::net::lookup_host((host, port)).await.map_err(|e| format!("cannot resolve {host}: {e}"))?.collect();
    let mut last = format!("cannot resolve {host}: no address");
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(s) => {
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Err(e) => last = format!("cannot connect to {addr}: {e}"),
        }
    }
    Err(last)
}

async fn socks5(p: &Proxy, host: &str, port: u16) -> Result<TcpStream, String> {
    let proxy = (p.host.as_str(), p.port);
    let stream = match &p.credentials {
        Some(c) => Socks5Stream::connect_with_password(proxy, (host, port), &c.username, c.password.expose()).await,
        None => Socks5Stream::connect(proxy, (host, port)).await,
    }
    .map_err(|e| format!("SOCKS5 proxy {}: cannot reach {} through it: {e}", authority(&p.host, p.port), authority(host, port)))?;
    let stream = stream.into_inner();
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// The longest proxy answer head read; a real one is a few lines.
const MAX_PROXY_ANSWER: usize = 8 * 1024;

async fn http_connect(p: &Proxy, host: &str, port: u16) -> Result<TcpStream, String> {
    let proxy = authority(&p.host, p.port);
    let mut s = tcp(&p.host, p.port).await.map_err(|e| format!("HTTP proxy {proxy}: {e}"))?;
    let target = authority(host, port);
    let login = p.credentials.as_ref().map(|c| (c.username.as_str(), c.password.expose()));
    s.write_all(connect_request(&target, login).as_bytes())
        .await
        .map_err(|e| format!("HTTP proxy {proxy}: sending CONNECT: {e}"))?;
    // Byte by byte up to the blank line: whatever follows it is the broker's.
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() >= MAX_PROXY_ANSWER {
            return Err(format!("HTTP proxy {proxy}: its answer to CONNECT is longer than {MAX_PROXY_ANSWER} bytes"));
        }
        match s.read_u8().await {
            Ok(b) => head.push(b),
            Err(e) => return Err(format!("HTTP proxy {proxy}: closed before answering CONNECT to {target}: {e}")),
        }
    }
    check_proxy_answer(&head).map_err(|why| format!("HTTP proxy {proxy} refused CONNECT to {target}: {why}"))?;
    Ok(s)
}

/// The CONNECT request; it holds the proxy password (base64): never log it.
fn connect_request(target: &str, login: Option<(&str, &str)>) -> String {
    let mut req = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
    if let Some((user, password)) = login {
        let token = data_encoding::BASE64.encode(format!("{user}:{password}").as_bytes());
        req.push_str(&format!("Proxy-Authorization: Basic {token}\r\n"));
    }
    req.push_str("\r\n");
    req
}

/// Ok for a 2xx answer; else its status line, printable and short.
fn check_proxy_answer(head: &[u8]) -> Result<(), String> {
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let line: String = String::from_utf8_lossy(line).chars().filter(|c| !c.is_control()).take(200).collect();
    let mut words = line.split_whitespace();
    let status = match (words.next(), words.next()) {
        (Some(v), Some(code)) if v.starts_with("HTTP/") => code.parse::<u16>().ok(),
        _ => None,
    };
    match status {
        Some(200..=299) => Ok(()),
        Some(_) => Err(line),
        None => Err(format!("not an HTTP answer: {line:?}")),
    }
}

async fn websocket(stream: Box<dyn Stream>, t: &Target, path: &str) -> Result<Box<dyn Stream>, String> {
    let scheme = if t.tls.is_some() { "wss" } else { "ws" };
    let url = format!("{scheme}://{}{path}", t.authority());
    let fail = |why: String| format!("WebSocket handshake with {url}: {why}");
    let mut request = url.as_str().into_client_request().map_err(|e| fail(e.to_string()))?;
    request.headers_mut().insert("Sec-WebSocket-Protocol", HeaderValue::from_static("mqtt"));
    let (ws, response) = async_tungstenite::tokio::client_async(request, stream).await.map_err(|e| match e {
        async_tungstenite::tungstenite::Error::Http(r) => fail(format!("the server answered HTTP {}", r.status())),
        other => fail(other.to_string()),
    })?;
    let protocol = response.headers().get("Sec-WebSocket-Protocol").and_then(|v| v.to_str().ok()).map(str::trim);
    if protocol != Some("mqtt") {
        return Err(fail(format!("the server did not accept the subprotocol mqtt (it answered {protocol:?})")));
    }
    Ok(Box::new(WsStream::new(ws)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connect_request_carries_basic_auth_when_the_proxy_has_a_login() {
        let req = connect_request("broker:8883", Some(("gw", "p@ss")));
        assert_eq!(req, "CONNECT broker:8883 HTTP/1.1\r\nHost: broker:8883\r\nProxy-Authorization: Basic Z3c6cEBzcw==\r\n\r\n");
        assert_eq!(connect_request("[::1]:1883", None), "CONNECT [::1]:1883 HTTP/1.1\r\nHost: [::1]:1883\r\n\r\n");
    }

    #[test]
    fn a_proxy_answer_other_than_2xx_is_refused_with_its_status_line() {
        assert_eq!(check_proxy_answer(b"HTTP/1.1 200 Connection established\r\n\r\n"), Ok(()));
        assert_eq!(check_proxy_answer(b"HTTP/1.0 200 OK\r\nVia: x\r\n\r\n"), Ok(()));
        assert_eq!(
            check_proxy_answer(b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic\r\n\r\n"),
            Err("HTTP/1.1 407 Proxy Authentication Required".to_string())
        );
        assert!(check_proxy_answer(b"SSH-2.0-OpenSSH\r\n\r\n").is_err_and(|e| e.starts_with("not an HTTP answer")));
    }
}
