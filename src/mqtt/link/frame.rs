//! MQTT framing for the link, sans IO: where packets begin and end in each
//! direction, and what becomes of a broker's packet that rumqttc must not see.
//!
//! Only fixed headers are parsed (type, flags, remaining length), plus the
//! head of an oversized PUBLISH (topic, packet id, MQTT 5 properties), so
//! that it can be acknowledged and answered. Everything else passes through
//! byte for byte, whatever the read boundaries. A body is never buffered: a
//! packet the link drops is counted down as it streams past, so memory stays
//! the same for a 2 MiB packet and for MQTT's largest (256 MiB).
//!
//! [`Inbound`] (broker → client) decides per packet: forward it, or drop it
//! and say why ([`Report`]), with the acknowledgement the broker expects
//! ([`Ack`]). [`Outbound`] (client → broker) forwards rumqttc's bytes and
//! slips those acknowledgements in between two of its packets, never inside
//! one.

use std::collections::{HashSet, VecDeque};

use bytes::Bytes;

use crate::mqtt::session::Properties;

const CONNACK: u8 = 2;
const PUBLISH: u8 = 3;
const PUBREL: u8 = 6;
const PINGREQ: u8 = 12;
const PINGRESP: u8 = 13;

/// A PINGRESP, as the link answers a PINGREQ itself while it drops a packet.
pub(crate) const PINGRESP_BYTES: [u8; 2] = [0xD0, 0x00];

/// The head of an oversized PUBLISH is read up to this many bytes: a topic
/// (at most 65535 bytes plus its length), a packet id, and MQTT 5
/// properties up to [`MAX_PROPERTIES`]. Bounds the link's memory per
/// connection.
const MAX_HEAD: usize = 2 + 65_535 + 2 + 4 + MAX_PROPERTIES;
/// MQTT 5 properties of an oversized PUBLISH longer than this are skipped
/// unread: its answer then goes to the twin's responses topic.
const MAX_PROPERTIES: usize = 16 * 1024;

/// The byte stream cannot be framed any more: a remaining length whose
/// fourth byte still says "more follows". Nothing after it can be trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Malformed;

impl std::fmt::Display for Malformed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a malformed MQTT packet (its remaining length runs past 4 bytes)")
    }
}

/// An acknowledgement the link sends to the broker itself, for a message it
/// did not hand to the client. Four bytes, the same in MQTT 3.1.1 and 5 (an
/// MQTT 5 ack without a reason code means success).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Ack([u8; 4]);

impl Ack {
    fn new(kind: u8, pkid: u16) -> Ack {
        let [hi, lo] = pkid.to_be_bytes();
        Ack([kind, 2, hi, lo])
    }

    fn puback(pkid: u16) -> Ack {
        Ack::new(0x40, pkid)
    }

    fn pubrec(pkid: u16) -> Ack {
        Ack::new(0x50, pkid)
    }

    fn pubcomp(pkid: u16) -> Ack {
        Ack::new(0x70, pkid)
    }

    pub(crate) fn bytes(&self) -> &[u8] {
        &self.0
    }
}

/// A broker packet the client did not get.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Report {
    /// A PUBLISH larger than the link's limit: discarded, acknowledged.
    Oversized {
        topic: String,
        /// Its payload's size: what a sender knows and an answer speaks of.
        bytes: usize,
        /// The whole packet's size on the wire, which the limit is about.
        packet: usize,
        /// MQTT 5 request-response properties, when it had readable ones.
        properties: Option<Properties>,
    },
    /// Any other packet the client must not see: too large and not a
    /// PUBLISH, a type no broker may send, or a PUBLISH whose head does not
    /// parse.
    Dropped { packet: &'static str, bytes: usize, why: &'static str },
}

/// What one [`Inbound::feed`] produced.
#[derive(Debug, Default)]
pub(crate) struct Out {
    /// Bytes for the client, in order.
    pub(crate) to_client: Vec<u8>,
    /// Acknowledgements to send to the broker.
    pub(crate) acks: Vec<Ack>,
    /// Packets dropped; at most one per call, and the last thing it did.
    pub(crate) reports: Vec<Report>,
}

/// A fixed header being read one byte at a time: it may be split across
/// reads anywhere, its remaining length too.
#[derive(Debug, Default, Clone)]
struct HeaderReader {
    bytes: [u8; 5],
    len: usize,
    remaining: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FixedHeader {
    bytes: [u8; 5],
    len: usize,
    remaining: usize,
}

impl FixedHeader {
    fn kind(&self) -> u8 {
        self.bytes[0] >> 4
    }

    fn flags(&self) -> u8 {
        self.bytes[0] & 0x0F
    }

    fn header(&self) -> &[u8] {
        &self.bytes[..self.len]
    }

    /// The whole packet's size on the wire, as MQTT 5's Maximum Packet Size counts it.
    fn total(&self) -> usize {
        self.len + self.remaining
    }
}

impl HeaderReader {
    fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn push(&mut self, b: u8) -> Result<Option<FixedHeader>, Malformed> {
        self.bytes[self.len] = b;
        self.len += 1;
        if self.len == 1 {
            return Ok(None);
        }
        let shift = 7 * (self.len - 2);
        self.remaining |= usize::from(b & 0x7F) << shift;
        if b & 0x80 == 0 {
            let header = FixedHeader { bytes: self.bytes, len: self.len, remaining: self.remaining };
            *self = HeaderReader::default();
            return Ok(Some(header));
        }
        if self.len == 5 {
            return Err(Malformed);
        }
        Ok(None)
    }
}

fn packet_name(kind: u8) -> &'static str {
    const NAMES: [&str; 16] = [
        "reserved (0)",
        "CONNECT",
        "CONNACK",
        "PUBLISH",
        "PUBACK",
        "PUBREC",
        "PUBREL",
        "PUBCOMP",
        "SUBSCRIBE",
        "SUBACK",
        "UNSUBSCRIBE",
        "UNSUBACK",
        "PINGREQ",
        "PINGRESP",
        "DISCONNECT",
        "AUTH",
    ];
    NAMES[usize::from(kind & 0x0F)]
}

/// Packets only a client sends (and the reserved type): a broker sending one
/// is broken, and rumqttc would close the connection on it.
fn never_from_a_broker(kind: u8) -> bool {
    matches!(kind, 0 | 1 | 8 | 10 | 12)
}

#[derive(Debug)]
enum InState {
    /// Between packets, or inside a fixed header.
    Header(HeaderReader),
    /// Passing this many more body bytes to the client.
    Forward(usize),
    /// Reading the head of an oversized PUBLISH (at most `MAX_HEAD` bytes).
    Head { header: FixedHeader, buf: Vec<u8> },
    /// Holding a PUBREL until its packet id tells whose it is.
    Release { header: FixedHeader, buf: Vec<u8> },
    /// Dropping this many more body bytes: its fate is settled already.
    Skip(usize),
}

/// The broker → client direction.
#[derive(Debug)]
pub(crate) struct Inbound {
    limit: usize,
    v5: bool,
    state: InState,
    connected: bool,
    /// PINGREQs the client sent that nobody answered yet.
    unanswered: usize,
    /// Bytes of a dropped packet arrived since the client's last PINGREQ.
    progress: bool,
    /// PINGRESPs from the broker to drop: the link answered those pings itself.
    owed_pingresps: usize,
}

impl Inbound {
    /// `limit`: the largest packet (in bytes on the wire) handed to the client.
    pub(crate) fn new(limit: usize, v5: bool) -> Inbound {
        Inbound { limit, v5, state: InState::Header(HeaderReader::default()), connected: false, unanswered: 0, progress: false, owed_pingresps: 0 }
    }

    /// Whether a CONNACK has reached the client: a failure before it is a
    /// failure to connect, after it a lost connection.
    pub(crate) fn connected(&self) -> bool {
        self.connected
    }

    /// Takes bytes from the broker. Returns how many were used: all of them,
    /// unless it dropped a packet, in which case it stops as soon as it
    /// knows that packet's fate (its ack and report are in `out`), so the
    /// caller can hand `out.to_client` (what came before it) to the client,
    /// then act on the report before anything that follows reaches the
    /// client, then feed the rest.
    ///
    /// An oversized PUBLISH is acknowledged and reported once its head is
    /// read, not after its last byte: if the connection drops while the rest
    /// streams past (a slow link, a client's keep-alive running out), the
    /// broker has the ack already and does not deliver it again.
    ///
    /// `released` holds the packet ids this link answered with a PUBREC and
    /// for which the broker's PUBREL is still due; it outlives one
    /// connection, because a resumed session may send the PUBREL on the next.
    pub(crate) fn feed(&mut self, input: &[u8], released: &mut HashSet<u16>, out: &mut Out) -> Result<usize, Malformed> {
        let mut i = 0;
        while i < input.len() {
            let rest = &input[i..];
            match &mut self.state {
                InState::Header(h) => {
                    i += 1;
                    if let Some(header) = h.push(rest[0])? {
                        self.start(header, released, out);
                    }
                }
                InState::Forward(left) | InState::Skip(left) => {
                    let n = (*left).min(rest.len());
                    if let InState::Forward(_) = self.state {
                        out.to_client.extend_from_slice(&rest[..n]);
                    } else {
                        self.progress = true;
                    }
                    i += n;
                    self.count_down(n);
                }
                InState::Head { header, buf } => {
                    let want = header.remaining.min(MAX_HEAD) - buf.len();
                    let n = want.min(rest.len());
                    buf.extend_from_slice(&rest[..n]);
                    i += n;
                    self.progress = true;
                    let (header, read) = (*header, buf.len());
                    match parse_head(buf, header.flags(), self.v5, read == header.remaining.min(MAX_HEAD)) {
                        Head::More => {}
                        Head::Done { topic, pkid, properties, payload_at } => {
                            let qos = (header.flags() >> 1) & 0x03;
                            let ack = match (qos, pkid) {
                                (1, Some(id)) => Some(Ack::puback(id)),
                                (2, Some(id)) => {
                                    released.insert(id);
                                    Some(Ack::pubrec(id))
                                }
                                _ => None,
                            };
                            out.acks.extend(ack);
                            let bytes = header.remaining.saturating_sub(payload_at);
                            out.reports.push(Report::Oversized { topic, bytes, packet: header.total(), properties });
                        }
                        Head::Bad(why) => out.reports.push(Report::Dropped { packet: "PUBLISH", bytes: header.total(), why }),
                    }
                    if !out.reports.is_empty() {
                        self.state = InState::Skip(header.remaining - read);
                        self.count_down(0);
                        return Ok(i);
                    }
                }
                InState::Release { header, buf } => {
                    let n = (2 - buf.len()).min(rest.len());
                    buf.extend_from_slice(&rest[..n]);
                    i += n;
                    if buf.len() == 2 {
                        let header = *header;
                        let pkid = u16::from_be_bytes([buf[0], buf[1]]);
                        if released.remove(&pkid) {
                            // Ours: the client never saw the PUBLISH, so it must not see this.
                            out.acks.push(Ack::pubcomp(pkid));
                            self.state = InState::Skip(header.remaining - 2);
                        } else {
                            out.to_client.extend_from_slice(header.header());
                            out.to_client.extend_from_slice(buf);
                            self.state = InState::Forward(header.remaining - 2);
                        }
                        self.count_down(0);
                    }
                }
            }
            if !out.reports.is_empty() {
                return Ok(i);
            }
        }
        Ok(i)
    }

    /// The client sent a PINGREQ (passed on to the broker all the same).
    pub(crate) fn client_pinged(&mut self) {
        self.unanswered += 1;
        self.progress = false;
    }

    /// How many of the client's PINGREQs the link answers itself, now
    /// ([`PINGRESP_BYTES`] each), dropping the broker's PINGRESPs when they
    /// come. Only while a dropped packet streams past, and once bytes of it
    /// arrived after the PINGREQ: the connection is alive, but the broker's
    /// PINGRESP waits behind that packet, and on a slow link a large one
    /// outlasts the client's keep-alive, which would close the connection.
    /// The client's stream is between two packets then: nothing is being
    /// forwarded.
    pub(crate) fn pings_to_answer(&mut self) -> usize {
        let dropping = matches!(self.state, InState::Skip(_) | InState::Head { .. });
        if !(dropping && self.progress) {
            return 0;
        }
        let n = std::mem::take(&mut self.unanswered);
        self.owed_pingresps += n;
        n
    }

    /// `n` more body bytes of the current packet are through; after its
    /// last one, the next packet starts.
    fn count_down(&mut self, n: usize) {
        if let InState::Forward(left) | InState::Skip(left) = &mut self.state {
            *left -= n;
            if *left == 0 {
                self.state = InState::Header(HeaderReader::default());
            }
        }
    }

    /// A fixed header is complete: choose what happens to the packet.
    fn start(&mut self, header: FixedHeader, released: &HashSet<u16>, out: &mut Out) {
        let kind = header.kind();
        let mut dropped = |why| {
            out.reports.push(Report::Dropped { packet: packet_name(kind), bytes: header.total(), why });
            InState::Skip(header.remaining)
        };
        self.state = if never_from_a_broker(kind) || (kind == 15 && !self.v5) {
            dropped("a packet type a broker never sends")
        } else if kind == PINGRESP && self.owed_pingresps > 0 {
            self.owed_pingresps -= 1;
            InState::Skip(header.remaining)
        } else if kind == PINGRESP && self.unanswered > 0 {
            self.unanswered -= 1;
            out.to_client.extend_from_slice(header.header());
            InState::Forward(header.remaining)
        } else if kind == PUBLISH && header.total() > self.limit && header.remaining > 0 {
            InState::Head { header, buf: Vec::new() }
        } else if header.total() > self.limit {
            dropped("larger than the link's limit")
        } else if kind == PUBREL && !released.is_empty() && header.remaining >= 2 {
            InState::Release { header, buf: Vec::with_capacity(2) }
        } else {
            if kind == CONNACK {
                self.connected = true;
            }
            out.to_client.extend_from_slice(header.header());
            InState::Forward(header.remaining)
        };
        self.count_down(0);
    }
}

#[derive(Debug, PartialEq)]
enum Head {
    /// Needs more bytes.
    More,
    /// `payload_at`: where the payload starts in the body.
    Done { topic: String, pkid: Option<u16>, properties: Option<Properties>, payload_at: usize },
    /// The head does not parse (a topic longer than the packet, QoS 3).
    Bad(&'static str),
}

/// Parses the start of a PUBLISH's body: topic, packet id (QoS 1 and 2) and,
/// in MQTT 5, the properties. `all` says `buf` holds everything there will
/// be (the body or `MAX_HEAD` bytes of it): "more" then means "never".
fn parse_head(buf: &[u8], flags: u8, v5: bool, all: bool) -> Head {
    let more = || if all { Head::Bad("its head is longer than the packet") } else { Head::More };
    let qos = (flags >> 1) & 0x03;
    if qos == 3 {
        return Head::Bad("QoS 3 does not exist");
    }
    let Some(len) = buf.get(..2).map(|b| usize::from(u16::from_be_bytes([b[0], b[1]]))) else { return more() };
    let Some(topic) = buf.get(2..2 + len) else { return more() };
    let topic = String::from_utf8_lossy(topic).into_owned();
    let mut at = 2 + len;
    let pkid = if qos > 0 {
        let Some(id) = buf.get(at..at + 2) else { return more() };
        at += 2;
        Some(u16::from_be_bytes([id[0], id[1]]))
    } else {
        None
    };
    if !v5 {
        return Head::Done { topic, pkid, properties: None, payload_at: at };
    }
    let (props_len, used) = match varint(&buf[at..]) {
        Varint::Done(n, used) => (n, used),
        Varint::More => return more(),
        Varint::Bad => return Head::Bad("its properties' length is malformed"),
    };
    at += used;
    let payload_at = at + props_len;
    if props_len == 0 || props_len > MAX_PROPERTIES {
        return Head::Done { topic, pkid, properties: None, payload_at };
    }
    let Some(props) = buf.get(at..payload_at) else { return more() };
    Head::Done { topic, pkid, properties: request_properties(props), payload_at }
}

enum Varint {
    Done(usize, usize),
    More,
    Bad,
}

/// An MQTT variable byte integer: its value and how many bytes it took.
fn varint(buf: &[u8]) -> Varint {
    let mut value = 0usize;
    for (i, b) in buf.iter().enumerate().take(4) {
        value |= usize::from(b & 0x7F) << (7 * i);
        if b & 0x80 == 0 {
            return Varint::Done(value, i + 1);
        }
    }
    if buf.len() >= 4 {
        Varint::Bad
    } else {
        Varint::More
    }
}

/// The request-response properties of an MQTT 5 PUBLISH, so that its answer
/// can go where the sender asked. `None` when they do not parse.
fn request_properties(mut p: &[u8]) -> Option<Properties> {
    fn take<'a>(p: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        let (head, rest) = (p.get(..n)?, p.get(n..)?);
        *p = rest;
        Some(head)
    }
    fn binary<'a>(p: &mut &'a [u8]) -> Option<&'a [u8]> {
        let len = take(p, 2)?;
        take(p, usize::from(u16::from_be_bytes([len[0], len[1]])))
    }
    fn string(p: &mut &[u8]) -> Option<String> {
        std::str::from_utf8(binary(p)?).ok().map(str::to_string)
    }
    let mut props = Properties::default();
    while !p.is_empty() {
        let id = take(&mut p, 1)?[0];
        match id {
            // Payload format, message expiry, topic alias, content type: not needed.
            0x01 => _ = take(&mut p, 1)?,
            0x02 => _ = take(&mut p, 4)?,
            0x23 => _ = take(&mut p, 2)?,
            0x03 => _ = binary(&mut p)?,
            0x08 => props.response_topic = Some(string(&mut p)?),
            0x09 => props.correlation_data = Some(Bytes::copy_from_slice(binary(&mut p)?)),
            0x26 => {
                let key = string(&mut p)?;
                let value = string(&mut p)?;
                props.user_properties.push((key, value));
            }
            // Subscription identifier.
            0x0B => match varint(p) {
                Varint::Done(_, used) => p = &p[used..],
                _ => return None,
            },
            _ => return None,
        }
    }
    Some(props)
}

#[derive(Debug)]
enum OutState {
    Header(HeaderReader),
    Body(usize),
}

/// The client → broker direction: rumqttc's bytes, unchanged, with the
/// link's acknowledgements slipped in between two of its packets.
#[derive(Debug)]
pub(crate) struct Outbound {
    state: OutState,
    /// PINGREQs seen and not yet taken (see `Inbound::answer_ping`).
    pings: usize,
}

impl Default for Outbound {
    fn default() -> Self {
        Outbound { state: OutState::Header(HeaderReader::default()), pings: 0 }
    }
}

impl Outbound {
    /// How many PINGREQs the client sent since the last call.
    pub(crate) fn take_pings(&mut self) -> usize {
        std::mem::take(&mut self.pings)
    }

    fn at_boundary(&self) -> bool {
        matches!(&self.state, OutState::Header(h) if h.is_empty())
    }

    /// Appends `input` to `out`, and every waiting ack at the first packet
    /// boundary (at once when the stream is between packets: call it with
    /// no input when an ack arrives).
    pub(crate) fn feed(&mut self, input: &[u8], acks: &mut VecDeque<Ack>, out: &mut Vec<u8>) -> Result<(), Malformed> {
        let mut i = 0;
        loop {
            if self.at_boundary() {
                for ack in acks.drain(..) {
                    out.extend_from_slice(ack.bytes());
                }
            }
            let Some(&b) = input.get(i) else { return Ok(()) };
            match &mut self.state {
                OutState::Header(h) => {
                    out.push(b);
                    i += 1;
                    if let Some(header) = h.push(b)? {
                        if header.kind() == PINGREQ {
                            self.pings += 1;
                        }
                        if header.remaining > 0 {
                            self.state = OutState::Body(header.remaining);
                        }
                    }
                }
                OutState::Body(left) => {
                    let n = (*left).min(input.len() - i);
                    out.extend_from_slice(&input[i..i + n]);
                    i += n;
                    *left -= n;
                    if *left == 0 {
                        self.state = OutState::Header(HeaderReader::default());
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
