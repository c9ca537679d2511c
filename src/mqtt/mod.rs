//! The cloud side's wire: MQTT connections and the embedded broker.
//!
//! Only this module knows rumqttc and rmqtt types. Twin adapters get incoming
//! messages on channels (one per subscribed topic) and publish through a
//! [`ConnectionHandle`]; they never see the client or its options, which print
//! passwords in their `Debug` output.
//!
//! Underneath, rumqttc never touches the network: it talks to the link
//! (`link.rs`), the gateway's own transport, which dials the broker and keeps
//! from rumqttc any packet it would close the connection on.

#[cfg(feature = "embedded-broker")]
mod broker;
mod connection;
mod link;
mod outbox;
mod session;
mod tls;

#[cfg(feature = "embedded-broker")]
pub use broker::EmbeddedBroker;
pub use connection::{spawn_connection, ConnectionHandle, Message, Route, Routes};
pub use session::Properties;
