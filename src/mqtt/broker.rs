//! The embedded MQTT broker (rmqtt), for the demo, the tests and local-only sites.
//!
//! rmqtt spawns every client session as a task of its own, so stopping its
//! `run()` future would leave sessions alive. It therefore gets a thread and a
//! runtime of its own, dropped at shutdown, which ends every session. Its
//! listener defaults to 0.0.0.0 with Nagle on; we always pass the configured
//! address (loopback in the shipped config) and turn Nagle off.

use std::net::SocketAddr;
use std::sync::mpsc as std_mpsc;

use anyhow::{anyhow, Context as _};
use tokio::sync::oneshot;

/// A running embedded broker; dropping it (or [`EmbeddedBroker::stop`]) stops it.
#[derive(Debug)]
pub struct EmbeddedBroker {
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Largest MQTT packet the broker accepts: above the 256 KiB command limit, so
/// that an oversized command reaches the gateway and gets a clear answer.
const MAX_PACKET: u32 = 1024 * 1024;
/// Messages a session may have queued (the gateway's outbox holds 100,000 by default).
const SESSION_QUEUE: usize = 200_000;
/// QoS 1 messages in flight per session.
const INFLIGHT: std::num::NonZeroU16 = match std::num::NonZeroU16::new(256) {
    Some(n) => n,
    None => std::num::NonZeroU16::MIN,
};

impl EmbeddedBroker {
    /// Starts the broker and returns once it listens (or why it cannot).
    pub fn start(listen: SocketAddr) -> anyhow::Result<EmbeddedBroker> {
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
            Ok(Ok(())) => Ok(EmbeddedBroker { stop: Some(stop), thread: Some(thread) }),
            Ok(Err(e)) => Err(e).with_context(|| {
                format!("the embedded broker cannot listen on {listen} (is another broker or gateway using the port?)")
            }),
            Err(_) => Err(anyhow!("the embedded broker thread ended before listening on {listen}")),
        }
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
