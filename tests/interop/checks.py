#!/usr/bin/env python3
"""Gateway checks: drive twinbus through Mosquitto and verify the effect on the pymodbus slaves.

MQTT goes through Mosquitto's own command line clients (mosquitto_sub/mosquitto_pub), so
both ends of every exchange are independent of twinbus. One mosquitto_sub records every
message under ci/# from the start, which means a response can never slip past us between
publishing a command and starting to listen for its answer.

The slaves' evidence files (see slave.py) prove what reached the device: the write log
(every write request received) and the state snapshot (what the device now holds).

Prints `ok   NAME` or `FAIL NAME: WHY` per check; exits 1 if any check failed.
Standard library only, so it runs with any Python 3.11.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

HOST = "127.0.0.1"
ANSWER_TIMEOUT = 10.0  # s; a command answer normally takes a few ms (RTU: tens of ms)
SETTLE = 1.0  # s; after an answer, how long a late (unwanted) write gets to show up
F32_42_5 = [0x422A, 0x0000]
LAMP_WORD = 0x00F0  # holding 20 on the slaves (slave.py); the lamp is its bit 3

failures = 0


def check(name: str, cond: bool, why: str = "") -> bool:
    global failures
    if cond:
        print(f"ok   {name}", flush=True)
    else:
        failures += 1
        print(f"FAIL {name}: {why}", flush=True)
    return cond


def short(obj, limit: int = 400) -> str:
    text = obj if isinstance(obj, str) else json.dumps(obj, sort_keys=True)
    return text if len(text) <= limit else text[:limit] + "..."


def dig(doc, *path):
    """doc[path[0]][path[1]]... or None."""
    for key in path:
        if not isinstance(doc, dict) or key not in doc:
            return None
        doc = doc[key]
    return doc


def near(value, want: float, tol: float = 1e-3) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value - want) <= tol


@dataclass
class Msg:
    topic: str
    payload: str

    def json(self):
        try:
            return json.loads(self.payload)
        except ValueError:
            return None


class Mqtt:
    """A recording mosquitto_sub plus mosquitto_pub for publishing."""

    def __init__(self, port: int, piddir: str | None):
        self.port = port
        self.msgs: list[Msg] = []
        self.cond = threading.Condition()
        self.proc = subprocess.Popen(
            ["mosquitto_sub", "-h", HOST, "-p", str(port), "-i", "twinbus-interop-checks",
             "-q", "1", "-F", "%j", "-t", "ci/#"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
            text=True,
        )
        # The pid file lets run.sh's exit trap kill it even if we die without cleaning up.
        self.pidfile = os.path.join(piddir, "mosquitto_sub.checks") if piddir else None
        if self.pidfile:
            with open(self.pidfile, "w") as f:
                f.write(str(self.proc.pid))
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            try:
                m = json.loads(line)
            except ValueError:
                continue
            with self.cond:
                self.msgs.append(Msg(m.get("topic", ""), m.get("payload", "")))
                self.cond.notify_all()

    def close(self):
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.pidfile:  # gone and reaped: its pid may be reused, forget it
            os.unlink(self.pidfile)

    def mark(self) -> int:
        with self.cond:
            return len(self.msgs)

    def publish(self, topic: str, payload: str):
        subprocess.run(
            ["mosquitto_pub", "-h", HOST, "-p", str(self.port), "-q", "1", "-t", topic,
             "-m", payload],
            check=True, timeout=10, stdin=subprocess.DEVNULL,
        )

    def wait(self, pred, since: int, timeout: float) -> Msg | None:
        """First message at index >= since that satisfies pred, waiting up to timeout."""
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

    def wait_subscribed(self, timeout: float = 15.0) -> bool:
        """mosquitto_sub gives no sign that its subscription is active: publish probes
        until one comes back."""
        deadline = time.monotonic() + timeout
        n = 0
        while time.monotonic() < deadline:
            n += 1
            token = f"probe-{os.getpid()}-{n}"
            since = self.mark()
            self.publish("ci/interop/probe", token)
            if self.wait(lambda m: m.payload == token, since, 1.0):
                return True
        return False


class Slave:
    def __init__(self, writes: str, state: str):
        self.writes_path, self.state_path = writes, state

    def writes(self) -> list[dict]:
        with open(self.writes_path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]

    def state(self) -> dict:
        with open(self.state_path, encoding="utf-8") as f:
            return json.load(f)

    def state_when(self, pred, timeout: float = 2.0) -> dict:
        """The snapshot is refreshed right after the slave answers a write: poll briefly."""
        deadline = time.monotonic() + timeout
        while True:
            s = self.state()
            if pred(s) or time.monotonic() > deadline:
                return s
            time.sleep(0.05)


def applied(writes: list[dict]) -> dict[str, object]:
    """What a list of write requests does to the device, location by location."""
    out: dict[str, object] = {}
    for w in writes:
        unit = "" if w.get("unit") == 1 else f"unit {w.get('unit')} "
        fc, a = w.get("fc"), w.get("address", 0)
        if fc in (5, 15):
            for i, v in enumerate(w.get("values", [])):
                out[f"{unit}coil {a + i}"] = v
        elif fc in (6, 16, 23):
            for i, v in enumerate(w.get("values", [])):
                out[f"{unit}holding {a + i}"] = v
        else:
            out[f"{unit}fc {fc} @ {a}"] = w
    return out


class Device:
    def __init__(self, name: str, mqtt: Mqtt, slave: Slave, mask_write: bool = False):
        self.name, self.mqtt, self.slave = name, mqtt, slave
        self.mask_write = mask_write
        self.cmd = f"ci/{name}/cmd"
        self.rsp = f"ci/{name}/rsp"
        self.tel = f"ci/{name}/telemetry"

    def command(self, payload: str, match, settle: float = 0.2):
        """Publish a command, wait for the answer that `match` accepts.
        Returns (answer JSON or None, write requests the slave received meanwhile)."""
        before = len(self.slave.writes())
        since = self.mqtt.mark()
        self.mqtt.publish(self.cmd, payload)

        def pred(m: Msg):
            doc = m.json()
            return m.topic == self.rsp and isinstance(doc, dict) and match(doc)

        msg = self.mqtt.wait(pred, since, ANSWER_TIMEOUT)
        time.sleep(settle)
        return (msg.json() if msg else None), self.slave.writes()[before:]

    def by_id(self, cid: str):
        return lambda doc: doc.get("id") == cid

    def run(self, tel_since: int):
        n = self.name

        def telemetry_ok(m: Msg):
            doc = m.json()
            return (m.topic == self.tel and isinstance(doc, dict) and doc.get("online") is True
                    and near(dig(doc, "deviceData", "temperature"), 21.5))

        m = self.mqtt.wait(telemetry_ok, tel_since, 15.0)
        seen = [x.payload for x in self.mqtt.msgs[tel_since:] if x.topic == self.tel]
        check(f"{n} telemetry online with temperature 21.5", m is not None,
              f"no such document on {self.tel} within 15 s; got {len(seen)}: "
              f"{short(seen[-1]) if seen else '-'}")
        if m:
            doc = m.json()
            check(f"{n} telemetry time is epoch ms", isinstance(doc.get("time"), int)
                  and abs(doc["time"] - time.time() * 1000) < 300_000, f"got {short(doc)}")

        w = self.slave.writes()
        check(f"{n} polling wrote nothing", w == [], f"slave received writes: {short(w)}")

        # c-1: coil write, read back.
        doc, w = self.command('{"id":"c-1","set":{"deviceAttrib":{"motorStatus":"on"}}}',
                              self.by_id("c-1"))
        if check(f"{n} c-1 set motorStatus on: succeeded", doc is not None and
                 doc.get("status") == "succeeded" and
                 dig(doc, "values", "deviceAttrib", "motorStatus") == "on",
                 f"answer {short(doc) if doc else 'none within %ds' % ANSWER_TIMEOUT}"):
            check(f"{n} c-1 answer time is epoch ms", isinstance(doc.get("time"), int)
                  and abs(doc["time"] - time.time() * 1000) < 300_000, f"got {short(doc)}")
        check(f"{n} c-1 wrote coil 0 = 1 and nothing else",
              w != [] and applied(w) == {"coil 0": True}, f"writes {short(w)}")
        s = self.slave.state_when(lambda s: s["coils"]["0"] is True)
        check(f"{n} c-1 slave coil 0 is 1", s["coils"]["0"] is True, f"state {short(s)}")

        # c-2: f32 big-endian across two holding registers.
        doc, w = self.command('{"id":"c-2","set":{"deviceAttrib":{"setpoint":42.5}}}',
                              self.by_id("c-2"))
        after_c2 = self.mqtt.mark()
        check(f"{n} c-2 set setpoint 42.5: succeeded", doc is not None and
              doc.get("status") == "succeeded" and
              near(dig(doc, "values", "deviceAttrib", "setpoint"), 42.5, 1e-6),
              f"answer {short(doc) if doc else 'none'}")
        check(f"{n} c-2 wrote holding 10-11 = 0x422A 0x0000 and nothing else",
              w != [] and applied(w) == {"holding 10": F32_42_5[0], "holding 11": F32_42_5[1]},
              f"writes {short(w)}")
        s = self.slave.state_when(lambda s: s["holding_registers"]["10"] == F32_42_5[0])
        check(f"{n} c-2 slave holding 10-11 hold f32 42.5 (ABCD)",
              [s["holding_registers"]["10"], s["holding_registers"]["11"]] == F32_42_5,
              f"state {short(s)}")

        # c-3: out of range, must be refused before anything reaches the device.
        doc, w = self.command('{"id":"c-3","set":{"deviceAttrib":{"setpoint":500}}}',
                              self.by_id("c-3"), settle=SETTLE)
        errors = doc.get("errors") if doc else None
        check(f"{n} c-3 setpoint 500 (max 80): rejected with reason",
              doc is not None and doc.get("status") == "rejected"
              and isinstance(errors, dict) and bool(errors.get("deviceAttrib.setpoint"))
              and bool(doc.get("error")),
              f"answer {short(doc) if doc else 'none'}")
        check(f"{n} c-3 wrote nothing", w == [], f"writes {short(w)}")
        s = self.slave.state()
        check(f"{n} c-3 slave setpoint still 42.5", s["setpoint_f32"] == 42.5, f"state {short(s)}")

        # c-4: read everything back through the gateway.
        doc, w = self.command('{"id":"c-4","get":"*"}', self.by_id("c-4"))
        want = {
            ("deviceAttrib", "motorStatus"): lambda v: v == "on",
            ("deviceAttrib", "setpoint"): lambda v: near(v, 42.5, 1e-6),
            ("deviceData", "temperature"): lambda v: near(v, 21.5),
            ("deviceData", "running"): lambda v: v is True,
        }
        wrong = [".".join(k) for k, ok in want.items()
                 if not ok(dig(doc, "values", *k) if doc else None)]
        check(f"{n} c-4 get * returns all points",
              doc is not None and doc.get("status") == "succeeded" and not wrong,
              f"wrong/missing {wrong}; answer {short(doc) if doc else 'none'}")
        check(f"{n} c-4 wrote nothing", w == [], f"writes {short(w)}")

        # c-5: one bit of a holding register; the device's other bits must survive.
        doc, w = self.command('{"id":"c-5","set":{"deviceAttrib":{"lamp":true}}}', self.by_id("c-5"))
        check(f"{n} c-5 set lamp (holding 20 bit 3) on: succeeded", doc is not None and
              doc.get("status") == "succeeded" and dig(doc, "values", "deviceAttrib", "lamp") is True,
              f"answer {short(doc) if doc else 'none'}")
        if self.mask_write:
            want = [{"fc": 22, "address": 20, "and_mask": 0xFFF7, "or_mask": 0x0008}]
            got = [{k: x.get(k) for k in ("fc", "address", "and_mask", "or_mask")} for x in w]
            check(f"{n} c-5 one mask write (function 22) of bit 3 and nothing else", got == want,
                  f"writes {short(w)}")
        else:
            check(f"{n} c-5 read-modify-write: holding 20 = 0x00F8 and nothing else",
                  w != [] and applied(w) == {"holding 20": LAMP_WORD | 8}, f"writes {short(w)}")
        s = self.slave.state_when(lambda s: s["holding_registers"]["20"] == LAMP_WORD | 8)
        check(f"{n} c-5 slave holding 20 is 0x00F8 (bit 3 set, the others kept)",
              s["holding_registers"]["20"] == LAMP_WORD | 8, f"state {short(s)}")

        # Not JSON: rejected, and there is no id to echo.
        doc, w = self.command("not json",
                              lambda d: d.get("status") == "rejected" and d.get("id") is None)
        check(f"{n} non-JSON command rejected with error",
              doc is not None and bool(doc.get("error")), f"answer {short(doc) if doc else 'none'}")
        check(f"{n} non-JSON command wrote nothing", w == [], f"writes {short(w)}")

        # Telemetry follows the device: the new setpoint shows up within a few intervals.
        m = self.mqtt.wait(
            lambda m: m.topic == self.tel and isinstance(m.json(), dict)
            and near(dig(m.json(), "deviceAttrib", "setpoint"), 42.5, 1e-6),
            after_c2, 7.0)
        check(f"{n} telemetry shows setpoint 42.5 after c-2", m is not None,
              "no telemetry with deviceAttrib.setpoint 42.5 within 7 s of c-2")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mqtt-port", type=int, required=True)
    ap.add_argument("--device", action="append", default=[], metavar="NAME:WRITES:STATE",
                    help="a gateway device and its slave's evidence files (repeatable)")
    ap.add_argument("--mask-write", action="append", default=[], metavar="NAME",
                    help="a device configured with mask_write: true (repeatable)")
    ap.add_argument("--piddir")
    ap.add_argument("--selftest", action="store_true",
                    help="no gateway: check the MQTT side of this script against the broker")
    args = ap.parse_args()

    # On SIGTERM (run.sh stopping us), unwind through `finally` to stop and reap mosquitto_sub.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    mqtt = Mqtt(args.mqtt_port, args.piddir)
    try:
        if not check("checks subscribed to ci/# on mosquitto", mqtt.wait_subscribed(),
                     "own probe message never came back"):
            return 1
        if args.selftest:
            # Play the gateway's part by hand: an answer published on a response topic must
            # be found by id, and one that does not match must not be.
            since = mqtt.mark()
            mqtt.publish("ci/selftest/rsp", '{"id":"other","status":"succeeded"}')
            mqtt.publish("ci/selftest/rsp", '{"id":"s-1","status":"succeeded","values":{}}')
            m = mqtt.wait(lambda m: m.topic == "ci/selftest/rsp" and (m.json() or {}).get("id") == "s-1",
                          since, 5.0)
            check("checks match an MQTT answer by id", m is not None and m.json()["status"] == "succeeded",
                  f"got {m}")
            m = mqtt.wait(lambda m: (m.json() or {}).get("id") == "never", since, 0.5)
            check("checks time out on a missing answer", m is None, f"got {m}")
        # Telemetry is recorded from the start; each device looks at all of it.
        for spec in args.device:
            name, writes, state = spec.split(":", 2)
            Device(name, mqtt, Slave(writes, state), mask_write=name in args.mask_write).run(tel_since=0)
    finally:
        mqtt.close()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
