//! The embedded MQTT broker (rmqtt), for the demo, the tests and local-only sites.
//!
//! rmqtt spawns every client session as a task of its own, so stopping its
//! `run()` future would leave sessions alive. It therefore gets a thread and a
//! runtime of its own, dropped at shutdown, which ends every session. Its
//! listener defaults to 0.0.0.0 with Nagle on; we always pass the configured
//! address (loopback in the shipped config) and turn Nagle off.
//!
//! Closed by default ([`Access`]): rmqtt accepts anyone for anything unless
//! told otherwise, so a hook decides every login, publish and subscribe. The
//! gateway's own session logs in with a secret made at start, so no other
//! client can take its client id and knock it off. Other clients log in as
//! a configured user, or, when none is configured (loopback only: `check`
//! refuses more), without a login; either way they may publish only to the
//! twins' command and shadow topics and subscribe only to their answers,
//! telemetry, presence and shadow topics, unless a user's own `publish` and
//! `subscribe` lists say otherwise. Connections are capped, and a socket
//! that does not log in within a few seconds is closed.

use std::net::SocketAddr;
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{anyhow, Context as _};
use rmqtt::hook::{Handler, HookResult, Parameter, ReturnType, Type};
use rmqtt::codec::v5::SubscribeAckReason;
use rmqtt::types::{AuthResult, PublishAclResult, SubscribeAclResult};
use tokio::sync::oneshot;

use super::topic::{allowed_by, matches};
use crate::config::{BrokerUser, Secret};

/// Who may do what on the embedded broker; built by the gateway from the
/// config (see the module docs).
#[derive(Clone, Debug)]
pub struct Access {
    /// The gateway's own session: its client id, user name and the secret
    /// made at start. Nobody else may use the client id or the name.
    pub gateway: Option<(String, String, Secret)>,
    /// Configured logins; empty: clients connect without one.
    pub users: Vec<BrokerUser>,
    /// What a client may do unless its login says otherwise.
    pub defaults: Permissions,
    /// Most client connections at once.
    pub max_connections: usize,
}

/// Topic filters a client may publish to and subscribe to.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Permissions {
    /// Filters covering the topics it may publish to.
    pub publish: Vec<String>,
    /// Filters covering what it may subscribe to.
    pub subscribe: Vec<String>,
}

/// Who a client turned out to be.
#[derive(Debug, PartialEq)]
enum Login {
    Gateway,
    User,
    Anonymous,
}

impl Access {
    /// Anyone may publish and subscribe anything: for tests that need a
    /// broker of their own, standing in for a cloud broker.
    pub fn anyone() -> Access {
        let all = vec!["#".to_string(), "$aws/#".to_string()];
        Access { gateway: None, users: Vec::new(), defaults: Permissions { publish: all.clone(), subscribe: all }, max_connections: 10_000 }
    }

    fn authenticate(&self, client_id: &str, username: Option<&str>, password: Option<&[u8]>) -> Result<Login, AuthResult> {
        let secret_ok = |expected: &Secret| password.is_some_and(|p| constant_time_eq(p, expected.expose().as_bytes()));
        if let Some((gw_client, gw_user, gw_secret)) = &self.gateway {
            if client_id == gw_client || username == Some(gw_user.as_str()) {
                // Only the gateway itself: nobody may take its client id or name.
                return match client_id == gw_client && username == Some(gw_user.as_str()) && secret_ok(gw_secret) {
                    true => Ok(Login::Gateway),
                    false => Err(AuthResult::NotAuthorized),
                };
            }
        }
        if self.users.is_empty() {
            return Ok(Login::Anonymous);
        }
        match self.users.iter().find(|u| Some(u.name.as_str()) == username) {
            Some(u) if secret_ok(&u.password) => Ok(Login::User),
            Some(_) => Err(AuthResult::BadUsernameOrPassword),
            None if username.is_none() => Err(AuthResult::NotAuthorized),
            None => Err(AuthResult::BadUsernameOrPassword),
        }
    }

    fn permissions(&self, username: Option<&str>) -> Option<(&[String], &[String])> {
        if self.users.is_empty() {
            return Some((&self.defaults.publish, &self.defaults.subscribe));
        }
        let u = self.users.iter().find(|u| Some(u.name.as_str()) == username)?;
        Some((u.publish.as_deref().unwrap_or(&self.defaults.publish), u.subscribe.as_deref().unwrap_or(&self.defaults.subscribe)))
    }

    fn may_publish(&self, username: Option<&str>, topic: &str) -> bool {
        self.permissions(username).is_some_and(|(publish, _)| publish.iter().any(|f| matches(f, topic)))
    }

    fn may_subscribe(&self, username: Option<&str>, filter: &str) -> bool {
        self.permissions(username).is_some_and(|(_, subscribe)| allowed_by(subscribe, filter))
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// rmqtt's side of [`Access`]: one handler for the three hooks.
struct Guard(Arc<RwLock<Access>>);

impl Guard {
    fn access(&self) -> std::sync::RwLockReadGuard<'_, Access> {
        // A poisoned lock only means a panic elsewhere; the policy is intact.
        self.0.read().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[async_trait::async_trait]
impl Handler for Guard {
    async fn hook(&self, param: &Parameter, acc: Option<HookResult>) -> ReturnType {
        match param {
            Parameter::ClientAuthenticate(info) => {
                let client_id = info.client_id().to_string();
                let username = info.username().map(|u| u.to_string());
                let verdict = self.access().authenticate(&client_id, username.as_deref(), info.password().map(|p| p.as_ref()));
                let result = match verdict {
                    Ok(login) => AuthResult::Allow(login == Login::Gateway, None),
                    Err(refusal) => {
                        tracing::warn!(client_id = %escape(&client_id), user = %escape(username.as_deref().unwrap_or("-")), "embedded broker: login refused");
                        refusal
                    }
                };
                (false, Some(HookResult::AuthResult(result)))
            }
            Parameter::ClientSubscribeCheckAcl(session, sub) => {
                let username = session.username().map(|u| u.to_string());
                let allowed = self.access().may_subscribe(username.as_deref(), &sub.topic_filter);
                if allowed {
                    (true, acc)
                } else {
                    tracing::warn!(client_id = %escape(&session.id.client_id), filter = %escape(&sub.topic_filter), "embedded broker: subscription refused (not in this client's permissions)");
                    (false, Some(HookResult::SubscribeAclResult(SubscribeAclResult::new_failure(SubscribeAckReason::NotAuthorized))))
                }
            }
            Parameter::MessagePublishCheckAcl(session, publish) => {
                let username = session.username().map(|u| u.to_string());
                let allowed = self.access().may_publish(username.as_deref(), &publish.topic);
                if allowed {
                    (true, acc)
                } else {
                    tracing::warn!(client_id = %escape(&session.id.client_id), topic = %escape(&publish.topic), "embedded broker: publish refused (not in this client's permissions)");
                    (false, Some(HookResult::PublishAclResult(PublishAclResult::rejected(false, None))))
                }
            }
            _ => (true, acc),
        }
    }
}

/// Client ids and topics come from anyone: never let them forge log lines.
fn escape(s: &str) -> String {
    s.chars().flat_map(char::escape_debug).take(256).collect()
}

/// A running embedded broker; dropping it (or [`EmbeddedBroker::stop`]) stops it.
#[derive(Debug)]
pub struct EmbeddedBroker {
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    access: Arc<RwLock<Access>>,
}

/// Largest MQTT packet the broker accepts: above the 256 KiB command limit, so
/// that an oversized command reaches the gateway and gets a clear answer.
const MAX_PACKET: u32 = 1024 * 1024;
/// How long a new socket has to log in.
const HANDSHAKE: Duration = Duration::from_secs(5);
/// Messages a session may have queued (the gateway's outbox holds 100,000 by default).
const SESSION_QUEUE: usize = 200_000;
/// QoS 1 messages in flight per session.
const INFLIGHT: std::num::NonZeroU16 = match std::num::NonZeroU16::new(256) {
    Some(n) => n,
    None => std::num::NonZeroU16::MIN,
};

impl EmbeddedBroker {
    /// Starts the broker and returns once it listens (or why it cannot).
    pub fn start(listen: SocketAddr, access: Access) -> anyhow::Result<EmbeddedBroker> {
        let max_connections = access.max_connections;
        let access = Arc::new(RwLock::new(access));
        let guard = access.clone();
        let (ready_tx, ready_rx) = std_mpsc::channel::<anyhow::Result<()>>();
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("embedded-broker".to_string())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build() {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(anyhow!("cannot start the broker runtime: {e}")));
                        return;
                    }
                };
                rt.block_on(async move {
                    let scx = rmqtt::context::ServerContext::new().build().await;
                    let register = scx.extends.hook_mgr().register();
                    for typ in [Type::ClientAuthenticate, Type::ClientSubscribeCheckAcl, Type::MessagePublishCheckAcl] {
                        register.add(typ, Box::new(Guard(guard.clone()))).await;
                    }
                    register.start().await;
                    let listener = rmqtt::net::Builder::new()
                        .name("embedded/tcp")
                        .laddr(listen)
                        .nodelay(true)
                        // A restarted gateway must get its port back at once,
                        // even with old connections in TIME_WAIT.
                        .reuseaddr(Some(true))
                        .max_packet_size(MAX_PACKET)
                        // rmqtt's default queue of 1000 messages per session
                        // dropped commands and answers in a flood (4,208 of
                        // 10,000 lost): queue more than the gateway itself
                        // would ever hold back, and keep more in flight.
                        .max_mqueue_len(SESSION_QUEUE)
                        .max_inflight(INFLIGHT)
                        // Every login goes through `Guard`.
                        .allow_anonymous(false)
                        .max_connections(max_connections)
                        // A socket that never logs in must not hold a slot for long.
                        .handshake_timeout(HANDSHAKE)
                        .allow_zero_keepalive(false)
                        .bind()
                        .and_then(|b| b.tcp());
                    let listener = match listener {
                        Ok(l) => l,
                        Err(e) => {
                            let _ = ready_tx.send(Err(anyhow!("{e}")));
                            return;
                        }
                    };
                    let _ = ready_tx.send(Ok(()));
                    let server = rmqtt::server::MqttServer::new(scx).listener(listener).build();
                    tokio::select! {
                        r = server.run() => if let Err(e) = r { tracing::error!("embedded broker stopped: {e}") },
                        _ = stopped => {}
                    }
                });
                rt.shutdown_background();
            })
            .context("cannot start the broker thread")?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(EmbeddedBroker { stop: Some(stop), thread: Some(thread), access }),
            Ok(Err(e)) => Err(e).with_context(|| {
                format!("the embedded broker cannot listen on {listen} (is another broker or gateway using the port?)")
            }),
            Err(_) => Err(anyhow!("the embedded broker thread ended before listening on {listen}")),
        }
    }

    /// What clients may do without a login of their own, from now on (a
    /// reload changed the twins). Sessions keep their subscriptions; the
    /// next publish or subscribe is judged by the new permissions.
    pub fn set_defaults(&self, defaults: Permissions) {
        self.access.write().unwrap_or_else(std::sync::PoisonError::into_inner).defaults = defaults;
    }

    /// Stops the broker and every session in it.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for EmbeddedBroker {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn access(users: Vec<BrokerUser>) -> Access {
        Access {
            gateway: Some(("twinbus-gw".into(), "twinbus".into(), Secret::new("s3cret"))),
            users,
            defaults: Permissions { publish: vec!["site/pump/cmd".into()], subscribe: vec!["site/pump/rsp".into(), "$aws/things/p/shadow/#".into()] },
            max_connections: 8,
        }
    }

    fn user(name: &str, password: &str, publish: Option<Vec<String>>) -> BrokerUser {
        BrokerUser { name: name.into(), password: Secret::new(password), publish, subscribe: None }
    }

    #[test]
    fn only_the_gateway_may_use_its_client_id_or_its_name() {
        let a = access(vec![]);
        assert!(matches!(a.authenticate("twinbus-gw", Some("twinbus"), Some(b"s3cret")), Ok(Login::Gateway)));
        assert!(a.authenticate("twinbus-gw", None, None).is_err(), "its client id without the secret");
        assert!(a.authenticate("twinbus-gw", Some("twinbus"), Some(b"guess")).is_err());
        assert!(a.authenticate("intruder", Some("twinbus"), Some(b"s3cret")).is_err(), "its name with another client id");
        assert!(matches!(a.authenticate("cloud", None, None), Ok(Login::Anonymous)), "no users configured: anonymous");
    }

    #[test]
    fn with_users_configured_a_login_is_required_and_checked() {
        let a = access(vec![user("cloud", "pw", None)]);
        assert!(matches!(a.authenticate("c1", Some("cloud"), Some(b"pw")), Ok(Login::User)));
        assert!(matches!(a.authenticate("c1", Some("cloud"), Some(b"pwx")), Err(AuthResult::BadUsernameOrPassword)));
        assert!(matches!(a.authenticate("c1", None, None), Err(AuthResult::NotAuthorized)));
        assert!(matches!(a.authenticate("c1", Some("nobody"), Some(b"pw")), Err(AuthResult::BadUsernameOrPassword)));
    }

    #[test]
    fn clients_reach_only_the_twins_topics_unless_their_login_says_otherwise() {
        let a = access(vec![]);
        assert!(a.may_publish(None, "site/pump/cmd"));
        assert!(!a.may_publish(None, "site/other/cmd"), "another device's command topic");
        assert!(a.may_subscribe(None, "site/pump/rsp"));
        assert!(!a.may_subscribe(None, "#"), "no wiretap");
        assert!(!a.may_subscribe(None, "site/+/rsp"));
        assert!(a.may_subscribe(None, "$aws/things/p/shadow/update/accepted"));
        let a = access(vec![user("ops", "pw", Some(vec!["#".into()])), user("cloud", "pw", None)]);
        assert!(a.may_publish(Some("ops"), "anything/at/all"));
        assert!(!a.may_publish(Some("cloud"), "anything/at/all"));
        assert!(!a.may_publish(Some("stranger"), "site/pump/cmd"));
    }

    #[test]
    fn names_and_topics_from_clients_are_escaped_in_logs() {
        assert_eq!(escape("a\nFAKE LOG LINE"), "a\\nFAKE LOG LINE");
        assert_eq!(escape("x\u{1b}[31m"), "x\\u{1b}[31m");
    }
}
