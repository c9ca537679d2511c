#!/usr/bin/env python3
"""Fault tests of issue 7 ("Reliability I"), run by tests/interop/faults.sh.

Every test drives the release binary with faults from the outside and judges it only by
what independent peers saw:
  the cloud   paho-mqtt clients (QoS 1), which record every answer and telemetry document;
  the device  the pymodbus slave (slave.py), whose write log is the record of executions:
              every command writes a value of its own, so a second execution is visible;
  the wire    where a test needs it, a relay between the gateway and the broker that parses
              MQTT packets (faultkit.Relay): it sees what the gateway published, what the
              broker acknowledged, and can drop PUBLISH packets.

Subcommands, one per test (see each function's docstring for what "pass" means):
  flood     10,000 `set` commands as fast as possible: every id answered exactly once
  poison    a 2 MiB command, then 40 more: they are answered, at most one reconnect
  broker    Mosquitto killed with SIGKILL 10 times during telemetry and commands
  gateway   the gateway killed with SIGKILL 5 times during a command stream
  flaky     PUBLISH packets dropped for 12 s in both directions, then the link heals
  sigterm   SIGTERM with 20 dead devices and commands in flight; SIGHUP; a second SIGTERM

Each prints `ok   NAME` / `FAIL NAME: WHY` lines, indented detail lines, and one
`     MEASURED ...` line that faults.sh repeats in its summary; exit status 1 if a check
failed. Every process a test starts gets a pid file in --piddir (faults.sh's exit trap stops
what is listed there) and is stopped by its pid. Waits end on a positive signal (a log line,
a message, a packet, a write record), each bounded in time.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import re
import signal
import sys
import time

import faultkit
from faultkit import (CONNECTED, Blackhole, Cloud, Log, Proc, Relay, Stream, Writes, answers_report, check,
                      detail, epoch_ms, gateway, kinds_text, measured, payload_json, short, status_of, tcp_open,
                      telemetry_report, until)


# ---------------------------------------------------------------------------------------
# 1. Flood


def cmd_flood(a) -> None:
    """10,000 `set` commands, as fast as paho publishes them, each writing its own value.
    Pass: every id answered exactly once (succeeded, failed or rejected, `busy` included);
    no value written twice; no value written for a command answered `rejected`; every
    `succeeded` backed by its write at the slave."""
    name = a.label
    cmd, rsp = f"faults/{a.name}/cmd", f"faults/{a.name}/rsp"
    gw = gateway(a, f"gw-{a.name}")
    cloud = None
    try:
        gw.start()
        cloud = Cloud(a.port, f"faults-cloud-{a.name}", [rsp])
        if not cloud.wait_subscribed() or not cloud.probe(cmd, "probe"):
            check(f"{name}: gateway answers before the flood", False, "no answer to `get *` within 30 s")
            return
        writes = Writes(a.writes)
        ids = [f"f-{i}" for i in range(a.count)]
        t0 = time.monotonic()
        for i, cid in enumerate(ids):
            cloud.send(cmd, {"id": cid, "set": {"deviceAttrib": {"value": i}}})
        # Every id answered, or no new answer for 20 s (then something was lost).
        last_n, last_change = -1, time.monotonic()
        while True:
            n = cloud.answered(ids)
            if n == len(ids):
                break
            if n != last_n:
                last_n, last_change = n, time.monotonic()
            elif time.monotonic() - last_change > 20 or time.monotonic() - t0 > a.timeout:
                break
            time.sleep(0.1)
        with cloud.cond:
            firsts = [cloud.answers[i][0][0] for i in ids if cloud.answers.get(i)]
        drain = (max(firsts) - t0) if firsts else float("nan")
        # Late duplicates: anything that still comes within 1 s of the last answer.
        time.sleep(1.0)
        with cloud.cond:
            got = {i: list(cloud.answers.get(i, [])) for i in ids}
            acked_at = [cloud.acked[cloud.sent[i][0][1]] for i in ids if cloud.sent[i][0][1] in cloud.acked]
        acked = len(acked_at)
        t_pub = (max(acked_at) - t0) if acked_at else float("nan")
        answered = sum(1 for v in got.values() if v)
        lost = [i for i, v in got.items() if not v]
        dups = sum(len(v) - 1 for v in got.values() if len(v) > 1)
        kinds = collections.Counter(status_of(v[0][1]) for v in got.values() if v)
        written = writes.values(a.address)
        twice = sorted(v for v, n in written.items() if n > 1)
        value = {cid: i for i, cid in enumerate(ids)}
        refused_written = [i for i, v in got.items() if v and v[0][1].get("status") == "rejected" and written[value[i]]]
        ok_unwritten = [i for i, v in got.items() if v and v[0][1].get("status") == "succeeded" and not written[value[i]]]
        check(f"{name}: every one of {a.count} ids answered", not lost,
              f"{len(lost)} never answered (the broker acknowledged {acked} of {a.count} commands), "
              f"e.g. {lost[:5]}")
        check(f"{name}: no id answered twice", dups == 0, f"{dups} extra answers")
        check(f"{name}: no command executed twice (slave's write log)", not twice,
              f"{len(twice)} values written more than once, e.g. {twice[:5]}")
        check(f"{name}: a `rejected` command (busy included) wrote nothing", not refused_written,
              f"{len(refused_written)} written, e.g. {refused_written[:5]}")
        check(f"{name}: every `succeeded` has its write at the slave", not ok_unwritten,
              f"{len(ok_unwritten)} without a write, e.g. {ok_unwritten[:5]}")
        detail(f"answers: {dict(kinds)}; writes at the slave: {sum(written.values())}")
        measured(f"{name}: sent {a.count}, answered {answered} ({', '.join(f'{k} {v}' for k, v in sorted(kinds.items()))}), "
                 f"lost {len(lost)}, duplicated {dups}, executed twice {len(twice)}; drain {drain:.2f} s "
                 f"(first publish -> last answer; the broker had acknowledged {acked} commands {t_pub:.2f} s after the first)")
    finally:
        if cloud:
            cloud.close()
        rc = gw.stop()
        check(f"{name}: gateway exits 0 on SIGTERM after the flood", rc == 0, f"exit status {rc}")


# ---------------------------------------------------------------------------------------
# 2. Poison


def cmd_poison(a) -> None:
    """A 2 MiB command (Mosquitto forwards it: no message_size_limit), then 40 `set`
    commands 25 ms apart. Pass: at least 38 of the 40 answered within 10 s of being sent;
    at most one reconnect of the gateway (its "MQTT connected" lines); the 2 MiB command
    itself answered once, `rejected` for its size."""
    name = a.label
    cmd, rsp = f"faults/{a.name}/cmd", f"faults/{a.name}/rsp"
    gw = gateway(a, f"gw-{a.name}")
    log = Log(gw.log)
    cloud = None
    try:
        gw.start()
        cloud = Cloud(a.port, f"faults-cloud-{a.name}", [rsp])
        if not cloud.wait_subscribed() or not cloud.probe(cmd, "probe"):
            check(f"{name}: gateway answers before the poison", False, "no answer to `get *` within 30 s")
            return
        before = len(log.lines(CONNECTED))
        mark = log.mark()
        head = json.dumps({"id": "poison", "set": {"deviceAttrib": {"value": 1}}})[:-1]
        pad = 2 * 1024 * 1024 - len(head) - len(',"pad":""}')
        poison = (head + ',"pad":"' + "x" * pad + '"}').encode()
        info = cloud.send(cmd, {"id": "poison"}, payload=poison)
        info.wait_for_publish(10)
        ids = [f"p-{i}" for i in range(40)]
        sent_at = {}
        for i, cid in enumerate(ids):
            sent_at[cid] = time.monotonic()
            cloud.send(cmd, {"id": cid, "set": {"deviceAttrib": {"value": 100 + i}}})
            time.sleep(0.025)
        cloud.wait_answered(ids, 10)
        with cloud.cond:
            got = {i: list(cloud.answers.get(i, [])) for i in ids}
            oversized = [d for k in ("poison", None) for _, d in cloud.answers.get(k, [])]
        in_time = [i for i, v in got.items() if v and v[0][0] - sent_at[i] <= 10]
        answered = sum(1 for v in got.values() if v)
        dups = sum(len(v) - 1 for v in got.values() if len(v) > 1)
        reconnects = len(log.lines(CONNECTED)) - before
        lost_lines = log.lines(r"MQTT connection lost", mark)
        too_large = [d for d in oversized if d.get("status") == "rejected"
                     and re.search(r"bytes|limit|large|size", str(d.get("error", "")), re.I)]
        check(f"{name}: >= 38 of 40 commands sent after it answered within 10 s", len(in_time) >= 38,
              f"{len(in_time)} answered in time ({answered} at all)")
        check(f"{name}: at most one reconnect", reconnects <= 1,
              f"{reconnects} reconnects (\"MQTT connected\" lines after the poison); "
              f"first loss: {short(lost_lines[0], 300) if lost_lines else 'none logged'}")
        check(f"{name}: the 2 MiB command answered once, rejected as too large", len(too_large) == 1 and len(oversized) == 1,
              f"{len(oversized)} answer(s) to it: {short(oversized, 300) if oversized else 'none'}")
        if lost_lines:
            detail(f"gateway: {short(lost_lines[0], 400)}")
        measured(f"{name}: sent 40 after a 2 MiB command, answered {answered} ({len(in_time)} within 10 s), "
                 f"lost {40 - answered}, duplicated {dups}; reconnects {reconnects}; "
                 f"answers to the 2 MiB command {len(oversized)} ({len(too_large)} rejected as too large)")
    finally:
        if cloud:
            cloud.close()
        rc = gw.stop()
        check(f"{name}: gateway exits 0 on SIGTERM", rc == 0, f"exit status {rc}")


# ---------------------------------------------------------------------------------------
# 3. Mosquitto killed with SIGKILL, 10 times


def cmd_broker(a) -> None:
    """Mosquitto (persistence, saved after every change) is killed with SIGKILL 10 times,
    down 0.5 s each time, while the device's telemetry (poll = telemetry_interval) and a
    command stream (one `set` every 100 ms, resent after 3 s unanswered) flow. The gateway
    reaches Mosquitto through the relay, which records what it published and what Mosquitto
    acknowledged; the gateway and the cloud have persistent sessions (clean_session false).
    Pass (the gateway's part): telemetry: 0 lost and 0 duplicated by the gateway beyond the
    resend of messages in flight at a kill (see telemetry_report for the attribution);
    commands: every id answered, none executed twice. What Mosquitto acknowledged and then
    lost in its own crash is measured and reported separately: no client can avoid it."""
    name = a.label
    cmd, rsp, tel = f"faults/{a.name}/cmd", f"faults/{a.name}/rsp", f"faults/{a.name}/telemetry"
    broker = Proc("mosquitto-broker-kill", [a.mosquitto, "-c", a.mosquitto_conf], os.path.join(a.work, "mosquitto-kill.log"), a.piddir)
    relay = gw = cloud = stream = None
    try:
        broker.start()
        if not until(lambda: tcp_open(a.port), 10):
            check(f"{name}: Mosquitto listening", False, "not within 10 s")
            return
        relay = Relay(a.relay_port, a.port)
        gw = gateway(a, f"gw-{a.name}").start()
        cloud = Cloud(a.port, f"faults-cloud-{a.name}", [rsp, tel], clean=False)
        if not cloud.wait_subscribed() or not cloud.probe(cmd, "probe"):
            check(f"{name}: gateway answers before the first kill", False, "no answer to `get *` within 30 s")
            return
        writes = Writes(a.writes)
        t_from = epoch_ms()
        stream = Stream(cloud, cmd, "b", 0, 0.1, 3.0)
        outages, down_ms = [], []
        rng = random.Random(7)
        for k in range(a.kills):
            # Traffic flows for a while, then the kill.
            time.sleep(rng.uniform(1.0, 2.0))
            sessions, connects = relay.sessions(), cloud.connects
            broker.kill9()
            t_kill, kill_ms = time.monotonic(), epoch_ms()
            time.sleep(0.5)  # the outage itself (part of the fault, not a wait for a condition)
            broker.start()
            up = until(lambda: tcp_open(a.port), 10)
            back = up and relay.wait_sessions(sessions + 1, 15) and until(lambda: cloud.connects > connects, 15)
            outages.append(time.monotonic() - t_kill)
            down_ms.append((kill_ms, epoch_ms()))
            if not back:
                check(f"{name}: gateway and cloud reconnect after kill {k + 1}", False,
                      f"Mosquitto listening: {up}, gateway sessions {relay.sessions()} (want {sessions + 1}), "
                      f"cloud connects {cloud.connects} (want {connects + 1})")
                return
        time.sleep(1.0)
        stream.stop_new()
        t_to = epoch_ms()
        # Every id answered (the cloud keeps resending), and the telemetry up to t_to received.
        until(lambda: not stream.unanswered(), 30)
        with cloud.cond:
            cloud.cond.wait_for(lambda: any(d.get("time", 0) > t_to for _, tp, d in cloud.telemetry if tp == tel), 15)
        stream.stop()
        s = stream.summary(writes, a.address)
        t = telemetry_report(cloud, relay, tel, a.poll, t_from, t_to)
        with cloud.cond:
            read_down = [d["time"] for _, tp, d in cloud.telemetry
                         if tp == tel and any(x <= d.get("time", 0) <= y for x, y in down_ms)]
        # Commands: what needed a resend, and why (the broker or the gateway).
        with relay.lock:
            delivered = {(payload_json(r) or {}).get("id") for r in relay.down if r["topic"] == cmd and not r["dropped"]}
            acked_answers = {(payload_json(r) or {}).get("id") for r in relay.up if r["topic"] == rsp and r["acked"]}
        with cloud.cond:
            first_acked = {c for c in stream.resent_ids if cloud.sent[c][0][1] in cloud.acked}
        broker_lost_cmds = sum(1 for c in stream.resent_ids if c in first_acked and c not in delivered)
        broker_lost_answers = sum(1 for c in stream.resent_ids if c in acked_answers)
        ad = answers_report(cloud, relay, cmd, rsp, stream.ids)
        check(f"{name}: telemetry: no document lost by the gateway", t["gateway_lost"] == 0,
              f"{t['gateway_lost']} lost by the gateway ({t['never_sent']} never published, {t['gateway_unresent']} "
              f"published, unacknowledged and never resent); gaps {t['gaps'][:5]}")
        check(f"{name}: telemetry: no document duplicated by the gateway beyond the resend of those in flight at a kill",
              t["gateway_dup"] == 0, f"{t['gateway_dup']} published again after Mosquitto had acknowledged them")
        check(f"{name}: commands: every id answered", not s["lost"],
              f"{len(s['lost'])} of {s['sent']} never answered, e.g. {s['lost'][:5]}")
        check(f"{name}: commands: none executed twice (slave's write log)", not s["twice"],
              f"{len(s['twice'])} executed twice, e.g. {s['twice'][:5]}")
        check(f"{name}: commands: no answer duplicated by the gateway beyond the resend of those in flight at a kill "
              f"or a repeated command", ad["gateway"] == 0,
              f"{ad['gateway']} answers published again after Mosquitto had acknowledged them, with no new copy of "
              f"the command in between")
        check(f"{name}: commands: repeated answers equal the first", not s["conflicting"],
              f"{len(s['conflicting'])} ids with different answers, e.g. {s['conflicting'][:3]}")
        detail(f"telemetry: {t['received']} received ({t['distinct']} distinct times); the gateway published "
               f"{t['sent_distinct']} documents in {t['published']} PUBLISH packets ({t['resent']} resent); lost {t['lost']} (Mosquitto's {t['broker_lost']}, the gateway's "
               f"{t['gateway_lost']}); duplicated {t['duplicated']} (in flight at a kill {t['in_flight_dup']}, "
               f"Mosquitto's redelivery {t['broker_dup']}, the gateway's {t['gateway_dup']})")
        detail(f"commands: {s['sent']} ids, {s['sends']} sends ({s['sends'] - s['sent']} resends after 3 s); answers "
               f"{kinds_text(s['kinds'])}; resent ids whose first copy Mosquitto acknowledged and never delivered "
               f"{broker_lost_cmds}, whose answer Mosquitto acknowledged and never delivered {broker_lost_answers}")
        detail(f"answers received more than once: {ad['duplicated']} extra (the command came again {ad['repeat']}, in "
               f"flight at a kill {ad['in_flight']}, Mosquitto's redelivery {ad['broker']}, the gateway's {ad['gateway']})")
        detail(f"{len(read_down)} telemetry documents were read while the gateway had no broker (kill -> "
               f"reconnected) and delivered after it came back")
        detail(f"outages (kill -> both reconnected): {', '.join(f'{x:.1f}' for x in outages)} s; "
               f"gateway sessions {relay.sessions()}, relay refused {relay.refused} attempts while Mosquitto was down")
        if t["broker_lost"] or t["broker_dup"] or broker_lost_cmds or broker_lost_answers or ad["broker"]:
            detail("Mosquitto's own losses (it acknowledged, then lost the message in its crash before its next "
                   "save) are not the gateway's: no client can recover a message the broker acknowledged")
        measured(f"{name}: {a.kills} kills; telemetry sent {t['sent_distinct']} ({t['resent']} resent), received "
                 f"{t['received']}, lost {t['lost']} "
                 f"(gateway {t['gateway_lost']}, Mosquitto {t['broker_lost']}), duplicated {t['duplicated']} "
                 f"(gateway {t['gateway_dup']}, in flight {t['in_flight_dup']}, Mosquitto {t['broker_dup']}); "
                 f"commands sent {s['sent']} (+{s['sends'] - s['sent']} resends), answered {s['answered']}, "
                 f"lost {len(s['lost'])}, duplicated answers {s['dup_answers']} (gateway {ad['gateway']}, in flight "
                 f"{ad['in_flight']}, repeated command {ad['repeat']}, Mosquitto {ad['broker']}), executed twice "
                 f"{len(s['twice'])}")
    finally:
        if stream:
            stream.stop()
        if cloud:
            cloud.close()
        if gw:
            rc = gw.stop()
            check(f"{name}: gateway exits 0 on SIGTERM", rc == 0, f"exit status {rc}")
        if relay:
            relay.close()
        broker.stop()


# ---------------------------------------------------------------------------------------
# 4. The gateway killed with SIGKILL, 5 times


def cmd_gateway(a) -> None:
    """The gateway is killed with SIGKILL 5 times during a command stream (one `set`
    every 50 ms, each with its own value; unanswered ids resent after 2 s with the same id),
    and started again at once with the same config and state_dir. Odd kills come at a random
    moment; even ones the moment the slave records a write, so that the gateway is caught
    between a command's write and its answer. Pass: no command executed twice (the slave's
    write log), and every id answered in the end (an `interrupted` failure is an answer)."""
    name = a.label
    cmd, rsp = f"faults/{a.name}/cmd", f"faults/{a.name}/rsp"
    relay = Relay(a.relay_port, a.port)  # passive: it only tells what reached the gateway
    gw = gateway(a, f"gw-{a.name}")
    log = Log(gw.log)
    cloud = stream = None
    try:
        gw.start()
        cloud = Cloud(a.port, f"faults-cloud-{a.name}", [rsp])
        if not cloud.wait_subscribed() or not cloud.probe(cmd, "probe"):
            check(f"{name}: gateway answers before the first kill", False, "no answer to `get *` within 30 s")
            return
        writes = Writes(a.writes)
        stream = Stream(cloud, cmd, "g", 0, 0.05, 2.0)
        rng = random.Random(11)
        downtime = []
        for k in range(a.kills):
            time.sleep(rng.uniform(1.0, 2.5))
            if k % 2:
                n = writes.count()
                until(lambda: writes.count() > n, 5, step=0.001)
            gw.kill9()
            t_kill = time.monotonic()
            mark = log.mark()
            gw.start()
            if not log.wait(CONNECTED, mark, 20, gw):
                check(f"{name}: gateway connected again after kill {k + 1}", False,
                      "no \"MQTT connected\" within 20 s" + ("" if gw.alive() else f" (it exited: {gw.wait(0)})"))
                return
            downtime.append(time.monotonic() - t_kill)
        time.sleep(1.0)
        stream.stop_new()
        until(lambda: not stream.unanswered(), 30)
        stream.stop()
        time.sleep(0.5)  # a settle time for the count: repeats of the last answers, if any
        s = stream.summary(writes, a.address)
        interrupted = log.lines(r"a command was cut off when the gateway stopped")
        # Resent ids the gateway had received (and acknowledged) before a kill: it lost them.
        with relay.lock:
            reached = collections.defaultdict(list)
            for r in relay.down:
                if r["topic"] == cmd:
                    reached[(payload_json(r) or {}).get("id")].append(r["t"])
        with cloud.cond:
            lost_in_kill = [c for c in stream.resent_ids if any(t < cloud.sent[c][1][0] for t in reached.get(c, []))]
        check(f"{name}: no command executed twice (slave's write log)", not s["twice"],
              f"{len(s['twice'])} executed twice, e.g. {s['twice'][:5]}")
        check(f"{name}: every id answered in the end", not s["lost"],
              f"{len(s['lost'])} of {s['sent']} never answered, e.g. {s['lost'][:5]}")
        check(f"{name}: repeated answers equal the first", not s["conflicting"],
              f"{len(s['conflicting'])} ids with different answers, e.g. {s['conflicting'][:3]}")
        detail(f"answers: {kinds_text(s['kinds'])}; the gateway logged {len(interrupted)} command(s) cut off by a kill; "
               f"restart to connected: {', '.join(f'{x:.2f}' for x in downtime)} s")
        if stream.resent_ids:
            detail(f"{len(stream.resent_ids)} id(s) needed the cloud's resend; {len(lost_in_kill)} of them had reached "
                   f"the gateway before a kill, which acknowledged them to the broker on receipt and lost them while "
                   f"they waited for the device (only a command being executed is in the store)")
        detail(f"answers received more than once: {s['dup_answers']} extra, each a repeat of the first (an answer "
               f"sent before a kill whose acknowledgement the kill kept from the store goes out again, and a resent "
               f"id is answered again)")
        measured(f"{name}: {a.kills} kills; sent {s['sent']} (+{s['sends'] - s['sent']} resends), answered {s['answered']} "
                 f"({kinds_text(s['kinds'])}), lost {len(s['lost'])}, duplicated answers {s['dup_answers']}, "
                 f"executed twice {len(s['twice'])}")
    finally:
        if stream:
            stream.stop()
        if cloud:
            cloud.close()
        rc = gw.stop()
        check(f"{name}: gateway exits 0 on SIGTERM", rc == 0, f"exit status {rc}")
        relay.close()


# ---------------------------------------------------------------------------------------
# 5. Flaky link


def cmd_flaky(a) -> None:
    """The relay drops every PUBLISH, both ways, for 12 s while control packets pass
    (keep-alive 5 s: PINGREQ/PINGRESP still flow), then heals and resets the connection that
    lost packets (see Relay.heal). Telemetry (poll = telemetry_interval) and a command stream
    (one `set` every 200 ms, never resent: a loss must show) flow throughout; the gateway has
    a persistent session, so Mosquitto keeps the commands it could not deliver.
    Pass: no telemetry lost or duplicated by the gateway over the whole run; the documents
    read during the window arrive after it; every command answered, those sent during the
    window after it; none executed twice."""
    name = a.label
    cmd, rsp, tel = f"faults/{a.name}/cmd", f"faults/{a.name}/rsp", f"faults/{a.name}/telemetry"
    relay = Relay(a.relay_port, a.port)
    gw = gateway(a, f"gw-{a.name}")
    log = Log(gw.log)
    cloud = stream = None
    try:
        gw.start()
        cloud = Cloud(a.port, f"faults-cloud-{a.name}", [rsp, tel])
        if not cloud.wait_subscribed() or not cloud.probe(cmd, "probe"):
            check(f"{name}: gateway answers before the window", False, "no answer to `get *` within 30 s")
            return
        writes = Writes(a.writes)
        t_from = epoch_ms()
        stream = Stream(cloud, cmd, "k", 0, 0.2, 0)
        time.sleep(3.0)  # normal traffic before the fault
        sessions = relay.sessions()
        w_start_ms = epoch_ms()
        w_start = time.monotonic()
        heal = relay.drop(a.window)
        in_window = len(stream.ids)
        until(lambda: time.monotonic() >= heal, a.window + 1)
        w_end_ms = epoch_ms()
        window_ids = stream.ids[in_window:len(stream.ids)]
        reconnected = relay.wait_sessions(sessions + 1, 30)
        t_back = time.monotonic() - heal
        time.sleep(3.0)  # normal traffic after the fault
        stream.stop_new()
        t_to = epoch_ms()
        until(lambda: not stream.unanswered(), 20)
        with cloud.cond:
            cloud.cond.wait_for(lambda: any(d.get("time", 0) > t_to for _, tp, d in cloud.telemetry if tp == tel), 10)
        stream.stop()
        s = stream.summary(writes, a.address)
        t = telemetry_report(cloud, relay, tel, a.poll, t_from, t_to)
        with cloud.cond:
            during = [(rt, d) for rt, tp, d in cloud.telemetry if tp == tel and w_start_ms < d.get("time", 0) < w_end_ms]
            late_answers = [c for c in window_ids if cloud.answers.get(c) and cloud.answers[c][0][0] >= heal]
            early_answers = [c for c in window_ids if cloud.answers.get(c) and cloud.answers[c][0][0] < heal]
        during_late = [d for rt, d in during if rt >= heal]
        with relay.lock:
            dropped_up = sum(1 for r in relay.up if r["dropped"])
            dropped_down = sum(1 for r in relay.down if r["dropped"])
            dup_flag_up = sum(1 for r in relay.up if r["dup"])
            dup_flag_down = sum(1 for r in relay.down if r["dup"])
            conns = [(c.n, round(c.opened - w_start, 1), c.closed_by) for c in relay.conns]
        reconnects = len(log.lines(CONNECTED)) - 1
        expected_during = int(a.window / a.poll) - 2
        check(f"{name}: the gateway reconnected after the link healed", reconnected,
              f"no new session within 30 s of the heal (relay connections: {conns})")
        check(f"{name}: telemetry: no document lost by the gateway", t["gateway_lost"] == 0 and t["lost"] == t["broker_lost"],
              f"lost {t['lost']} ({t['never_sent']} never published, {t['gateway_unresent']} published and never "
              f"resent after the drop); gaps {t['gaps'][:5]}")
        check(f"{name}: telemetry: no document duplicated by the gateway", t["gateway_dup"] == 0,
              f"{t['gateway_dup']} published again after Mosquitto had acknowledged them")
        check(f"{name}: telemetry read during the window arrives after it",
              len(during) >= expected_during and len(during_late) == len(during),
              f"{len(during)} documents with a time inside the window (want >= {expected_during}), "
              f"{len(during_late)} of them received after the heal")
        check(f"{name}: every command answered (none resent by the cloud)", not s["lost"],
              f"{len(s['lost'])} of {s['sent']} never answered, e.g. {s['lost'][:5]}")
        check(f"{name}: commands sent during the window answered after it", len(late_answers) == len(window_ids),
              f"{len(window_ids)} sent during the window: {len(late_answers)} answered after the heal, "
              f"{len(early_answers)} before it (through a link that drops every PUBLISH?)")
        check(f"{name}: no command executed twice (slave's write log)", not s["twice"],
              f"{len(s['twice'])} executed twice, e.g. {s['twice'][:5]}")
        detail(f"relay: dropped {dropped_up} PUBLISH from the gateway and {dropped_down} to it, passed "
               f"{dict(relay.passed)} during the window; reset {relay.resets} "
               f"connection(s) at the heal; connections (n, opened s after the window started, closed by): {conns}")
        detail(f"gateway: reconnects {reconnects}, new session {t_back:.2f} s after the heal; PUBLISH with DUP from the "
               f"gateway {dup_flag_up}, from Mosquitto {dup_flag_down}; telemetry: {t['sent_distinct']} documents in "
               f"{t['published']} PUBLISH packets ({t['resent']} resent); {len(during)} documents read during the window, {len(during_late)} received "
               f"after it")
        measured(f"{name}: {a.window:.0f} s window; telemetry sent {t['sent_distinct']} ({t['resent']} resent), received "
                 f"{t['received']}, lost {t['lost']}, duplicated {t['duplicated']}; commands sent {s['sent']} "
                 f"({len(window_ids)} in the window), answered {s['answered']}, lost {len(s['lost'])}, duplicated "
                 f"answers {s['dup_answers']}, executed twice {len(s['twice'])}; reconnects {reconnects} "
                 f"({relay.resets} reset by the relay at the heal)")
    finally:
        if stream:
            stream.stop()
        if cloud:
            cloud.close()
        rc = gw.stop()
        check(f"{name}: gateway exits 0 on SIGTERM", rc == 0, f"exit status {rc}")
        relay.close()


# ---------------------------------------------------------------------------------------
# 6. SIGTERM with 20 dead devices


def cmd_sigterm(a) -> None:
    """20 devices on a TCP line whose far end accepts and never answers (timeout 1 s,
    retries 2), one live device on the slave, shutdown_timeout 10 s.
    Run 1: SIGHUP is logged, the gateway keeps running and answers the live device; then
    `set` commands to 5 dead devices (3 more queued behind one of them), and SIGTERM once the
    line has seen a write. Pass: exit 0 within the 10 s deadline; every command sent before
    SIGTERM answered exactly once, before the exit or, for one the stop cut off, `interrupted`
    at the next start (run 2).
    Run 2: commands in flight again, SIGTERM, and a second SIGTERM once the drain has
    started (its log line). Pass: exit status 130 within 1 s of the second signal."""
    name = a.label
    hole = Blackhole(a.dead_port)
    live_cmd, live_rsp = "faults/sigterm/live/cmd", "faults/sigterm/live/rsp"
    dead_rsp = [f"faults/sigterm/dead-{i}/rsp" for i in range(1, 21)]
    gw = gateway(a, f"gw-{a.name}")
    log = Log(gw.log)
    cloud = None
    try:
        cloud = Cloud(a.port, f"faults-cloud-{a.name}", [live_rsp, *dead_rsp])
        if not cloud.wait_subscribed():
            check(f"{name}: cloud subscribed", False, "no SUBACK within 15 s")
            return
        gw.start()
        if not cloud.probe(live_cmd, "probe"):
            check(f"{name}: gateway answers the live device", False, "no answer to `get *` within 30 s")
            return
        # SIGHUP: logged, ignored, still answering.
        mark = log.mark()
        gw.signal(signal.SIGHUP)
        hup = log.wait(r"SIGHUP", mark, 5, gw)
        check(f"{name}: SIGHUP is logged", hup is not None, "no log line naming SIGHUP within 5 s")
        answers_after = cloud.probe(live_cmd, "after-hup", 10)
        check(f"{name}: after SIGHUP the gateway keeps running and answering", gw.alive() and answers_after,
              f"running: {gw.alive()}, live device answered: {answers_after}")

        def in_flight(prefix: str) -> list[tuple[str, str]]:
            """Commands to 5 dead devices, 3 more queued behind the first, once one of them is
            on the line: a device actor takes a command only between its polls, and on a
            line where every poll takes 3 s (20 devices: a minute a round) the device whose
            poll is on the wire now is the one that takes its command next. Returns once
            that command's write reached the line (or after 10 s)."""
            until(lambda: hole.unit_on_the_line() > 0, 10)
            first = hole.unit_on_the_line() or 1
            devices = [first] + [i for i in range(1, 21) if i != first][:4]
            sent = [(f"{prefix}-{i}", f"faults/sigterm/dead-{i}/cmd") for i in devices]
            sent += [(f"{prefix}-{first}q{j}", f"faults/sigterm/dead-{first}/cmd") for j in range(3)]
            before = hole.writes()
            for n, (cid, topic) in enumerate(sent):
                cloud.send(topic, {"id": cid, "set": {"deviceAttrib": {"value": n + 1}}})
            until(lambda: hole.writes() > before, 10)
            return sent

        before = hole.writes()
        sent = in_flight("t1")
        reached = hole.writes() - before
        check(f"{name}: a command is on the dead line at SIGTERM (its write request reached the line)", reached > 0,
              "no write request within 10 s of the commands")
        mark = log.mark()
        t0 = time.monotonic()
        gw.signal(signal.SIGTERM)
        rc = gw.wait(a.deadline + 10)
        took = time.monotonic() - t0
        if rc is None:
            gw.kill9()
        ids = [cid for cid, _ in sent]
        cloud.wait_answered(ids, 2)  # answers published during the drain, on their way
        with cloud.cond:
            before_exit = {c: len(cloud.answers.get(c, [])) for c in ids}
        aborted = log.lines(r"aborted|abandoned", mark)
        check(f"{name}: SIGTERM with 20 dead devices and {len(ids)} commands in flight: exit 0 within "
              f"{a.deadline:.0f} s", rc == 0 and took <= a.deadline,
              f"exit status {rc} after {took:.2f} s")
        if aborted:
            detail(f"gateway: {short(aborted[-1], 400)}")
        # Run 2: the commands the stop cut off are answered `interrupted` at the start.
        mark = log.mark()
        gw.start()
        connected = log.wait(CONNECTED, mark, 20, gw) is not None
        cloud.wait_answered(ids, 10)
        with cloud.cond:
            final = {c: [d for _, d in cloud.answers.get(c, [])] for c in ids}
        never = [c for c, v in final.items() if not v]
        twice = [c for c, v in final.items() if len(v) > 1]
        kinds = collections.Counter(status_of(v[0]) for v in final.values() if v)
        after = sum(len(v) for v in final.values()) - sum(before_exit.values())
        check(f"{name}: every command in flight at SIGTERM answered exactly once (before the exit, or at the next start)",
              connected and not never and not twice,
              f"connected again: {connected}; {len(never)} never answered {never}; {len(twice)} answered twice {twice}")
        with cloud.cond:
            said = collections.Counter(f"{d.get('status')}: {str(d.get('error', ''))[:60]}" for c in ids
                                       for _, d in cloud.answers.get(c, [])[:1])
        detail(f"answers: {dict(said)}")
        detail(f"commands: {len(ids)} sent, {sum(1 for n in before_exit.values() if n)} answered before the exit, "
               f"{after} at the next start; {kinds_text(kinds)}; the dead line saw {reached} write request(s) "
               f"before SIGTERM")
        # Run 2 continued: a second SIGTERM during the drain.
        in_flight("t2")
        mark = log.mark()
        gw.signal(signal.SIGTERM)
        draining = log.wait(r"shutting down", mark, 5, gw) is not None
        t1 = time.monotonic()
        gw.signal(signal.SIGTERM)
        rc2 = gw.wait(a.deadline + 5)
        took2 = time.monotonic() - t1
        if rc2 is None:
            gw.kill9()
        check(f"{name}: a second SIGTERM during the drain exits at once with 130",
              draining and rc2 == 130 and took2 <= 1.0,
              f"drain started (log): {draining}; exit status {rc2} {took2:.2f} s after the second signal")
        measured(f"{name}: 20 dead devices, {len(ids)} commands in flight: SIGTERM -> exit {rc} in {took:.2f} s "
                 f"(deadline {a.deadline:.0f} s); answered {len(ids) - len(never)} of {len(ids)} "
                 f"({sum(1 for n in before_exit.values() if n)} before the exit), lost {len(never)}, duplicated "
                 f"{len(twice)}; second SIGTERM -> exit {rc2} in {took2:.2f} s")
    finally:
        if cloud:
            cloud.close()
        gw.stop()
        hole.close()


# ---------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--piddir", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--twinbus", required=True)
    ap.add_argument("--writes", required=True, help="the slave's write log")
    sp = ap.add_subparsers(dest="sub", required=True)

    def test(sub: str, **extra) -> argparse.ArgumentParser:
        p = sp.add_parser(sub)
        p.add_argument("name", help="the test's name: topics faults/NAME/..., log gw-NAME.log")
        p.add_argument("label", help="prefix of its check names")
        p.add_argument("--config", required=True)
        p.add_argument("--port", type=int, required=True, help="the broker the cloud uses")
        p.add_argument("--address", type=int, default=0, help="holding register of deviceAttrib.value")
        p.add_argument("--poll", type=float, default=0.5, help="poll = telemetry_interval, s")
        for k, v in extra.items():
            p.add_argument(f"--{k.replace('_', '-')}", **v)
        return p

    test("flood", count={"type": int, "default": 10_000}, timeout={"type": float, "default": 120})
    test("poison")
    test("broker", kills={"type": int, "default": 10}, relay_port={"type": int, "required": True},
         mosquitto={"required": True}, mosquitto_conf={"required": True})
    test("gateway", kills={"type": int, "default": 5}, relay_port={"type": int, "required": True})
    test("flaky", relay_port={"type": int, "required": True}, window={"type": float, "default": 12.0})
    test("sigterm", dead_port={"type": int, "required": True}, deadline={"type": float, "default": 10.0})

    a = ap.parse_args()
    # On SIGTERM (faults.sh stopping us), unwind through `finally` to stop what we started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    {"flood": cmd_flood, "poison": cmd_poison, "broker": cmd_broker, "gateway": cmd_gateway,
     "flaky": cmd_flaky, "sigterm": cmd_sigterm}[a.sub](a)
    return 1 if faultkit.failures else 0


if __name__ == "__main__":
    sys.exit(main())
