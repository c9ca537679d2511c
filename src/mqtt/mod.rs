//! The cloud side's wire: MQTT connections and the embedded broker.
//!
//! Only this module knows rumqttc and rmqtt types. Twin adapters get incoming
//! messages through an [`Inbox`] per subscribed topic and publish through a
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
mod subscribe;
mod tls;
mod topic;

#[cfg(feature = "embedded-broker")]
pub use broker::{Access, EmbeddedBroker, Permissions};
pub use connection::{spawn_connection, ConnectionHandle, Inbox, Message, Publish, Routes};
pub use outbox::{Class, Coalesce};
pub use session::Properties;
pub use topic::{allowed_by, matches as topic_matches, valid_filter, valid_topic};

/// A publish as bytes for the store (topic, properties, payload): how a raw
/// command's reply route and answer are kept with its id.
pub fn encode_publish(p: &Publish) -> Vec<u8> {
    let entry = outbox::Entry::new(p.class, p.topic.clone(), p.payload.clone(), p.retain, p.properties.clone(), 0);
    outbox::encode(&entry, &p.payload)
}

/// Reads back what [`encode_publish`] wrote; `None` for damaged bytes.
pub fn decode_publish(bytes: &[u8]) -> Option<Publish> {
    let e = outbox::decode(0, bytes, true)?;
    Some(Publish { topic: e.topic, payload: e.payload.unwrap_or_default(), class: e.class, retain: e.retain, properties: e.properties, records: Vec::new(), coalesce: None })
}
