#!/usr/bin/env python3
"""Modbus slave ("pump") for the twinbus interoperability tests, built on pymodbus 3.16.1.

It plays an independent Modbus device, so the gateway is tested against someone else's
Modbus implementation rather than against its own simulator.

Profile served for unit id 1 (identical over TCP, RTU and RTU over TCP):
  coil 0               motor on/off                       (initially off)
  discrete input 0     running                            (True)
  holding 10-11        f32 setpoint, big-endian (ABCD)    (initially 20.0)
  input register 0     i16 temperature x10                (215 = 21.5 degC)

Evidence for the checks, both written as files so a check can prove what was written
and, just as important, what was NOT written:
  --writes FILE  one JSON line per write request received (any unit id, valid or not):
                 {"time": epoch_s, "unit": 1, "fc": 16, "address": 10, "values": [16938, 0]}
  --state FILE   JSON snapshot of the profile's locations, rewritten atomically at start and
                 after every answered write. Its first appearance means "ready to serve".

Unit ids other than 1: over RTU the slave stays silent (as a real device on a shared line
would); over TCP it answers exception 0x0B (gateway target failed to respond), as a
Modbus TCP gateway would.

pymodbus 3.16 notes (why the code looks the way it does):
  * The old datastore API (ModbusSequentialDataBlock/ModbusDeviceContext/ModbusServerContext)
    is deprecated for 4.0 and is converted internally into SimDevice/SimData anyway; its
    blocks are offset by one (a block "at address 1" is Modbus address 0, a block at 0 is a
    TypeError). SimData addresses are plain Modbus addresses, so we use SimDevice directly.
  * The request's unit id is `device_id=` (was `slave=`).
  * SimCore answers an unknown unit id with a KeyError (-> exception 0x04 plus a traceback
    in the log), not NoSuchIdException, so `ignore_missing_devices` does nothing until the
    context is replaced with one that raises NoSuchIdException (StrictSimCore below).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import struct
import sys
import time

from pymodbus import FramerType
from pymodbus.exceptions import NoSuchIdException
from pymodbus.server import ModbusSerialServer, ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice
from pymodbus.simulator.simcore import SimCore

UNIT = 1
INITIAL_SETPOINT = 20.0
TEMPERATURE_X10 = 215
LAMP_WORD = 0x00F0

# Function codes that change the device: write single/multiple coils, write single/multiple
# registers, mask write register, read/write multiple registers.
WRITE_FCS = {5, 6, 15, 16, 22, 23}

log = logging.getLogger("slave")


def f32_be_words(value: float) -> list[int]:
    """f32 as two registers, high word first (ABCD)."""
    hi, lo = struct.unpack(">HH", struct.pack(">f", value))
    return [hi, lo]


def build_device() -> SimDevice:
    # Separate blocks per table (the 4-tuple form), so coil 0 and discrete input 0 are
    # individual bits and holding/input registers do not overlap. A few spare locations
    # around the profile let a gateway read slightly wider ranges without an exception;
    # anything outside the blocks answers ILLEGAL_ADDRESS.
    holding = [0] * 32
    holding[10:12] = f32_be_words(INITIAL_SETPOINT)
    holding[20] = LAMP_WORD  # a register whose bit 3 the gateway sets; the others must stay
    inputs = [0] * 16
    inputs[0] = TEMPERATURE_X10
    return SimDevice(
        id=UNIT,
        simdata=(
            [SimData(0, values=[False] * 16, datatype=DataType.BITS)],  # coils
            [SimData(0, values=[True] + [False] * 15, datatype=DataType.BITS)],  # discrete
            [SimData(0, values=holding, datatype=DataType.REGISTERS)],  # holding
            [SimData(0, values=inputs, datatype=DataType.REGISTERS)],  # input
        ),
    )


class StrictSimCore(SimCore):
    """SimCore that reports unknown unit ids the way the server's request handler expects."""

    async def async_getValues(self, device_id, func_code, address, count=1):
        if device_id not in self.devices:
            raise NoSuchIdException(f"unit {device_id}")
        return await super().async_getValues(device_id, func_code, address, count)

    async def async_setValues(self, device_id, func_code, address, values):
        if device_id not in self.devices:
            raise NoSuchIdException(f"unit {device_id}")
        return await super().async_setValues(device_id, func_code, address, values)


class Evidence:
    """Writes the write log and the state snapshot."""

    def __init__(self, writes_path: str, state_path: str):
        self.state_path = state_path
        # Line-buffered append: every record is on disk as soon as it is received, even if
        # the process is killed right after.
        self.writes = open(writes_path, "a", buffering=1, encoding="utf-8")
        self.context: SimCore | None = None

    def record_write(self, pdu) -> None:
        fc = pdu.function_code
        entry = {"time": round(time.time(), 3), "unit": pdu.dev_id, "fc": fc, "address": pdu.address}
        if fc in (5, 15):
            entry["values"] = [bool(b) for b in pdu.bits]
        elif fc in (6, 16):
            entry["values"] = list(pdu.registers)
        elif fc == 22:
            entry["and_mask"], entry["or_mask"] = pdu.and_mask, pdu.or_mask
        elif fc == 23:
            entry["address"] = pdu.write_address
            entry["values"] = list(pdu.write_registers)
        self.writes.write(json.dumps(entry) + "\n")
        log.info("write received: %s", entry)

    async def dump_state(self) -> None:
        ctx = self.context
        assert ctx is not None

        async def get(fc: int, address: int, count: int):
            return list(await ctx.async_getValues(UNIT, fc, address, count))

        holding = await get(3, 10, 2)
        state = {
            "time": round(time.time(), 3),
            "coils": {"0": bool((await get(1, 0, 1))[0])},
            "discrete_inputs": {"0": bool((await get(2, 0, 1))[0])},
            "holding_registers": {"10": holding[0], "11": holding[1], "20": (await get(3, 20, 1))[0]},
            "input_registers": {"0": (await get(4, 0, 1))[0]},
            "setpoint_f32": struct.unpack(">f", struct.pack(">HH", *holding))[0],
        }
        tmp = self.state_path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(state, f)
        os.replace(tmp, self.state_path)  # readers never see a half-written file


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--tcp", metavar="HOST:PORT", help="serve Modbus TCP")
    where.add_argument("--rtu", metavar="DEVICE", help="serve Modbus RTU on a serial device")
    where.add_argument("--rtu-tcp", metavar="HOST:PORT",
                       help="serve RTU frames over TCP, as a serial device server in raw mode")
    ap.add_argument("--baud", type=int, default=19200)
    ap.add_argument("--writes", required=True, help="JSON-lines write log (appended)")
    ap.add_argument("--state", required=True, help="JSON state snapshot (rewritten)")
    ap.add_argument("--log-level", default="info")
    args = ap.parse_args()

    logging.basicConfig(
        stream=sys.stderr, level=args.log_level.upper(),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    # pymodbus logs through the "pymodbus" logger tree (its frame dumps help when a check
    # fails); pymodbus_apply_logging_config() would add a second handler and double each line.
    logging.getLogger("pymodbus").setLevel(args.log_level.upper())

    loop = asyncio.get_running_loop()
    evidence = Evidence(args.writes, args.state)

    def trace_pdu(sending: bool, pdu):
        # Received requests: log writes before the datastore sees them, so even a rejected
        # write (bad address, unknown unit) leaves a trace.
        # Sent responses: a write was just applied (or refused), refresh the snapshot.
        if not sending and pdu.function_code in WRITE_FCS:
            evidence.record_write(pdu)
        elif sending and (pdu.function_code & 0x7F) in WRITE_FCS:
            loop.create_task(evidence.dump_state())
        return pdu

    device = build_device()
    common = dict(trace_pdu=trace_pdu)
    if args.tcp:
        host, _, port = args.tcp.rpartition(":")
        server = ModbusTcpServer(
            device, framer=FramerType.SOCKET, address=(host, int(port)),
            ignore_missing_devices=False, **common,
        )
        what = f"Modbus TCP on {host}:{port}"
    elif args.rtu_tcp:
        # pymodbus's RTU framer on a TCP server; other units stay silent, as on a line.
        host, _, port = args.rtu_tcp.rpartition(":")
        server = ModbusTcpServer(
            device, framer=FramerType.RTU, address=(host, int(port)),
            ignore_missing_devices=True, **common,
        )
        what = f"RTU frames over TCP on {host}:{port}"
    else:
        # 8N1 only: the kernel refuses parity on a pseudo-terminal.
        server = ModbusSerialServer(
            device, framer=FramerType.RTU, port=args.rtu, baudrate=args.baud,
            bytesize=8, parity="N", stopbits=1, ignore_missing_devices=True, **common,
        )
        what = f"Modbus RTU on {args.rtu} at {args.baud} 8N1"
    server.context = StrictSimCore(device)
    evidence.context = server.context

    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    await server.serve_forever(background=True)
    await evidence.dump_state()  # also the readiness signal for run.sh
    log.info("serving unit %d, %s", UNIT, what)
    await stop.wait()
    log.info("stopping")
    await server.shutdown()
    evidence.writes.close()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
