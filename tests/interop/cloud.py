#!/usr/bin/env python3
"""The cloud side of the connection interop tests (tests/interop/connections.sh).

Every exchange goes through clients that are not twinbus: Mosquitto's mosquitto_sub and
mosquitto_pub for MQTT over TCP (3.1.1 and 5), paho-mqtt for the websocket listeners
(mosquitto's clients have no websocket transport), and a few lines of socket code for the
proxies (an HTTP CONNECT or SOCKS5 handshake, then TLS and an MQTT CONNECT).

Subcommands (each prints `ok   NAME` or `FAIL NAME: WHY` lines, indented detail lines, and
exits 1 if a check failed):
  ask       publish {"id":"k-N","get":"*"} on a twin's command topic (again every --every
            seconds: a command sent before the gateway has subscribed is lost) until an
            answer with one of those ids comes back on its response topic
  v5        MQTT 5: a command with response-topic and correlation-data is answered on that
            topic with the same correlation data
  many      one command to each of N twins at once; all must be answered
  peers     harness self-test: every listener and proxy works with an independent client
  subscribed  publish probes until a recorder (a mosquitto_sub writing -F %j lines to a
            file) shows one: its subscription is active
  expect    wait for a message (topic, payload) in a recorder file, after a given line
  outage    the telemetry recorded around a broker restart: nothing lost, once each, in order
Standard library only, except `peers` (paho-mqtt, for the websocket listeners).
"""

from __future__ import annotations

import argparse
import base64
import datetime
import json
import os
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time

HOST = "127.0.0.1"
failures = 0


def check(name: str, cond: bool, why: str = "") -> bool:
    global failures
    if cond:
        print(f"ok   {name}", flush=True)
    else:
        failures += 1
        print(f"FAIL {name}: {why}", flush=True)
    return cond


def detail(text: str):
    print(f"     {text}", flush=True)


def short(obj, limit: int = 300) -> str:
    text = obj if isinstance(obj, str) else json.dumps(obj, sort_keys=True)
    return text if len(text) <= limit else text[:limit] + "..."


def parse_tst(tst: str) -> float:
    """mosquitto_sub's %j receive time, e.g. 2026-11-25T18:55:03.947527Z+0000, as epoch s."""
    base = tst.split("Z")[0]
    return datetime.datetime.fromisoformat(base).replace(tzinfo=datetime.timezone.utc).timestamp()


class Msg:
    def __init__(self, raw: dict):
        self.topic = raw.get("topic", "")
        self.payload = raw.get("payload", "")
        self.props = raw.get("properties") or {}
        self.retain = raw.get("retain")
        self.tst = parse_tst(raw["tst"]) if raw.get("tst") else None

    def json(self):
        try:
            return json.loads(self.payload)
        except (TypeError, ValueError):
            return None


class Sub:
    """A mosquitto_sub recording every message on some topics (-F %j: topic, payload,
    MQTT 5 properties, receive time)."""

    def __init__(self, port: int, topics: list[str], v5: bool = False, piddir: str | None = None):
        self.port = port
        self.msgs: list[Msg] = []
        self.cond = threading.Condition()
        cmd = ["mosquitto_sub", "-h", HOST, "-p", str(port), "-q", "1", "-F", "%j"]
        if v5:
            cmd += ["-V", "5"]
        for t in topics:
            cmd += ["-t", t]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     stdin=subprocess.DEVNULL, text=True)
        # connections.sh's exit trap kills what is listed in its pid dir.
        self.pidfile = os.path.join(piddir, f"mosquitto_sub.cloud.{self.proc.pid}") if piddir else None
        if self.pidfile:
            with open(self.pidfile, "w") as f:
                f.write(str(self.proc.pid))
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            try:
                m = Msg(json.loads(line))
            except (ValueError, KeyError):
                continue
            with self.cond:
                self.msgs.append(m)
                self.cond.notify_all()

    def close(self):
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.pidfile:
            os.unlink(self.pidfile)

    def mark(self) -> int:
        with self.cond:
            return len(self.msgs)

    def wait(self, pred, since: int, timeout: float) -> Msg | None:
        deadline = time.monotonic() + timeout
        i = since
        with self.cond:
            while True:
                while i < len(self.msgs):
                    if pred(self.msgs[i]):
                        return self.msgs[i]
                    i += 1
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.cond.wait(left)

    def wait_subscribed(self, topic: str, timeout: float = 15.0) -> bool:
        """mosquitto_sub gives no sign that its subscription is active: publish probes on a
        topic it listens to until one comes back."""
        deadline = time.monotonic() + timeout
        n = 0
        while time.monotonic() < deadline:
            n += 1
            token = f"probe-{os.getpid()}-{n}"
            since = self.mark()
            pub(self.port, topic, token)
            if self.wait(lambda m: m.payload == token, since, 1.0):
                return True
        return False


def pub(port: int, topic: str, payload: str, v5: bool = False, props: list[tuple[str, ...]] = (),
        extra: list[str] = ()):
    cmd = ["mosquitto_pub", "-h", HOST, "-p", str(port), "-q", "1", "-t", topic, "-m", payload]
    if v5:
        cmd += ["-V", "5"]
    for p in props:
        cmd += ["-D", "publish", *p]
    subprocess.run(cmd + list(extra), check=True, timeout=10, stdin=subprocess.DEVNULL,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def answered_ok(doc) -> bool:
    return isinstance(doc, dict) and doc.get("status") == "succeeded" and isinstance(doc.get("values"), dict)


# ---------------------------------------------------------------------------------------
# ask / v5 / many


def cmd_ask(a) -> None:
    sub = Sub(a.port, [a.rsp], piddir=a.piddir)
    try:
        if not sub.wait_subscribed(a.rsp):
            check(a.name, False, f"the cloud client's own probe on {a.rsp} never came back")
            return
        start = time.time()
        since = sub.mark()
        ids: set[str] = set()
        n = 0
        found = None
        deadline = time.monotonic() + a.timeout
        while found is None and time.monotonic() < deadline:
            n += 1
            cid = f"{a.id}-{n}"
            ids.add(cid)
            pub(a.port, a.cmd, json.dumps({"id": cid, "get": "*"}))
            found = sub.wait(lambda m: isinstance(m.json(), dict) and m.json().get("id") in ids,
                             since, min(a.every, max(0.0, deadline - time.monotonic())))
        now = time.time()
        doc = found.json() if found else None
        if check(f"{a.name}", found is not None and answered_ok(doc),
                 f"answer {short(doc)}" if found else
                 f"no answer on {a.rsp} within {a.timeout:.0f} s ({n} commands sent on {a.cmd})"):
            detail(f"answered {doc['id']} ({n} sent) {now - start:.2f} s after the first command: "
                   f"{short(doc.get('values'), 160)}")
            if a.t0:
                # The reconnect measurement: from the broker's (re)start to the first answer.
                print(f"     MEASURED {a.measure}: {now - a.t0:.2f} s "
                      f"(commands every {a.every} s)", flush=True)
    finally:
        sub.close()


def cmd_v5(a) -> None:
    # Listen on the reply topic and on the configured response topic (to report where the
    # answer went), with MQTT 5 so properties are shown.
    sub = Sub(a.port, [a.reply_to, a.rsp], v5=True, piddir=a.piddir)
    try:
        if not sub.wait_subscribed(a.reply_to):
            check(a.name, False, "the cloud client's own probe (MQTT 5) never came back")
            return
        since = sub.mark()
        corr = f"corr-{os.getpid()}-{int(time.time())}"
        cid = "v5-1"
        pub(a.port, a.cmd, json.dumps({"id": cid, "get": "*"}), v5=True,
            props=[("response-topic", a.reply_to), ("correlation-data", corr),
                   ("user-property", "trace", "t-42")])
        m = sub.wait(lambda m: m.topic == a.reply_to and (m.json() or {}).get("id") == cid,
                     since, a.timeout)
        doc = m.json() if m else None
        check(f"{a.name}: answer on the command's response-topic {a.reply_to}",
              m is not None and answered_ok(doc),
              f"answer {short(doc)}" if m else
              f"nothing with id {cid} on {a.reply_to} within {a.timeout:.0f} s; seen: "
              f"{short([(x.topic, x.payload[:80]) for x in sub.msgs[since:]])}")
        if m:
            got = m.props.get("correlation-data")
            check(f"{a.name}: answer carries the same correlation-data",
                  got == corr, f"sent {corr!r}, got {got!r} (properties {m.props})")
            detail(f"answer properties: {m.props}")
        time.sleep(0.5)
        also = [x for x in sub.msgs[since:] if x.topic == a.rsp and (x.json() or {}).get("id") == cid]
        detail(f"answer also published on the configured responses topic {a.rsp}: "
               f"{'yes' if also else 'no'} (informational)")
    finally:
        sub.close()


def cmd_many(a) -> None:
    topics = [f"{a.prefix}/{i}/rsp" for i in range(a.count)]
    sub = Sub(a.port, [f"{a.prefix}/+/rsp"], piddir=a.piddir)
    try:
        if not sub.wait_subscribed(topics[0]):
            check(a.name, False, "the cloud client's own probe never came back")
            return
        since = sub.mark()
        start = time.monotonic()
        deadline = start + a.timeout
        pending = set(range(a.count))
        rounds = 0
        while pending and time.monotonic() < deadline:
            rounds += 1
            procs = [subprocess.Popen(
                ["mosquitto_pub", "-h", HOST, "-p", str(a.port), "-q", "1",
                 "-t", f"{a.prefix}/{i}/cmd", "-m", json.dumps({"id": f"m-{i}-{rounds}", "get": "*"})],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                for i in sorted(pending)]
            for p in procs:
                p.wait(10)
            time.sleep(min(3.0, max(0.0, deadline - time.monotonic())))
            with sub.cond:
                for m in sub.msgs[since:]:
                    doc = m.json()
                    if isinstance(doc, dict) and answered_ok(doc) and str(doc.get("id", "")).startswith("m-"):
                        i = int(doc["id"].split("-")[1])
                        if m.topic == f"{a.prefix}/{i}/rsp":
                            pending.discard(i)
        check(f"{a.name}", not pending,
              f"{len(pending)} of {a.count} twins never answered, e.g. {sorted(pending)[:10]}")
        if not pending:
            detail(f"all {a.count} answered within {time.monotonic() - start:.1f} s ({rounds} round(s))")
    finally:
        sub.close()


# ---------------------------------------------------------------------------------------
# Recorder files (mosquitto_sub -F %j > FILE, started by connections.sh)


def read_rec(path: str) -> list[Msg]:
    out = []
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    out.append(Msg(json.loads(line)))
                except (ValueError, KeyError):
                    pass
    except FileNotFoundError:
        pass
    return out


def cmd_subscribed(a) -> None:
    deadline = time.monotonic() + a.timeout
    n = 0
    while time.monotonic() < deadline:
        n += 1
        token = f"probe-{os.getpid()}-{n}"
        try:
            pub(a.port, a.topic, token)
        except subprocess.SubprocessError:
            time.sleep(0.5)
            continue
        end = time.monotonic() + 1.0
        while time.monotonic() < end:
            if any(m.payload == token for m in read_rec(a.rec)):
                check(a.name, True)
                return
            time.sleep(0.05)
    check(a.name, False, f"no probe on {a.topic} reached {a.rec} within {a.timeout:.0f} s")


def cmd_expect(a) -> None:
    deadline = time.monotonic() + a.timeout
    while True:
        msgs = read_rec(a.rec)[a.after:]
        hit = next((m for m in msgs if m.topic == a.topic and m.payload == a.payload), None)
        if hit or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    seen = [m.payload for m in msgs if m.topic == a.topic]
    check(a.name, hit is not None,
          f"no {a.payload!r} on {a.topic} within {a.timeout:.0f} s; seen there: {short(seen)}")


def cmd_outage(a) -> None:
    """Telemetry around a broker outage [stop, start] (epoch s): every document arrives once,
    in order of its `time`, with no gap longer than --max-gap, and the documents produced
    during the outage arrive after it."""
    msgs = [m for m in read_rec(a.rec) if m.topic == a.topic]
    docs = [(m, m.json()) for m in msgs]
    times = [d.get("time") for _, d in docs if isinstance(d, dict) and isinstance(d.get("time"), int)]
    stop_ms, start_ms = a.stop * 1000, a.start * 1000
    detail(f"{len(times)} telemetry documents recorded; outage {a.start - a.stop:.1f} s")
    # QoS 1 is at least once: a document the broker took just before it went down, whose
    # PUBACK was lost with the link, is sent again after the reconnect (README, outbox).
    # That is the only duplicate allowed: two copies, the first received before the
    # restart, the second after it. Anything produced during the outage arrives once.
    copies: dict = {}
    for m, d in docs:
        if isinstance(d, dict) and isinstance(d.get("time"), int):
            copies.setdefault(d["time"], []).append(m)
    in_flight = [t for t, ms in copies.items() if len(ms) == 2 and t <= stop_ms + 1000
                 and ms[0].tst is not None and ms[0].tst < a.start
                 and ms[1].tst is not None and ms[1].tst >= a.start]
    dups = [t for t, ms in copies.items() if len(ms) > 1 and t not in in_flight]
    if in_flight:
        detail(f"{len(in_flight)} document(s) in flight when the broker stopped arrived again "
               f"after the reconnect (at least once), time(s) {in_flight}")
    backwards = [(x, y) for x, y in zip(times, times[1:]) if y < x]
    def story(t) -> str:
        rel = [f"{m.tst - a.stop:+.2f}" if m.tst is not None else "?" for m in copies[t]]
        return f"time {(t / 1000 - a.stop):+.2f} s received at {', '.join(rel)} s (relative to the stop)"
    check(f"{a.name}: each telemetry document arrives once (bar those in flight at the stop)",
          not dups and len(in_flight) <= 2,
          f"{len(dups)} duplicated document(s) not explained by the outage "
          f"(restart at {a.start - a.stop:+.2f} s): {'; '.join(story(t) for t in dups[:5])}; "
          f"{len(in_flight)} in flight at the stop")
    check(f"{a.name}: telemetry arrives in order of its time", not backwards,
          f"{len(backwards)} step(s) back in time, e.g. {backwards[:3]}")
    during = [(m, d) for m, d in docs if isinstance(d, dict) and isinstance(d.get("time"), int)
              and stop_ms < d["time"] < start_ms]
    expected = int((a.start - a.stop) / a.interval) - 1
    late = [m for m, _ in during if m.tst is not None and m.tst >= a.start]
    check(f"{a.name}: telemetry produced during the outage arrives after it",
          len(during) >= max(1, expected) and len(late) == len(during),
          f"{len(during)} document(s) with a time inside the outage (want >= {max(1, expected)}), "
          f"{len(late)} of them received after the broker restart")
    # Nothing lost: around the outage, consecutive documents are at most max_gap apart.
    window = sorted(t for t in set(times) if stop_ms - 5000 <= t <= start_ms + 5000)
    gaps = [(y - x) / 1000 for x, y in zip(window, window[1:])]
    worst = max(gaps, default=None)
    check(f"{a.name}: no telemetry lost around the outage (largest gap <= {a.max_gap} s)",
          worst is not None and worst <= a.max_gap and window and window[0] <= stop_ms
          and window[-1] >= start_ms,
          f"largest gap {worst} s among {len(window)} documents within 5 s of the outage "
          f"(first {window[:1]}, last {window[-1:]}, outage {stop_ms:.0f}..{start_ms:.0f})")


# ---------------------------------------------------------------------------------------
# peers: the harness checks its own peers with clients that are not twinbus


def mqtt_connect_packet(client_id: str) -> bytes:
    cid = client_id.encode()
    var = b"\x00\x04MQTT\x04\x02\x00\x1e"  # protocol MQTT 3.1.1, clean session, keep-alive 30 s
    payload = struct.pack("!H", len(cid)) + cid
    body = var + payload
    return bytes([0x10, len(body)]) + body


def read_exact(s, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"closed after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


def through_proxy(proxy: str, target_host: str, target_port: int, auth: tuple[str, str] | None) -> socket.socket:
    """A TCP connection to target through an HTTP CONNECT or SOCKS5 proxy (host:port)."""
    kind, _, addr = proxy.partition("://")
    phost, _, pport = addr.partition(":")
    s = socket.create_connection((phost, int(pport)), timeout=5)
    if kind == "http":
        req = f"CONNECT {target_host}:{target_port} HTTP/1.1\r\nHost: {target_host}:{target_port}\r\n"
        if auth:
            token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
            req += f"Proxy-Authorization: Basic {token}\r\n"
        s.sendall((req + "\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = s.recv(1)
            if not chunk:
                raise ConnectionError(f"proxy closed the connection after {head!r}")
            head += chunk
        status = head.split(b"\r\n", 1)[0].decode(errors="replace")
        if " 200" not in status:
            s.close()
            raise ConnectionError(f"proxy answered {status!r}")
    elif kind == "socks5":
        s.sendall(b"\x05\x01\x00")
        if read_exact(s, 2) != b"\x05\x00":
            raise ConnectionError("SOCKS5 proxy refused 'no authentication'")
        host = target_host.encode()
        s.sendall(b"\x05\x01\x00\x03" + bytes([len(host)]) + host + struct.pack("!H", target_port))
        rep = read_exact(s, 4)
        if rep[1] != 0:
            raise ConnectionError(f"SOCKS5 CONNECT failed with code {rep[1]}")
        atyp = rep[3]
        read_exact(s, {1: 4, 4: 16}.get(atyp, 0) or read_exact(s, 1)[0])
        read_exact(s, 2)
    else:
        raise ValueError(proxy)
    return s


def mqtts_connack(sock: socket.socket, host: str, ca: str) -> int:
    """TLS (verifying host against ca) + MQTT CONNECT; returns the CONNACK return code."""
    ctx = ssl.create_default_context(cafile=ca)
    with ctx.wrap_socket(sock, server_hostname=host) as t:
        t.sendall(mqtt_connect_packet(f"peers-{os.getpid()}"))
        ack = read_exact(t, 4)
        if ack[0] != 0x20:
            raise ConnectionError(f"not a CONNACK: {ack!r}")
        t.sendall(b"\xe0\x00")  # DISCONNECT
        return ack[3]


def paho_roundtrip(cloud_port: int, ws_port: int, tls_ca: str | None, topic: str) -> str | None:
    """Subscribe through a websocket listener with paho, publish with mosquitto_pub on the
    cloud listener: None when the message arrives, else why not."""
    import paho.mqtt.client as mqtt

    got = threading.Event()
    subscribed = threading.Event()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"peers-ws-{os.getpid()}-{ws_port}",
                    transport="websockets")
    c.ws_set_options(path="/mqtt")
    if tls_ca:
        c.tls_set(ca_certs=tls_ca)
    c.on_connect = lambda cl, *_: cl.subscribe(topic, qos=1)
    c.on_subscribe = lambda *_: subscribed.set()
    c.on_message = lambda cl, ud, msg: got.set() if msg.payload == b"ws-ok" else None
    try:
        c.connect("localhost", ws_port, keepalive=30)
    except Exception as e:  # noqa: BLE001 - any failure is the answer
        return f"connect failed: {e!r}"
    c.loop_start()
    try:
        if not subscribed.wait(5):
            return "no SUBACK within 5 s"
        pub(cloud_port, topic, "ws-ok")
        return None if got.wait(5) else "message not received within 5 s"
    finally:
        c.disconnect()
        c.loop_stop()


def cmd_peers(a) -> None:
    cp = a.cloud_port
    sub = Sub(cp, ["peers/#", a.auth_topic], piddir=a.piddir)
    try:
        if not check("peers: cloud client subscribed on the plain listener", sub.wait_subscribed("peers/probe"),
                     "own probe never came back"):
            return

        def via(name: str, port: int, extra: list[str], host: str = "localhost",
                want: str = "delivered", topic: str = "peers/x"):
            """mosquitto_pub to a listener; want: delivered (seen by the cloud client),
            refused (mosquitto_pub fails) or dropped (accepted, never delivered: an ACL)."""
            token = f"{name}-{os.getpid()}"
            since = sub.mark()
            try:
                subprocess.run(["mosquitto_pub", "-h", host, "-p", str(port), "-q", "1", "-t", topic,
                                "-m", token, *extra], check=True, timeout=10, stdin=subprocess.DEVNULL,
                               capture_output=True, text=True)
                err = None
            except subprocess.CalledProcessError as e:
                err = (e.stderr or e.stdout or "").strip().replace("\n", " ") or f"exit {e.returncode}"
            seen = sub.wait(lambda m: m.payload == token, since, 3.0 if want == "delivered" else 1.0) is not None
            if want == "delivered":
                check(f"peers: {name}", err is None and seen,
                      err or "published, but the cloud client did not see it")
            elif want == "refused":
                check(f"peers: {name}", err is not None and not seen,
                      "mosquitto_pub was accepted" if err is None else "message got through")
            else:
                check(f"peers: {name}", err is None and not seen,
                      f"mosquitto_pub failed: {err}" if err else "message got through")

        ca, d = a.ca, os.path.dirname(a.ca)
        via("mqtts listener accepts mosquitto_pub trusting the private CA", a.tls, ["--cafile", ca])
        via("mqtts listener is refused by a client trusting another CA", a.tls,
            ["--cafile", os.path.join(d, "other-ca.pem")], want="refused")
        via("wrong-name listener is refused for host localhost", a.tls_wrong, ["--cafile", ca], want="refused")
        via("expired-certificate listener is refused", a.tls_expired, ["--cafile", ca], want="refused")
        for key in ("client-ec.pkcs8.key", "client-rsa.pkcs1.key"):
            cert = os.path.join(d, key.split(".")[0] + ".pem")
            via(f"mutual-TLS listener accepts a client certificate ({key})", a.mtls,
                ["--cafile", ca, "--cert", cert, "--key", os.path.join(d, key)])
        via("mutual-TLS listener refuses a client without a certificate", a.mtls, ["--cafile", ca],
            want="refused")
        gw = ["-u", a.user, "-P", os.environ["GW_PASSWORD"]]
        via("password listener accepts the gateway's user on its own topic", a.auth, gw,
            host=HOST, topic=a.auth_topic)
        via("password listener refuses a wrong password", a.auth,
            ["-u", a.user, "-P", os.environ["GW_WRONG_PASSWORD"]], host=HOST, want="refused",
            topic=a.auth_topic)
        via("password listener's ACL drops the user's publish outside its topics", a.auth, gw,
            host=HOST, want="dropped", topic="peers/not-theirs")

        why = paho_roundtrip(cp, a.ws, None, "peers/ws")
        check("peers: websocket listener (paho-mqtt, path /mqtt)", why is None, why or "")
        why = paho_roundtrip(cp, a.wss, ca, "peers/wss")
        check("peers: secure websocket listener (paho-mqtt, private CA)", why is None, why or "")

        user, _, password = a.proxy_auth.partition(":")
        for name, proxy, auth, target in [
            ("HTTP CONNECT proxy", a.http_proxy, None, a.tls),
            ("HTTP CONNECT proxy with basic auth", a.http_auth_proxy, (user, password), a.tls),
            ("SOCKS5 proxy", a.socks_proxy, None, a.tls),
            ("HTTP CONNECT proxy to the secure websocket listener", a.http_proxy, None, a.wss),
        ]:
            try:
                s = through_proxy(proxy, "localhost", target, auth)
                if target == a.wss:
                    ctx = ssl.create_default_context(cafile=ca)
                    with ctx.wrap_socket(s, server_hostname="localhost") as t:
                        t.sendall(b"GET /mqtt HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
                                  b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                                  b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: mqtt\r\n\r\n")
                        status = t.recv(200).split(b"\r\n", 1)[0].decode(errors="replace")
                    check(f"peers: {name}: websocket upgrade over TLS", " 101" in status, f"got {status!r}")
                else:
                    rc = mqtts_connack(s, "localhost", ca)
                    check(f"peers: {name}: TLS + MQTT CONNACK from the broker", rc == 0, f"CONNACK code {rc}")
            except Exception as e:  # noqa: BLE001
                check(f"peers: {name}", False, repr(e))
        try:
            through_proxy(a.http_auth_proxy, "localhost", a.tls, None).close()
            check("peers: HTTP proxy with basic auth refuses a client without credentials", False,
                  "CONNECT without credentials was accepted")
        except ConnectionError as e:
            check("peers: HTTP proxy with basic auth refuses a client without credentials", True)
            detail(str(e))
    finally:
        sub.close()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--piddir")
    sp = ap.add_subparsers(dest="sub", required=True)

    p = sp.add_parser("ask")
    p.add_argument("name")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--cmd", required=True)
    p.add_argument("--rsp", required=True)
    p.add_argument("--id", default="k")
    p.add_argument("--timeout", type=float, default=20.0)
    p.add_argument("--every", type=float, default=1.0)
    p.add_argument("--t0", type=float, help="epoch s to measure the answer time from")
    p.add_argument("--measure", default="time to answer")

    p = sp.add_parser("v5")
    p.add_argument("name")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--cmd", required=True)
    p.add_argument("--rsp", required=True)
    p.add_argument("--reply-to", required=True)
    p.add_argument("--timeout", type=float, default=10.0)

    p = sp.add_parser("many")
    p.add_argument("name")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--prefix", required=True, help="twin i uses PREFIX/i/cmd and PREFIX/i/rsp")
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--timeout", type=float, default=40.0)

    p = sp.add_parser("subscribed")
    p.add_argument("name")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--topic", required=True)
    p.add_argument("--rec", required=True)
    p.add_argument("--timeout", type=float, default=15.0)

    p = sp.add_parser("expect")
    p.add_argument("name")
    p.add_argument("--rec", required=True)
    p.add_argument("--topic", required=True)
    p.add_argument("--payload", required=True)
    p.add_argument("--after", type=int, default=0, help="ignore the first N recorded lines")
    p.add_argument("--timeout", type=float, default=10.0)

    p = sp.add_parser("outage")
    p.add_argument("name")
    p.add_argument("--rec", required=True)
    p.add_argument("--topic", required=True)
    p.add_argument("--stop", type=float, required=True)
    p.add_argument("--start", type=float, required=True)
    p.add_argument("--interval", type=float, required=True)
    p.add_argument("--max-gap", type=float, required=True)

    p = sp.add_parser("peers")
    p.add_argument("--cloud-port", type=int, required=True)
    p.add_argument("--ca", required=True)
    for opt in ("tls", "tls-wrong", "tls-expired", "mtls", "auth", "ws", "wss"):
        p.add_argument(f"--{opt}", type=int, required=True)
    p.add_argument("--user", required=True)
    p.add_argument("--auth-topic", required=True)
    p.add_argument("--http-proxy", required=True)
    p.add_argument("--http-auth-proxy", required=True)
    p.add_argument("--proxy-auth", required=True, help="USER:PASSWORD")
    p.add_argument("--socks-proxy", required=True)

    a = ap.parse_args()
    # On SIGTERM (connections.sh stopping us), unwind through `finally` to stop mosquitto_sub.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    {"ask": cmd_ask, "v5": cmd_v5, "many": cmd_many, "subscribed": cmd_subscribed,
     "expect": cmd_expect, "outage": cmd_outage, "peers": cmd_peers}[a.sub](a)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
