#!/usr/bin/env python3
"""Check the pymodbus slave with pymodbus's own client, before the gateway is involved.

If a gateway check fails, this tells whether the peer itself was sound. Prints one line per
check, `ok   NAME` or `FAIL NAME: WHY`, and exits non-zero if any failed.

--read-only  only reads (the mode run.sh uses before starting the gateway: the write log
             must stay empty so the gateway checks can prove what the gateway wrote).
Otherwise it also writes and verifies the write log (--writes) and snapshot (--state).
"""

from __future__ import annotations

import argparse
import json
import logging
import struct
import sys
import time

from pymodbus import FramerType
from pymodbus.client import ModbusSerialClient, ModbusTcpClient

UNIT = 1
results: list[bool] = []


def check(name: str, cond: bool, why: str = "") -> bool:
    print(f"ok   {name}" if cond else f"FAIL {name}: {why}", flush=True)
    results.append(cond)
    return cond


def f32(words) -> float:
    return struct.unpack(">f", struct.pack(">HH", *words))[0]


def read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def read_state(path: str, wait_for=lambda s: True, timeout=2.0) -> dict:
    """The snapshot is refreshed just after a write is answered: poll briefly."""
    deadline = time.monotonic() + timeout
    while True:
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
        if wait_for(state) or time.monotonic() > deadline:
            return state
        time.sleep(0.05)


def main() -> int:
    ap = argparse.ArgumentParser()
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--tcp", metavar="HOST:PORT")
    where.add_argument("--rtu", metavar="DEVICE")
    ap.add_argument("--baud", type=int, default=19200)
    ap.add_argument("--name", default="probe", help="prefix of the check names")
    ap.add_argument("--read-only", action="store_true")
    ap.add_argument("--silent-units", action="store_true",
                    help="other unit ids get silence over TCP too (modbus-serial's ServerTCP)")
    ap.add_argument("--writes", help="the slave's write log (write mode)")
    ap.add_argument("--state", help="the slave's state snapshot (write mode)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.CRITICAL)  # the client logs every timeout as ERROR

    if args.tcp:
        host, _, port = args.tcp.rpartition(":")
        client = ModbusTcpClient(host, port=int(port), timeout=1, retries=0)
    else:
        client = ModbusSerialClient(
            args.rtu, framer=FramerType.RTU, baudrate=args.baud,
            bytesize=8, parity="N", stopbits=1, timeout=1, retries=0,
        )
    n = args.name
    if not check(f"{n} connect", client.connect(), "could not connect"):
        return 1
    try:
        r = client.read_input_registers(0, count=1, device_id=UNIT)
        check(f"{n} input 0 == 215", not r.isError() and r.registers == [215], f"got {r}")
        r = client.read_discrete_inputs(0, count=1, device_id=UNIT)
        check(f"{n} discrete 0 == 1", not r.isError() and r.bits[0] is True, f"got {r}")
        r = client.read_holding_registers(10, count=2, device_id=UNIT)
        check(f"{n} holding 10-11 readable f32", not r.isError() and len(r.registers) == 2, f"got {r}")
        r = client.read_coils(0, count=1, device_id=UNIT)
        check(f"{n} coil 0 readable", not r.isError(), f"got {r}")
        r = client.read_holding_registers(200, count=1, device_id=UNIT)
        check(f"{n} outside profile -> illegal address",
              r.isError() and getattr(r, "exception_code", None) == 2, f"got {r}")

        # Another unit id: TCP answers 0x0B, RTU stays silent (pymodbus raises on timeout).
        try:
            r = client.read_input_registers(0, count=1, device_id=7)
            got = f"exception {r.exception_code}" if r.isError() else f"answer {r}"
        except Exception as exc:  # noqa: BLE001 - the client signals silence by raising
            got = f"silence ({type(exc).__name__})"
        want = "exception 11" if args.tcp and not args.silent_units else "silence"
        check(f"{n} unit 7 -> {want}", got.startswith(want), f"got {got}")

        if args.read_only:
            return 0 if all(results) else 1

        before = len(read_jsonl(args.writes))
        r = client.write_coil(0, True, device_id=UNIT)
        check(f"{n} write coil 0 on", not r.isError(), f"got {r}")
        r = client.read_coils(0, count=1, device_id=UNIT)
        check(f"{n} coil 0 reads back 1", not r.isError() and r.bits[0] is True, f"got {r}")
        words = [0x422A, 0x0000]  # 42.5 as big-endian f32
        r = client.write_registers(10, words, device_id=UNIT)
        check(f"{n} write holding 10-11", not r.isError(), f"got {r}")
        r = client.read_holding_registers(10, count=2, device_id=UNIT)
        check(f"{n} holding 10-11 read back 42.5",
              not r.isError() and f32(r.registers) == 42.5, f"got {r}")
        r = client.write_register(100, 1, device_id=UNIT)
        check(f"{n} write outside profile refused", r.isError(), f"got {r}")

        writes = read_jsonl(args.writes)[before:]
        want = [
            {"unit": 1, "fc": 5, "address": 0, "values": [True]},
            {"unit": 1, "fc": 16, "address": 10, "values": words},
            {"unit": 1, "fc": 6, "address": 100, "values": [1]},
        ]
        got = [{k: w.get(k) for k in ("unit", "fc", "address", "values")} for w in writes]
        check(f"{n} write log has exactly the 3 writes", got == want, f"got {got}")

        state = read_state(args.state, lambda s: s["holding_registers"]["10"] == 0x422A)
        check(f"{n} state snapshot coil 0 == 1", state["coils"]["0"] is True, f"got {state}")
        check(f"{n} state snapshot setpoint == 42.5", state["setpoint_f32"] == 42.5, f"got {state}")
    finally:
        client.close()
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
