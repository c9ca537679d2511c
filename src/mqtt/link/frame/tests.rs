use super::*;

const LIMIT: usize = 1024;

fn varint_bytes(mut n: usize) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            return out;
        }
    }
}

fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut p = vec![first];
    p.extend(varint_bytes(body.len()));
    p.extend_from_slice(body);
    p
}

/// The start of a PUBLISH body: topic, packet id, MQTT 5 properties.
fn head(topic: &str, pkid: Option<u16>, props: Option<&[u8]>) -> Vec<u8> {
    let mut body = (topic.len() as u16).to_be_bytes().to_vec();
    body.extend_from_slice(topic.as_bytes());
    if let Some(id) = pkid {
        body.extend(id.to_be_bytes());
    }
    if let Some(props) = props {
        body.extend(varint_bytes(props.len()));
        body.extend_from_slice(props);
    }
    body
}

fn publish(topic: &str, qos: u8, pkid: Option<u16>, payload: usize) -> Vec<u8> {
    let mut body = head(topic, pkid, None);
    body.extend(std::iter::repeat_n(b'x', payload));
    packet(0x30 | (qos << 1), &body)
}

fn pingresp() -> Vec<u8> {
    vec![0xD0, 0x00]
}

/// Feeds `input` in reads of `chunk` bytes, as the link does (again after
/// an early return); collects everything.
fn run(inbound: &mut Inbound, input: &[u8], chunk: usize, released: &mut HashSet<u16>) -> Out {
    let mut all = Out::default();
    for read in input.chunks(chunk) {
        let mut rest = read;
        while !rest.is_empty() {
            let mut out = Out::default();
            let used = inbound.feed(rest, released, &mut out).expect("well formed");
            assert!(used > 0, "progress");
            all.to_client.extend(out.to_client);
            all.acks.extend(out.acks);
            all.reports.extend(out.reports);
            rest = &rest[used..];
        }
    }
    all
}

fn feed_all(input: &[u8], chunk: usize) -> Out {
    run(&mut Inbound::new(LIMIT, false), input, chunk, &mut HashSet::new())
}

#[test]
fn packets_under_the_limit_pass_through_unchanged_whatever_the_read_sizes() {
    let mut stream = packet(0x20, &[0, 0]);
    stream.extend(publish("a/cmd", 1, Some(7), 100));
    stream.extend(pingresp());
    stream.extend(publish("a/cmd", 0, None, LIMIT - 10));
    stream.extend(packet(0x90, &[0, 1, 1]));
    for chunk in [1, 2, 3, 7, 64, 4096] {
        let out = feed_all(&stream, chunk);
        assert_eq!(out.to_client, stream, "reads of {chunk} bytes");
        assert!(out.acks.is_empty() && out.reports.is_empty());
    }
}

#[test]
fn a_fixed_header_split_across_reads_is_put_back_together() {
    let p = publish("t", 1, Some(1), 200); // two-byte remaining length
    let mut inbound = Inbound::new(LIMIT, false);
    let mut released = HashSet::new();
    let mut out = Out::default();
    assert_eq!(inbound.feed(&p[..1], &mut released, &mut out), Ok(1));
    assert!(out.to_client.is_empty(), "nothing is forwarded before the header is known");
    inbound.feed(&p[1..], &mut released, &mut out).expect("well formed");
    assert_eq!(out.to_client, p);
}

#[test]
fn a_remaining_length_split_across_reads_is_put_back_together() {
    // 0x30, then a three-byte remaining length: split after its first byte.
    let big = publish("t", 0, None, 20_000);
    assert!(big[1] & 0x80 != 0 && big[2] & 0x80 != 0);
    let mut inbound = Inbound::new(usize::MAX, false);
    let mut released = HashSet::new();
    let mut out = Out::default();
    inbound.feed(&big[..2], &mut released, &mut out).expect("well formed");
    inbound.feed(&big[2..3], &mut released, &mut out).expect("well formed");
    assert!(out.to_client.is_empty());
    inbound.feed(&big[3..], &mut released, &mut out).expect("well formed");
    assert_eq!(out.to_client, big);
}

#[test]
fn a_remaining_length_with_a_fifth_byte_is_malformed_in_both_directions() {
    let bad = [0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01];
    let mut out = Out::default();
    assert_eq!(Inbound::new(LIMIT, false).feed(&bad, &mut HashSet::new(), &mut out), Err(Malformed));
    assert_eq!(Outbound::default().feed(&bad, &mut VecDeque::new(), &mut Vec::new()), Err(Malformed));
}

#[test]
fn a_four_byte_remaining_length_is_mqtts_largest_and_is_well_formed() {
    // 268_435_455 bytes: the PUBLISH is counted down, never stored.
    let mut inbound = Inbound::new(LIMIT, false);
    let mut released = HashSet::new();
    let mut out = Out::default();
    let mut first = vec![0x32, 0xFF, 0xFF, 0xFF, 0x7F];
    first.extend(head("big", Some(9), None));
    let mut fed = inbound.feed(&first, &mut released, &mut out).expect("well formed");
    assert_eq!(fed, first.len());
    let zeros = vec![0u8; 1 << 20];
    let mut left = 268_435_455 - (first.len() - 5);
    while left > 0 {
        let n = left.min(zeros.len());
        fed = inbound.feed(&zeros[..n], &mut released, &mut out).expect("well formed");
        assert_eq!(fed, n);
        left -= n;
    }
    assert_eq!(out.acks, vec![Ack::puback(9)]);
    let payload = 268_435_455 - 2 - 3 - 2;
    assert_eq!(out.reports, vec![Report::Oversized { topic: "big".into(), bytes: payload, packet: 268_435_460, properties: None }]);
    assert!(out.to_client.is_empty());
    match &inbound.state {
        InState::Header(h) => assert!(h.is_empty()),
        other => panic!("between packets after the last byte, not {other:?}"),
    }
}

#[test]
fn an_oversized_qos1_publish_is_discarded_acknowledged_and_reported_once() {
    let big = publish("site/pump/cmd", 1, Some(42), 3 * LIMIT);
    for chunk in [1, 5, 100, 10_000] {
        let out = feed_all(&big, chunk);
        assert!(out.to_client.is_empty(), "reads of {chunk}");
        assert_eq!(out.acks, vec![Ack::puback(42)]);
        assert_eq!(out.acks[0].bytes(), &[0x40, 2, 0, 42]);
        let report = Report::Oversized { topic: "site/pump/cmd".into(), bytes: 3 * LIMIT, packet: big.len(), properties: None };
        assert_eq!(out.reports, vec![report]);
    }
}

#[test]
fn an_oversized_publish_is_settled_once_its_head_is_read_and_the_packets_around_it_keep_their_order() {
    let before = publish("t", 1, Some(1), 10);
    let big = publish("t", 1, Some(2), 2 * LIMIT);
    let after = publish("t", 1, Some(3), 10);
    let stream = [before.clone(), big.clone(), after.clone()].concat();
    let head_end = before.len() + big.len() - 2 * LIMIT; // fixed header, topic, packet id
    let mut inbound = Inbound::new(LIMIT, false);
    let mut released = HashSet::new();

    let mut out = Out::default();
    let used = inbound.feed(&stream[..head_end - 1], &mut released, &mut out).expect("ok");
    assert_eq!(used, head_end - 1);
    assert!(out.reports.is_empty() && out.acks.is_empty(), "its packet id is not complete yet");
    assert_eq!(out.to_client, before);

    let mut out = Out::default();
    let used = inbound.feed(&stream[head_end - 1..], &mut released, &mut out).expect("ok");
    assert!(head_end - 1 + used <= before.len() + big.len(), "stops within the big one, its fate known");
    assert_eq!(out.acks, vec![Ack::puback(2)], "acknowledged before the rest streams past");
    assert_eq!(out.reports.len(), 1);
    assert!(out.to_client.is_empty());

    let out = run(&mut inbound, &stream[head_end - 1 + used..], 100, &mut released);
    assert_eq!(out.to_client, after, "the rest of the big one is dropped, the next one passes");
    assert!(out.acks.is_empty() && out.reports.is_empty(), "reported once");
}

#[test]
fn a_packet_exactly_at_the_limit_passes_and_one_byte_more_does_not() {
    let at = publish("t", 0, None, LIMIT - 2 - 3 - 1);
    assert_eq!(at.len(), LIMIT);
    assert_eq!(feed_all(&at, 64).to_client, at);
    let over = publish("t", 0, None, LIMIT - 2 - 3);
    let out = feed_all(&over, 64);
    assert!(out.to_client.is_empty());
    assert!(out.acks.is_empty(), "QoS 0 has nothing to acknowledge");
    assert_eq!(out.reports.len(), 1);
}

#[test]
fn an_oversized_qos2_publish_gets_a_pubrec_and_its_pubrel_a_pubcomp_also_on_the_next_connection() {
    let mut released = HashSet::new();
    let out = run(&mut Inbound::new(LIMIT, false), &publish("t", 2, Some(5), 2 * LIMIT), 7, &mut released);
    assert_eq!(out.acks, vec![Ack::pubrec(5)]);
    assert!(released.contains(&5));

    // The PUBREL arrives on the next connection (a resumed session).
    let pubrel = packet(0x62, &[0, 5]);
    let other = packet(0x62, &[0, 6]);
    let stream = [other.clone(), pubrel, pingresp()].concat();
    let out = run(&mut Inbound::new(LIMIT, false), &stream, 1, &mut released);
    assert_eq!(out.acks, vec![Ack::pubcomp(5)]);
    assert_eq!(out.to_client, [other, pingresp()].concat(), "another packet id's PUBREL is the client's");
    assert!(released.is_empty());
}

#[test]
fn an_mqtt5_oversized_publish_reports_where_its_answer_should_go() {
    let mut props = vec![0x01, 1];
    props.push(0x08);
    props.extend(head("app/replies/7", None, None));
    props.push(0x09);
    props.extend(head("req-7", None, None));
    props.push(0x26);
    props.extend(head("trace", None, None));
    props.extend(head("abc", None, None));
    props.extend([0x0B, 0x81, 0x01]);
    let mut body = head("site/pump/cmd", Some(3), Some(&props));
    body.extend(vec![b'x'; 2 * LIMIT]);
    let big = packet(0x32, &body);
    let out = run(&mut Inbound::new(LIMIT, true), &big, 3, &mut HashSet::new());
    let expected = Properties {
        response_topic: Some("app/replies/7".into()),
        correlation_data: Some(Bytes::from_static(b"req-7")),
        user_properties: vec![("trace".into(), "abc".into())],
    };
    let report = Report::Oversized { topic: "site/pump/cmd".into(), bytes: 2 * LIMIT, packet: big.len(), properties: Some(expected) };
    assert_eq!(out.reports, vec![report]);
    assert_eq!(out.acks, vec![Ack::puback(3)]);
}

#[test]
fn mqtt5_properties_that_do_not_parse_leave_the_answer_on_the_default_topic() {
    let mut body = head("t", Some(3), Some(&[0x7F, 0, 0]));
    body.extend(vec![b'x'; 2 * LIMIT]);
    let out = run(&mut Inbound::new(LIMIT, true), &packet(0x32, &body), 100, &mut HashSet::new());
    assert!(matches!(&out.reports[..], [Report::Oversized { properties: None, .. }]), "{:?}", out.reports);
    assert_eq!(out.acks, vec![Ack::puback(3)]);
}

#[test]
fn an_oversized_publish_whose_head_does_not_parse_is_dropped_without_an_ack() {
    let mut body = vec![0xFF, 0xFF, b'a']; // a 65535-byte topic in a smaller packet
    body.extend(vec![b'x'; 2 * LIMIT]);
    let out = feed_all(&packet(0x32, &body), 100);
    assert!(out.acks.is_empty());
    assert!(matches!(&out.reports[..], [Report::Dropped { packet: "PUBLISH", .. }]), "{:?}", out.reports);
}

#[test]
fn an_oversized_packet_that_is_not_a_publish_is_dropped_and_the_stream_goes_on() {
    let big_suback = packet(0x90, &vec![0; 2 * LIMIT]);
    let stream = [big_suback.clone(), pingresp()].concat();
    let out = feed_all(&stream, 500);
    assert_eq!(out.reports, vec![Report::Dropped { packet: "SUBACK", bytes: big_suback.len(), why: "larger than the link's limit" }]);
    assert_eq!(out.to_client, pingresp());
}

#[test]
fn a_packet_only_clients_send_is_dropped_even_when_small() {
    let stream = [vec![0xC0, 0x00], pingresp()].concat();
    let out = feed_all(&stream, 1);
    assert!(matches!(&out.reports[..], [Report::Dropped { packet: "PINGREQ", .. }]), "{:?}", out.reports);
    assert_eq!(out.to_client, pingresp());
}

#[test]
fn the_link_knows_when_the_client_got_its_connack() {
    let mut inbound = Inbound::new(LIMIT, false);
    let mut out = Out::default();
    inbound.feed(&[0x20], &mut HashSet::new(), &mut out).expect("ok");
    assert!(!inbound.connected());
    inbound.feed(&[0x02, 0, 0], &mut HashSet::new(), &mut out).expect("ok");
    assert!(inbound.connected());
}

#[test]
fn acks_go_between_the_clients_packets_never_inside_one() {
    let first = publish("rsp", 1, Some(1), 50);
    let second = pingresp();
    let mut outbound = Outbound::default();
    let mut acks = VecDeque::new();
    let mut out = Vec::new();
    outbound.feed(&first[..10], &mut acks, &mut out).expect("ok");
    acks.push_back(Ack::puback(42));
    outbound.feed(&[], &mut acks, &mut out).expect("ok");
    assert_eq!(out, first[..10], "mid-packet: the ack waits");
    outbound.feed(&[&first[10..], &second[..]].concat(), &mut acks, &mut out).expect("ok");
    assert_eq!(out, [&first[..], Ack::puback(42).bytes(), &second[..]].concat());
    assert!(acks.is_empty());
}

#[test]
fn an_ack_goes_out_at_once_when_the_client_is_between_packets() {
    let mut outbound = Outbound::default();
    let mut acks = VecDeque::from([Ack::puback(1), Ack::pubrec(2)]);
    let mut out = Vec::new();
    outbound.feed(&[], &mut acks, &mut out).expect("ok");
    assert_eq!(out, [0x40, 2, 0, 1, 0x50, 2, 0, 2]);
}

#[test]
fn the_clients_bytes_pass_unchanged_whatever_the_read_sizes() {
    let stream = [packet(0x10, &[1; 30]), publish("rsp", 1, Some(1), 300), vec![0xC0, 0], vec![0xE0, 0]].concat();
    for chunk in [1, 2, 5, 1000] {
        let mut outbound = Outbound::default();
        let mut out = Vec::new();
        for read in stream.chunks(chunk) {
            outbound.feed(read, &mut VecDeque::new(), &mut out).expect("ok");
        }
        assert_eq!(out, stream);
        assert!(outbound.at_boundary());
    }
}

#[test]
fn while_a_dropped_packet_streams_past_the_link_answers_pings_and_drops_the_brokers_late_pingresps() {
    let big = publish("t", 1, Some(2), 4 * LIMIT);
    let mut inbound = Inbound::new(LIMIT, false);
    let mut released = HashSet::new();
    inbound.client_pinged();
    assert_eq!(inbound.pings_to_answer(), 0, "between packets the broker answers");
    // Sent just before the big one began: its PINGRESP would wait behind it.
    let out = run(&mut inbound, &big[..2 * LIMIT], 100, &mut released);
    assert_eq!(out.reports.len(), 1);
    assert_eq!(inbound.pings_to_answer(), 1, "bytes came after the ping: the connection is alive");
    assert_eq!(inbound.pings_to_answer(), 0, "answered once");

    inbound.client_pinged();
    assert_eq!(inbound.pings_to_answer(), 0, "nothing arrived since this ping: no proof of life yet");
    run(&mut inbound, &big[2 * LIMIT..3 * LIMIT], 100, &mut released);
    assert_eq!(inbound.pings_to_answer(), 1);

    let rest = [&big[3 * LIMIT..], &pingresp(), &pingresp(), &pingresp()].concat();
    let out = run(&mut inbound, &rest, 100, &mut released);
    assert_eq!(out.to_client, pingresp(), "two were answered by the link already; the third is the client's");
    assert!(out.reports.is_empty(), "not a drop worth reporting");
}

#[test]
fn a_ping_answered_by_the_broker_in_time_is_not_answered_twice() {
    let mut inbound = Inbound::new(LIMIT, false);
    let mut released = HashSet::new();
    inbound.client_pinged();
    let out = run(&mut inbound, &[pingresp(), publish("t", 1, Some(2), 2 * LIMIT)].concat(), 100, &mut released);
    assert_eq!(out.to_client, pingresp());
    assert_eq!(inbound.pings_to_answer(), 0, "nothing left to answer");
}

#[test]
fn the_client_side_counts_the_pings_it_passes_on() {
    let mut outbound = Outbound::default();
    let mut out = Vec::new();
    let stream = [vec![0xC0, 0x00], publish("rsp", 1, Some(1), 5), vec![0xC0, 0x00]].concat();
    outbound.feed(&stream, &mut VecDeque::new(), &mut out).expect("ok");
    assert_eq!(out, stream, "passed on to the broker all the same");
    assert_eq!(outbound.take_pings(), 2);
    assert_eq!(outbound.take_pings(), 0);
}
