//! The console's HTTP side: the page, its data as JSON, the event streams
//! that keep it live, and the write.
//!
//! - `GET /console/` and `/console/device/NAME`: the same page (the script
//!   shows what the path names), with `app.js` and `app.css` beside it.
//! - `GET /console/api/overview`, `/console/api/device/NAME`: JSON.
//! - `GET /console/events`, `/console/events/device/NAME`: server-sent
//!   events, each the whole JSON of the view. The first carries a device's
//!   point histories; later ones only each point's newest sample. An event
//!   goes out [`OVERVIEW_EVERY`] or [`DEVICE_EVERY`] after a change, so the
//!   changes in between travel together: at most a few events a second per
//!   open page, whatever the number of devices.
//! - `POST /console/api/device/NAME/write` with `{"path": …, "value": …}`,
//!   when writing is on: answered like a cloud command.
//!
//! Every route is behind the listener's login when it has one; responses
//! forbid framing and sniffing, and the page may load nothing but itself.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{from_fn_with_state, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::Value as Json;
use tokio::sync::watch;

use super::Shared;
use crate::http::{unauthorized, Login};
use crate::journal::{Entry, Source};
use crate::point::Value;
use crate::twin::command::{answer, check_set, summary, Status};

/// How long after a change the overview's event goes out.
pub(super) const OVERVIEW_EVERY: Duration = Duration::from_millis(500);
/// How long after a change a device page's event goes out.
pub(super) const DEVICE_EVERY: Duration = Duration::from_millis(250);
/// The largest write request read: one path and one value.
const MAX_WRITE_BODY: usize = 16 * 1024;

const INDEX_HTML: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const APP_CSS: &str = include_str!("assets/app.css");

/// The page may load its own script and style, and talk to its own origin;
/// nothing inline, nothing from elsewhere.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

#[derive(Clone)]
struct Ctx {
    shared: Arc<Shared>,
    login: Login,
}

pub(super) fn router(shared: Arc<Shared>, login: Login) -> Router {
    let ctx = Ctx { shared, login: login.clone() };
    Router::new()
        .route("/", get(|| async { Redirect::to("/console/") }))
        .route("/console", get(|| async { Redirect::to("/console/") }))
        .route("/console/", get(page))
        .route("/console/device/{name}", get(page))
        .route("/console/app.js", get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }))
        .route("/console/app.css", get(|| async { asset("text/css; charset=utf-8", APP_CSS) }))
        .route("/console/api/overview", get(overview))
        .route("/console/api/device/{name}", get(device))
        .route("/console/api/device/{name}/write", post(write).layer(DefaultBodyLimit::max(MAX_WRITE_BODY)))
        .route("/console/events", get(overview_events))
        .route("/console/events/device/{name}", get(device_events))
        .with_state(ctx)
        .layer(from_fn_with_state(login, guard))
}

/// The listener's login on every route, and headers that keep the page to itself.
async fn guard(State(login): State<Login>, request: Request, next: Next) -> Response {
    if !login.allows(request.headers()) {
        return unauthorized();
    }
    let mut response = next.run(request).await;
    let h = response.headers_mut();
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    // Live data, and assets that change with the binary.
    h.entry(header::CACHE_CONTROL).or_insert(HeaderValue::from_static("no-cache"));
    response
}

async fn page() -> Response {
    asset("text/html; charset=utf-8", INDEX_HTML)
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

fn json(status: StatusCode, body: String) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json"), (header::CACHE_CONTROL, "no-store")], body).into_response()
}

fn no_device(name: &str) -> Response {
    let shown: String = name.chars().flat_map(char::escape_debug).take(100).collect();
    json(StatusCode::NOT_FOUND, serde_json::json!({ "error": format!("no device named \"{shown}\"") }).to_string())
}

async fn overview(State(ctx): State<Ctx>) -> Response {
    json(StatusCode::OK, ctx.shared.overview())
}

async fn device(State(ctx): State<Ctx>, Path(name): Path<String>) -> Response {
    match ctx.shared.device(&name, true) {
        Some(body) => json(StatusCode::OK, body),
        None => no_device(&name),
    }
}

async fn overview_events(State(ctx): State<Ctx>) -> Response {
    let changes = ctx.shared.overview.subscribe();
    events(ctx.shared, changes, OVERVIEW_EVERY, |s, _| Some(s.overview()))
}

async fn device_events(State(ctx): State<Ctx>, Path(name): Path<String>) -> Response {
    let Some(changes) = ctx.shared.page(&name) else { return no_device(&name) };
    events(ctx.shared, changes, DEVICE_EVERY, move |s, first| s.device(&name, first))
}

/// A stream of `render`'s JSON: now, then `every` after each change, until
/// the gateway stops (the listener waits for open responses to end).
fn events<F>(shared: Arc<Shared>, changes: watch::Receiver<u64>, every: Duration, render: F) -> Response
where
    F: Fn(&Shared, bool) -> Option<String> + Send + Sync + 'static,
{
    let stream = futures_util::stream::unfold((shared, changes, render, true), move |(shared, mut changes, render, first)| async move {
        if !first {
            tokio::select! {
                changed = changes.changed() => changed.ok()?,
                () = shared.cancel.cancelled() => return None,
            }
            tokio::select! {
                () = tokio::time::sleep(every) => {}
                () = shared.cancel.cancelled() => return None,
            }
            changes.borrow_and_update();
        }
        let data = render(&shared, first)?;
        Some((Ok::<_, Infallible>(Event::default().data(data)), (shared, changes, render, false)))
    });
    let mut response = Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))).into_response();
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// Numbers the console's writes, for the journal and the answer.
static WRITES: AtomicU64 = AtomicU64::new(1);

async fn write(State(ctx): State<Ctx>, Path(name): Path<String>, headers: HeaderMap, body: Bytes) -> Response {
    let refuse = |status: StatusCode, why: &str| json(status, serde_json::json!({ "status": "rejected", "error": why }).to_string());
    let s = &ctx.shared;
    // Validation ensures a login whenever writing is on; without one, nobody
    // could be named as the writer, so nothing is written.
    let (true, Some(who)) = (s.settings.write, ctx.login.username()) else {
        return refuse(StatusCode::FORBIDDEN, "writing from the console is off: set `http.console: { write: true }` and a login in gateway.yaml");
    };
    // A page elsewhere cannot send JSON here without asking first (CORS),
    // which this listener never allows; and a browser names the page's
    // origin: so a logged-in browser cannot be made to write by another site.
    let json_body = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|v| v.starts_with("application/json"));
    if !json_body {
        return refuse(StatusCode::UNSUPPORTED_MEDIA_TYPE, "send the write as application/json");
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        let host = headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or_default();
        if origin.to_str().ok() != Some(format!("http://{host}").as_str()) {
            return refuse(StatusCode::FORBIDDEN, "a write must come from the console's own page");
        }
    }
    let Some(device) = s.handle(&name) else { return no_device(&name) };
    let request: Json = serde_json::from_slice(&body).unwrap_or_default();
    let (Some(path), Some(value)) = (request.get("path").and_then(Json::as_str), request.get("value")) else {
        return refuse(StatusCode::BAD_REQUEST, r#"send {"path": "deviceAttrib.setpoint", "value": 42}"#);
    };
    let id = format!("console-{}", WRITES.fetch_add(1, Ordering::Relaxed));
    let id_json = Json::String(id.clone());
    let started = std::time::Instant::now();
    let doc = match check_set(&device.points, &[(path.to_string(), value.clone())]) {
        Err(errors) => answer(Some(&id_json), &Status::Rejected(summary(&errors)), &[], &errors, crate::twin::now_ms()),
        Ok(writes) => {
            let outcome = device.write(writes).await;
            let values: Vec<(&str, &Value)> = outcome.values.iter().filter_map(|(i, v)| Some((device.points.get(*i)?.path.as_str(), v))).collect();
            let status = match &outcome.error {
                None => Status::Succeeded,
                Some(e) => Status::Failed(e.clone()),
            };
            answer(Some(&id_json), &status, &values, &BTreeMap::new(), crate::twin::now_ms())
        }
    };
    let status = doc["status"].as_str().unwrap_or("unknown");
    let shown: String = value.to_string().chars().take(200).collect();
    tracing::info!(device = %name, point = %path, value = %shown, by = %who, id = %id, status, error = %doc["error"].as_str().unwrap_or(""), "write from the console");
    device.journal().record(Entry::from_answer(Source::Console, Some(&id), "set", &doc, started.elapsed()).by(who));
    let code = match status {
        "succeeded" => StatusCode::OK,
        "rejected" => StatusCode::UNPROCESSABLE_ENTITY,
        _ => StatusCode::BAD_GATEWAY,
    };
    json(code, doc.to_string())
}
