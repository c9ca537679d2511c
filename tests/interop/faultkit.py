#!/usr/bin/env python3
"""The machinery of the fault tests (faults.py): results, processes, logs, the peers.

  check/detail/measured  `ok`/`FAIL` lines, indented details, the `MEASURED` line per test
  Proc, Log              processes of ours (gateway, Mosquitto) with pid files in the pid
                         dir, stopped by pid; log files waited on for a line
  Writes                 the pymodbus slave's write log: how often each value was written
  Cloud, Stream          a cloud application (paho-mqtt, QoS 1) that records every answer and
                         telemetry document, and a command stream that resends unanswered ids
  Relay                  a TCP proxy between the gateway and the broker that parses MQTT 3.1.1
                         packets: what was published, resent, acknowledged; drops PUBLISH
  Blackhole              a Modbus TCP line whose far end never answers
  telemetry_report, answers_report
                         lost and duplicated messages, attributed to the gateway or the broker
"""

from __future__ import annotations

import collections
import json
import os
import re
import signal
import socket
import struct
import subprocess
import threading
import time

import paho.mqtt.client as mqtt

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


def detail(text: str) -> None:
    print(f"     {text}", flush=True)


def measured(text: str) -> None:
    print(f"     MEASURED {text}", flush=True)


def short(obj, limit: int = 300) -> str:
    text = obj if isinstance(obj, str) else json.dumps(obj, sort_keys=True)
    return text if len(text) <= limit else text[:limit] + "..."


def until(pred, timeout: float, step: float = 0.05) -> bool:
    """Polls pred until it is true (True) or timeout seconds passed (False)."""
    deadline = time.monotonic() + timeout
    while True:
        if pred():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(step)


def tcp_open(port: int) -> bool:
    try:
        socket.create_connection((HOST, port), timeout=0.5).close()
        return True
    except OSError:
        return False


# ---------------------------------------------------------------------------------------
# Processes


class Proc:
    """A process of ours (gateway, Mosquitto), in a session of its own, with a pid file in
    the pid dir while it runs."""

    def __init__(self, name: str, argv: list[str], log: str, piddir: str, env: dict | None = None):
        self.name, self.argv, self.log, self.piddir, self.env = name, argv, log, piddir, env
        self.p: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> "Proc":
        self.starts += 1
        env = dict(os.environ, **(self.env or {}))
        with open(self.log, "ab") as out:
            self.p = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                      start_new_session=True, env=env)
        with open(self.pidfile(), "w") as f:
            f.write(str(self.p.pid))
        return self

    def pidfile(self) -> str:
        return os.path.join(self.piddir, self.name)

    @property
    def pid(self) -> int:
        assert self.p is not None
        return self.p.pid

    def alive(self) -> bool:
        return self.p is not None and self.p.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.pid, sig)

    def wait(self, timeout: float) -> int | None:
        """The exit status (negative: killed by that signal), or None if still running."""
        if self.p is None:
            return None
        try:
            rc = self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        self._forget()
        return rc

    def kill9(self) -> None:
        self.signal(signal.SIGKILL)
        self.wait(10)

    def stop(self, grace: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL after `grace`; the exit status (None if it was not running)."""
        if self.p is None:
            return None
        if self.p.poll() is not None:
            self._forget()
            return self.p.returncode
        os.kill(self.pid, signal.SIGTERM)
        rc = self.wait(grace)
        if rc is None:
            detail(f"{self.name} (pid {self.pid}) ignored SIGTERM for {grace:.0f} s: killing it")
            self.kill9()
            rc = self.p.returncode
        return rc

    def _forget(self) -> None:
        try:
            os.unlink(self.pidfile())
        except FileNotFoundError:
            pass


class Log:
    """A log file that grows: count or wait for lines matching a pattern after a mark."""

    def __init__(self, path: str):
        self.path = path

    def text(self) -> str:
        try:
            with open(self.path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def mark(self) -> int:
        try:
            return os.path.getsize(self.path)
        except FileNotFoundError:
            return 0

    def lines(self, pattern: str, since: int = 0) -> list[str]:
        try:
            with open(self.path, "rb") as f:
                f.seek(since)
                data = f.read().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return []
        rx = re.compile(pattern)
        return [line for line in data.splitlines() if rx.search(line)]

    def wait(self, pattern: str, since: int, timeout: float, proc: Proc | None = None) -> str | None:
        found: list[str] = []

        def seen() -> bool:
            found[:] = self.lines(pattern, since)
            return bool(found) or (proc is not None and not proc.alive())

        until(seen, timeout)
        return found[0] if found else None


def gateway(a, name: str, log: str | None = None) -> Proc:
    return Proc(name, [a.twinbus, "run", "-c", a.config], log or os.path.join(a.work, f"{name}.log"), a.piddir,
                env={"RUST_LOG": os.environ.get("RUST_LOG", "info")})


CONNECTED = r"MQTT connected"


# ---------------------------------------------------------------------------------------
# The device's record: slave.py's write log


class Writes:
    """The slave's write log (one JSON line per write request it received), from a mark on."""

    def __init__(self, path: str):
        self.path = path
        self.start = self._size()

    def _size(self) -> int:
        try:
            return os.path.getsize(self.path)
        except FileNotFoundError:
            return 0

    def count(self) -> int:
        """Bytes written to the log since the mark (grows with every write received)."""
        return self._size() - self.start

    def values(self, address: int) -> collections.Counter:
        """How many times each value was written to holding register `address`."""
        out: collections.Counter = collections.Counter()
        with open(self.path, "rb") as f:
            f.seek(self.start)
            for line in f.read().decode("utf-8", errors="replace").splitlines():
                try:
                    w = json.loads(line)
                except ValueError:
                    continue
                if w.get("fc") in (6, 16) and w.get("address") == address and w.get("values"):
                    out[w["values"][0]] += 1
        return out


# ---------------------------------------------------------------------------------------
# The cloud: paho-mqtt, QoS 1


class Cloud:
    """A cloud application on one broker: subscribes (QoS 1) to answer and telemetry topics,
    records everything it receives with the time, and sends commands. With clean=False its
    session (and what the broker queues for it) survives its reconnects."""

    def __init__(self, port: int, client_id: str, topics: list[str], clean: bool = True):
        self.port = port
        self.topics = topics
        self.cond = threading.Condition()
        self.answers: dict = collections.defaultdict(list)  # id (None without one) -> [(t, doc)]
        self.telemetry: list[tuple[float, str, dict]] = []  # (t received, topic, doc)
        self.connects = 0
        self.subscribed = 0
        self.acked: dict[int, float] = {}  # mid -> when the broker acknowledged it (PUBACK)
        self.sent: dict = {}  # id -> [(t sent, mid)], every send of it
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean,
                             protocol=mqtt.MQTTv311)
        self.c.max_inflight_messages_set(1000)
        self.c.max_queued_messages_set(0)
        self.c.reconnect_delay_set(min_delay=0.2, max_delay=1)
        self.c.on_connect = self._on_connect
        self.c.on_subscribe = self._on_subscribe
        self.c.on_message = self._on_message
        self.c.on_publish = self._on_publish
        self.c.connect_async(HOST, port, keepalive=10)
        self.c.loop_start()

    def _on_connect(self, client, userdata, flags, rc, properties=None):
        if rc == 0:
            with self.cond:
                self.connects += 1
            client.subscribe([(t, 1) for t in self.topics])

    def _on_subscribe(self, client, userdata, mid, rcs, properties=None):
        with self.cond:
            self.subscribed += 1
            self.cond.notify_all()

    def _on_publish(self, client, userdata, mid, rc=None, properties=None):
        with self.cond:
            self.acked[mid] = time.monotonic()

    def _on_message(self, client, userdata, msg):
        now = time.monotonic()
        try:
            doc = json.loads(msg.payload)
        except ValueError:
            doc = None
        with self.cond:
            if msg.topic.endswith("/telemetry"):
                if isinstance(doc, dict):
                    self.telemetry.append((now, msg.topic, doc))
            elif isinstance(doc, dict):
                self.answers[doc.get("id")].append((now, doc))
            else:
                self.answers["<not json>"].append((now, {"payload": msg.payload[:200].decode(errors="replace")}))
            self.cond.notify_all()

    def wait_subscribed(self, timeout: float = 15) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: self.subscribed > 0, timeout)

    def send(self, topic: str, doc: dict, payload: bytes | None = None) -> mqtt.MQTTMessageInfo:
        info = self.c.publish(topic, payload if payload is not None else json.dumps(doc), qos=1)
        cid = doc.get("id") if doc else None
        with self.cond:
            self.sent.setdefault(cid, []).append((time.monotonic(), info.mid))
        return info

    def answered(self, ids) -> int:
        with self.cond:
            return sum(1 for i in ids if self.answers.get(i))

    def wait_answered(self, ids, timeout: float) -> bool:
        ids = list(ids)
        with self.cond:
            return self.cond.wait_for(lambda: all(self.answers.get(i) for i in ids), timeout)

    def probe(self, cmd: str, prefix: str, timeout: float = 30) -> bool:
        """Sends `get *` until one is answered: the gateway is subscribed and answering."""
        deadline = time.monotonic() + timeout
        n = 0
        while time.monotonic() < deadline:
            n += 1
            cid = f"{prefix}-{n}"
            self.send(cmd, {"id": cid, "get": "*"})
            with self.cond:
                if self.cond.wait_for(lambda: any(self.answers.get(f"{prefix}-{k}") for k in range(1, n + 1)),
                                      min(1.0, max(0.0, deadline - time.monotonic()))):
                    return True
        return False

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def status_of(doc: dict) -> str:
    """succeeded / failed / interrupted / busy / rejected / ..."""
    s = doc.get("status", "?")
    err = str(doc.get("error", ""))
    if s == "rejected" and err.startswith("busy"):
        return "busy"
    if s == "failed" and err.startswith("interrupted"):
        return "interrupted"
    return s


# ---------------------------------------------------------------------------------------
# The relay: a TCP proxy between the gateway and the broker that parses MQTT 3.1.1 packets


class PacketReader:
    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = bytearray()

    def _fill(self, n: int) -> None:
        while len(self.buf) < n:
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise EOFError
            self.buf += chunk

    def next(self) -> tuple[int, bytes, bytes]:
        """(first byte, body, the whole packet)."""
        self._fill(2)
        value, mult, i = 0, 1, 1
        while True:
            self._fill(i + 1)
            b = self.buf[i]
            value += (b & 0x7F) * mult
            mult *= 128
            i += 1
            if not b & 0x80:
                break
            if i > 4:
                raise EOFError  # malformed remaining length
        self._fill(i + value)
        raw = bytes(self.buf[:i + value])
        del self.buf[:i + value]
        return raw[0], raw[i:], raw


CONTROL = {1: "CONNECT", 2: "CONNACK", 4: "PUBACK", 8: "SUBSCRIBE", 9: "SUBACK", 12: "PINGREQ", 13: "PINGRESP",
           14: "DISCONNECT"}


class Conn:
    def __init__(self, n: int, client: socket.socket, broker: socket.socket):
        self.n, self.client, self.broker = n, client, broker
        self.opened = time.monotonic()
        self.closed: float | None = None
        self.closed_by = ""
        self.connack: int | None = None
        self.dropped = 0


class Relay:
    """Relays one TCP connection to the broker per gateway connection, packet by packet.

    It records every PUBLISH in both directions (connection, packet id, DUP flag, topic,
    payload, time) and every PUBACK, so a test can tell what the gateway sent, resent and
    had acknowledged by the broker. `drop(seconds)` drops every PUBLISH, both ways, for that
    long while other packets (CONNECT/CONNACK, SUBSCRIBE, PUBACK, PINGREQ/PINGRESP) pass;
    see `heal` for what happens to the connections that lost packets. A broker that cannot
    be reached closes the gateway's side at once, like a refused connection would."""

    def __init__(self, listen_port: int, broker_port: int):
        self.broker_port = broker_port
        self.lock = threading.Condition()
        self.conns: list[Conn] = []
        self.up: list[dict] = []  # gateway -> broker PUBLISH
        self.down: list[dict] = []  # broker -> gateway PUBLISH
        self.refused = 0
        self.drop_until = 0.0
        self.drop_from = 0.0
        self.resets = 0
        self.passed: collections.Counter = collections.Counter()  # control packets passed while dropping
        self.closing = False
        self.lsock = socket.socket()
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind((HOST, listen_port))
        self.lsock.listen(64)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closing:
            try:
                client, _ = self.lsock.accept()
            except OSError:
                return
            try:
                broker = socket.create_connection((HOST, self.broker_port), timeout=2)
                broker.settimeout(None)
            except OSError:
                with self.lock:
                    self.refused += 1
                client.close()
                continue
            for s in (client, broker):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self.lock:
                conn = Conn(len(self.conns) + 1, client, broker)
                self.conns.append(conn)
            threading.Thread(target=self._pump, args=(conn, client, broker, "up"), daemon=True).start()
            threading.Thread(target=self._pump, args=(conn, broker, client, "down"), daemon=True).start()

    def dropping(self, now: float) -> bool:
        return self.drop_from <= now < self.drop_until

    def _pump(self, conn: Conn, src: socket.socket, dst: socket.socket, way: str) -> None:
        reader = PacketReader(src)
        try:
            while True:
                first, body, raw = reader.next()
                kind = first >> 4
                now = time.monotonic()
                drop = False
                with self.lock:
                    if kind == 3:  # PUBLISH
                        qos = (first >> 1) & 3
                        tlen = struct.unpack("!H", body[:2])[0]
                        topic = body[2:2 + tlen].decode(errors="replace")
                        pos = 2 + tlen
                        pkid = None
                        if qos:
                            pkid = struct.unpack("!H", body[pos:pos + 2])[0]
                            pos += 2
                        drop = self.dropping(now)
                        rec = {"conn": conn.n, "pkid": pkid, "dup": bool(first & 8), "topic": topic,
                               "payload": body[pos:], "t": now, "dropped": drop, "acked": False}
                        (self.up if way == "up" else self.down).append(rec)
                        if drop:
                            conn.dropped += 1
                    elif self.dropping(now):
                        self.passed[CONTROL.get(kind, str(kind))] += 1
                    if kind == 4 and way == "down":  # PUBACK for the gateway's PUBLISH
                        pkid = struct.unpack("!H", body[:2])[0]
                        for rec in reversed(self.up):
                            if rec["conn"] == conn.n and rec["pkid"] == pkid and not rec["dropped"]:
                                rec["acked"] = True
                                break
                    elif kind == 2 and way == "down" and len(body) >= 2:  # CONNACK
                        conn.connack = body[1]
                        self.lock.notify_all()
                if not drop:
                    dst.sendall(raw)
        except (OSError, EOFError):
            pass
        finally:
            with self.lock:
                if conn.closed is None:
                    conn.closed = time.monotonic()
                    conn.closed_by = "gateway" if way == "up" else "broker"
                    self.lock.notify_all()
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def drop(self, seconds: float) -> float:
        """Drops PUBLISH packets from now on for `seconds`; heals after. Returns the heal time."""
        now = time.monotonic()
        with self.lock:
            # Until `heal` has reset the connections: a PUBLISH let through between the
            # window's end and the reset would be acknowledged by the broker on a connection
            # about to die, and the gateway's correct resend counted as its duplicate.
            self.drop_from, self.drop_until = now, float("inf")
        timer = threading.Timer(seconds, self.heal)
        timer.daemon = True
        timer.start()
        return now + seconds

    def heal(self) -> None:
        """The path is back. A connection that lost packets does not come back with it: TCP
        never delivers later bytes after lost ones, so on a real link such a connection
        ends in a reset (retransmissions give up, or a middlebox forgot it). The relay resets
        (RST) every connection on which it dropped a packet; new ones pass everything."""
        with self.lock:
            victims = [c for c in self.conns if c.closed is None and c.dropped > 0]
            for c in victims:
                c.closed = time.monotonic()
                c.closed_by = "relay (reset at heal)"
                self.resets += 1
            self.lock.notify_all()
        for c in victims:
            for s in (c.client, c.broker):
                try:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    s.close()
                except OSError:
                    pass
        with self.lock:
            self.drop_until = time.monotonic()

    def sessions(self) -> int:
        """Connections the broker accepted (CONNACK 0)."""
        with self.lock:
            return sum(1 for c in self.conns if c.connack == 0)

    def wait_sessions(self, n: int, timeout: float) -> bool:
        with self.lock:
            return self.lock.wait_for(lambda: sum(1 for c in self.conns if c.connack == 0) >= n, timeout)

    def close(self) -> None:
        self.closing = True
        self.lsock.close()
        with self.lock:
            conns = list(self.conns)
        for c in conns:
            for s in (c.client, c.broker):
                try:
                    s.close()
                except OSError:
                    pass


def payload_json(rec: dict):
    try:
        return json.loads(rec["payload"])
    except ValueError:
        return None


# ---------------------------------------------------------------------------------------
# Telemetry: lost and duplicated documents


def telemetry_report(cloud: Cloud, relay: Relay | None, topic: str, period: float, t_from: float, t_to: float):
    """Telemetry with poll = telemetry_interval is one document per poll, each with the
    `time` its values were read. Definitions:
      lost        a gap between consecutive `time`s received of about k poll periods is
                  k - 1 lost documents (one lost at two periods);
      duplicated  the same `time` received more than once.
    With a relay, each one is attributed:
      the broker's   a document the broker acknowledged (PUBACK seen by the relay) and
                     never delivered (lost in its own crash); a document the gateway
                     published once and the cloud received twice (the broker's redelivery);
      in flight      the gateway published it again after the first copy went unacknowledged
                     on a connection that died (QoS 1: at least once) and both arrived;
      the gateway's  everything else: a document never published, published and never
                     resent after an unacknowledged copy, or published again after the broker
                     had acknowledged it.
    Only documents with `time` in [t_from, t_to] (epoch ms) count."""
    with cloud.cond:
        docs = [(t, d) for t, tp, d in cloud.telemetry if tp == topic and isinstance(d.get("time"), int)]
    times = [d["time"] for _, d in docs if t_from <= d["time"] <= t_to]
    got = collections.Counter(times)
    uniq = sorted(got)
    p_ms = period * 1000
    # Polls are at least a period apart (the next is scheduled a period after one ends), so
    # a lost document makes a gap of two periods or more; 1.9 tolerates a late poll.
    gaps = [(x, y) for x, y in zip(uniq, uniq[1:]) if y - x > 1.9 * p_ms]
    lost_total = sum(max(1, round((y - x) / p_ms) - 1) for x, y in gaps)
    dups = {t: n for t, n in got.items() if n > 1}
    r = {"received": len(times), "distinct": len(uniq), "lost": lost_total, "duplicated": sum(n - 1 for n in dups.values()),
         "gaps": gaps, "dups": dups}
    if relay is None:
        return r
    with relay.lock:
        sends = [(rec, payload_json(rec)) for rec in relay.up if rec["topic"] == topic]
    by_time: dict = collections.defaultdict(list)
    for rec, d in sends:
        if isinstance(d, dict) and isinstance(d.get("time"), int):
            by_time[d["time"]].append(rec)
    sent_times = sorted(t for t in by_time if t_from <= t <= t_to)
    # Never published: gaps in what the gateway sent at all.
    never = sum(max(1, round((y - x) / p_ms) - 1) for x, y in zip(sent_times, sent_times[1:]) if y - x > 1.9 * p_ms)
    missing = [t for t in sent_times if t not in got and (not uniq or uniq[0] <= t <= uniq[-1])]
    broker_lost = [t for t in missing if any(rec["acked"] for rec in by_time[t])]
    gw_unresent = [t for t in missing if t not in broker_lost]
    broker_dup, in_flight, gw_dup = 0, 0, 0
    for t, n in dups.items():
        recs = [rec for rec in by_time.get(t, []) if not rec["dropped"]]
        if len(recs) <= 1:
            broker_dup += n - 1
            continue
        # Every copy before the last must have gone unacknowledged on a connection that died.
        early_acked = any(rec["acked"] for rec in recs[:-1])
        extra = min(n - 1, len(recs) - 1)
        if early_acked:
            gw_dup += extra
        else:
            in_flight += extra
        broker_dup += (n - 1) - extra
    resent = sum(len(by_time[t]) - 1 for t in sent_times)
    r.update(never_sent=never, broker_lost=len(broker_lost), gateway_unresent=len(gw_unresent),
             gateway_lost=never + len(gw_unresent), broker_dup=broker_dup, in_flight_dup=in_flight,
             gateway_dup=gw_dup, resent=resent, published=sum(len(by_time[t]) for t in sent_times),
             sent_distinct=len(sent_times))
    return r


def answers_report(cloud: Cloud, relay: Relay, cmd: str, rsp: str, ids: list[str]) -> dict:
    """Answers received more than once, attributed like telemetry (see telemetry_report).
    The gateway answers every copy of a command it is handed (a repeated id gets the first
    answer again), so a copy of an answer it publishes again is explained either by the
    command reaching it again (the cloud's resend, or the broker's redelivery) since the
    previous copy, or by the previous copy going unacknowledged on a connection that died
    (in flight). Anything else is the gateway's duplicate; an answer received more often
    than the gateway published it is the broker's redelivery."""
    with relay.lock:
        delivered = collections.defaultdict(list)
        for r in relay.down:
            if r["topic"] == cmd and not r["dropped"]:
                delivered[(payload_json(r) or {}).get("id")].append(r["t"])
        copies = collections.defaultdict(list)
        for r in relay.up:
            if r["topic"] == rsp and not r["dropped"]:
                copies[(payload_json(r) or {}).get("id")].append(r)
    with cloud.cond:
        received = {c: len(cloud.answers.get(c, [])) for c in ids}
    out = {"duplicated": 0, "repeat": 0, "in_flight": 0, "gateway": 0, "broker": 0}
    for c in ids:
        n = received[c]
        if n <= 1:
            continue
        out["duplicated"] += n - 1
        recs = copies.get(c, [])
        for prev, cur in zip(recs, recs[1:]):
            if any(prev["t"] < t <= cur["t"] for t in delivered.get(c, [])):
                out["repeat"] += 1
            elif not prev["acked"]:
                out["in_flight"] += 1
            else:
                out["gateway"] += 1
        out["broker"] += max(0, n - max(1, len(recs)))
    return out


def epoch_ms() -> int:
    return int(time.time() * 1000)


# ---------------------------------------------------------------------------------------
# Command streams with a cloud that resends


class Stream:
    """A cloud's command stream: a new `set` every `every` seconds, each with its own id and
    value; an id not answered `retry` seconds after its last send is sent again, with the
    same id and value, as a real cloud application does (retry=0: never)."""

    def __init__(self, cloud: Cloud, cmd: str, prefix: str, base: int, every: float, retry: float):
        self.cloud, self.cmd, self.prefix, self.base, self.every, self.retry = cloud, cmd, prefix, base, every, retry
        self.ids: list[str] = []
        self.value: dict[str, int] = {}
        self.resends = 0
        self.resent_ids: set[str] = set()
        self.running = True
        self.new = True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _doc(self, cid: str) -> dict:
        return {"id": cid, "set": {"deviceAttrib": {"value": self.value[cid]}}}

    def _run(self) -> None:
        n = 0
        next_new = time.monotonic()
        while self.running:
            now = time.monotonic()
            if self.new and now >= next_new:
                cid = f"{self.prefix}-{n}"
                self.value[cid] = (self.base + n) % 65536
                n += 1
                self.ids.append(cid)
                self.cloud.send(self.cmd, self._doc(cid))
                next_new = now + self.every
            if self.retry:
                with self.cloud.cond:
                    due = [c for c in self.ids if not self.cloud.answers.get(c)
                           and now - self.cloud.sent[c][-1][0] >= self.retry]
                for c in due:
                    self.resends += 1
                    self.resent_ids.add(c)
                    self.cloud.send(self.cmd, self._doc(c))
            time.sleep(0.01)

    def stop_new(self) -> None:
        self.new = False

    def stop(self) -> None:
        self.running = False
        self.thread.join(5)

    def unanswered(self) -> list[str]:
        with self.cloud.cond:
            return [c for c in list(self.ids) if not self.cloud.answers.get(c)]

    def summary(self, writes: Writes, address: int) -> dict:
        with self.cloud.cond:
            got = {c: list(self.cloud.answers.get(c, [])) for c in self.ids}
        written = writes.values(address)
        twice = [c for c in self.ids if written[self.value[c]] > 1]
        kinds = collections.Counter(status_of(v[0][1]) for v in got.values() if v)
        # Conflicting answers to one id: the first answer is the one; a repeat must equal it.
        conflicting = [c for c, v in got.items() if len({(d.get("status"), str(d.get("error"))) for _, d in v}) > 1]
        return {"sent": len(self.ids), "sends": len(self.ids) + self.resends, "answered": sum(1 for v in got.values() if v),
                "lost": [c for c, v in got.items() if not v], "answers": sum(len(v) for v in got.values()),
                "dup_answers": sum(len(v) - 1 for v in got.values() if len(v) > 1), "twice": twice, "kinds": kinds,
                "conflicting": conflicting, "writes": sum(written[self.value[c]] for c in self.ids)}


def kinds_text(kinds: collections.Counter) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(kinds.items()))


# ---------------------------------------------------------------------------------------
# A dead Modbus line


class Blackhole:
    """A Modbus TCP 'device' that accepts connections and never answers: every request
    times out. It records the function codes it received (the sign a command reached the
    line)."""

    def __init__(self, port: int):
        self.lock = threading.Lock()
        self.requests: collections.Counter = collections.Counter()
        self.last_unit = 0  # the unit id of the last request: the device whose transaction is on the line
        self.socks: list[socket.socket] = []
        self.lsock = socket.socket()
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind((HOST, port))
        self.lsock.listen(64)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                s, _ = self.lsock.accept()
            except OSError:
                return
            with self.lock:
                self.socks.append(s)
            threading.Thread(target=self._swallow, args=(s,), daemon=True).start()

    def _swallow(self, s: socket.socket) -> None:
        buf = b""
        try:
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    return
                buf += chunk
                while len(buf) >= 8:  # MBAP: transaction, protocol, length, unit; then the PDU
                    length = struct.unpack("!H", buf[4:6])[0]
                    if len(buf) < 6 + length:
                        break
                    with self.lock:
                        self.requests[buf[7]] += 1
                        self.last_unit = buf[6]
                    buf = buf[6 + length:]
        except OSError:
            return

    def unit_on_the_line(self) -> int:
        with self.lock:
            return self.last_unit

    def writes(self) -> int:
        with self.lock:
            return sum(n for fc, n in self.requests.items() if fc in (5, 6, 15, 16, 22, 23))

    def close(self) -> None:
        self.lsock.close()
        with self.lock:
            for s in self.socks:
                try:
                    s.close()
                except OSError:
                    pass
