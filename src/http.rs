//! The gateway's one HTTP listener: Prometheus metrics, liveness and readiness.
//!
//! Off unless `http:` is configured; loopback in the shipped demo. `twinbus
//! check` refuses an address beyond loopback without a user name and password
//! (HTTP basic authentication, checked on every request): metrics name every
//! device and topic of a site.
//!
//! - `GET /metrics`: everything counted through the `metrics` facade, in the
//!   Prometheus text format (metrics-exporter-prometheus renders it; the
//!   recorder is installed once per process).
//! - `GET /healthz`: 200 while the process serves requests (liveness).
//! - `GET /readyz`: 200 once every connection is up with its subscriptions
//!   acknowledged and every device has been polled at least once, else 503;
//!   the body says what is missing (readiness for a load balancer or an
//!   orchestrator; a device that is polled and offline still counts as
//!   polled: it is the field's state, not the gateway's).

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use anyhow::Context as _;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::HttpSettings;
use crate::device::{directory, Directory, Health};
use crate::lifecycle::Tasks;

/// What `/readyz` looks at: each connection's session count and each
/// device's snapshots, by name.
#[derive(Clone, Debug, Default)]
pub struct Readiness {
    /// Connection name → sessions that came up (0: never connected yet).
    pub connections: Vec<(String, watch::Receiver<u64>)>,
    /// The running devices (a reload changes them).
    pub devices: Directory,
    /// Connection name → whether it is connected right now.
    pub connected: Vec<(String, watch::Receiver<bool>)>,
}

impl Readiness {
    /// Ready, and what is not when not.
    fn check(&self) -> (bool, Vec<String>) {
        let mut missing = Vec::new();
        for (name, up) in &self.connected {
            if !*up.borrow() {
                missing.push(format!("connection {name}: not connected"));
            }
        }
        for (name, sessions) in &self.connections {
            if *sessions.borrow() == 0 {
                missing.push(format!("connection {name}: subscriptions not acknowledged yet"));
            }
        }
        for (name, device) in directory(&self.devices).iter() {
            if device.watch().borrow().health == Health::Unknown {
                missing.push(format!("device {name}: not polled yet"));
            }
        }
        (missing.is_empty(), missing)
    }
}

#[derive(Clone)]
struct AppState {
    metrics: PrometheusHandle,
    readiness: Arc<Readiness>,
    /// `Basic base64(user:password)`, when the listener wants a login.
    authorization: Option<Arc<String>>,
}

/// The process-wide Prometheus handle; installs the recorder on first use.
/// (A second gateway in one process, as in tests, shares it.)
pub fn metrics() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            // Modbus transactions take milliseconds; commands up to seconds.
            let buckets = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
            let builder = PrometheusBuilder::new().set_buckets_for_metric(Matcher::Suffix("_seconds".to_string()), &buckets);
            let builder = match builder {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!("metrics: default histogram buckets ({e})");
                    PrometheusBuilder::new()
                }
            };
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            if let Err(e) = metrics::set_global_recorder(recorder) {
                tracing::warn!("another metrics recorder is installed; /metrics will be empty: {e}");
            }
            handle
        })
        .clone()
}

/// Starts the listener on `tasks`; returns the address it listens on.
pub async fn start(settings: &HttpSettings, readiness: Readiness, tasks: &Tasks, cancel: CancellationToken) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .with_context(|| format!("the HTTP listener (metrics, health) cannot listen on {} (is the port in use?)", settings.listen))?;
    let addr = listener.local_addr()?;
    let authorization = settings.credentials.as_ref().map(|c| Arc::new(format!("Basic {}", base64(&format!("{}:{}", c.username, c.password.expose())))));
    let state = AppState { metrics: metrics(), readiness: Arc::new(readiness), authorization };
    let app = Router::new()
        .route("/metrics", get(metrics_page))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state);
    tasks.spawn("HTTP listener", async move {
        if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(cancel.cancelled_owned()).await {
            tracing::error!("the HTTP listener stopped: {e}");
        }
    });
    Ok(addr)
}

fn authorized(state: &AppState, headers: &HeaderMap) -> bool {
    let Some(expected) = &state.authorization else { return true };
    let given = headers.get(header::AUTHORIZATION).map(|v| v.as_bytes()).unwrap_or_default();
    constant_time_eq(given, expected.as_bytes())
}

fn unauthorized() -> Response {
    (StatusCode::UNAUTHORIZED, [(header::WWW_AUTHENTICATE, "Basic realm=\"twinbus\"")], "a user name and password are required\n").into_response()
}

async fn metrics_page(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if !authorized(&state, &headers) {
        return unauthorized();
    }
    // Histograms keep summaries that must be drained now and then.
    state.metrics.run_upkeep();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], state.metrics.render()).into_response()
}

async fn healthz(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if !authorized(&state, &headers) {
        return unauthorized();
    }
    "ok\n".into_response()
}

async fn readyz(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if !authorized(&state, &headers) {
        return unauthorized();
    }
    match state.readiness.check() {
        (true, _) => "ready\n".into_response(),
        (false, missing) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready:\n{}\n", missing.join("\n"))).into_response(),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Standard base64 with padding (what HTTP basic authentication uses).
fn base64(text: &str) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |acc, (i, b)| acc | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ABC[(n >> (18 - 6 * i) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_authentication_encodes_as_the_rfc_says() {
        assert_eq!(base64("Aladdin:open sesame"), "QWxhZGRpbjpvcGVuIHNlc2FtZQ==");
        assert_eq!(base64("a:b"), "YTpi");
        assert_eq!(base64("ab:"), "YWI6");
        assert_eq!(base64(""), "");
    }

    #[test]
    fn readiness_names_what_is_missing() {
        let (_up, sessions) = watch::channel(0u64);
        let (_c, connected) = watch::channel(true);
        let r = Readiness { connections: vec![("aws".into(), sessions)], devices: Directory::default(), connected: vec![("aws".into(), connected)] };
        assert_eq!(r.check(), (false, vec!["connection aws: subscriptions not acknowledged yet".to_string()]));
    }
}
