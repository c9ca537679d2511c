#!/usr/bin/env node
// Modbus TCP slave ("pump") for the twinbus interoperability tests, built on Node's
// modbus-serial (ServerTCP): a second device implementation, independent of pymodbus, so
// that what two readings of one library share does not pass unnoticed.
//
// Same profile and evidence files as slave.py (checks.py reads both alike):
//   coil 0               motor on/off                       (initially off)
//   discrete input 0     running                            (true)
//   holding 10-11        f32 setpoint, big-endian (ABCD)    (initially 20.0)
//   holding 20           0x00F0 (a register whose bit 3 the gateway sets)
//   input register 0     i16 temperature x10                (215 = 21.5 degC)
//   --writes FILE  one JSON line per write request received, from the frames on the wire
//   --state FILE   JSON snapshot, rewritten atomically at start and after every write;
//                  its first appearance means "ready to serve".
// modbus-serial has no function 22 (mask write): it answers "illegal function", so the
// gateway's device for it does not set mask_write. Only unit 1 is served.
"use strict";

const fs = require("fs");
const path = require("path");

// modbus-serial is installed by .ci/run under target/interop-node (MODBUS_SERIAL_DIR).
const dir = process.env.MODBUS_SERIAL_DIR || path.join(__dirname, "../../target/interop-node/node_modules");
const { ServerTCP } = require(path.join(dir, "modbus-serial"));

function arg(name) {
    const i = process.argv.indexOf(name);
    if (i < 0 || i + 1 >= process.argv.length) {
        console.error(`slave.js: ${name} is required`);
        process.exit(2);
    }
    return process.argv[i + 1];
}

const [host, port] = (() => {
    const a = arg("--tcp");
    const i = a.lastIndexOf(":");
    return [a.slice(0, i), parseInt(a.slice(i + 1), 10)];
})();
const writesPath = arg("--writes");
const statePath = arg("--state");
const UNIT = 1;

function f32Words(v) {
    const b = Buffer.alloc(4);
    b.writeFloatBE(v, 0);
    return [b.readUInt16BE(0), b.readUInt16BE(2)];
}

const coils = new Array(16).fill(false);
const discrete = [true].concat(new Array(15).fill(false));
const holding = new Array(32).fill(0);
[holding[10], holding[11]] = f32Words(20.0);
holding[20] = 0x00f0;
const inputs = new Array(16).fill(0);
inputs[0] = 215;

// Outside the blocks: "illegal data address", as a real device would answer.
function at(table, addr) {
    if (addr < 0 || addr >= table.length) {
        throw { modbusErrorCode: 0x02, msg: `illegal address ${addr}` };
    }
    return table[addr];
}

function dumpState() {
    const b = Buffer.alloc(4);
    b.writeUInt16BE(holding[10], 0);
    b.writeUInt16BE(holding[11], 2);
    const state = {
        time: Date.now() / 1000,
        coils: { 0: coils[0] },
        discrete_inputs: { 0: discrete[0] },
        holding_registers: { 10: holding[10], 11: holding[11], 20: holding[20] },
        input_registers: { 0: inputs[0] },
        setpoint_f32: b.readFloatBE(0),
    };
    const tmp = statePath + ".tmp";
    fs.writeFileSync(tmp, JSON.stringify(state));
    fs.renameSync(tmp, statePath); // readers never see a half-written file
}

// The handlers run before the answer goes out; the snapshot follows each write at once.
let dumpQueued = false;
function changed() {
    if (!dumpQueued) {
        dumpQueued = true;
        setImmediate(() => {
            dumpQueued = false;
            dumpState();
        });
    }
}

const vector = {
    getCoil: (addr, unit) => at(coils, addr),
    getDiscreteInput: (addr, unit) => at(discrete, addr),
    getInputRegister: (addr, unit) => at(inputs, addr),
    getHoldingRegister: (addr, unit) => at(holding, addr),
    setCoil: (addr, value, unit) => {
        at(coils, addr);
        coils[addr] = Boolean(value);
        changed();
    },
    setRegister: (addr, value, unit) => {
        at(holding, addr);
        holding[addr] = value & 0xffff;
        changed();
    },
};

// Evidence: every write request, parsed from the MBAP frames as they arrive (before the
// server acts on them, so even a refused write leaves a trace).
const writes = fs.openSync(writesPath, "a");
const WRITE_FCS = new Set([5, 6, 15, 16, 22, 23]);
function recordFrame(pdu, unit) {
    const fc = pdu[0];
    if (!WRITE_FCS.has(fc) || pdu.length < 5) {
        return;
    }
    const entry = { time: Date.now() / 1000, unit, fc, address: pdu.readUInt16BE(1) };
    if (fc === 5) {
        entry.values = [pdu.readUInt16BE(3) === 0xff00];
    } else if (fc === 6) {
        entry.values = [pdu.readUInt16BE(3)];
    } else if (fc === 15 && pdu.length >= 6) {
        const n = pdu.readUInt16BE(3);
        entry.values = [];
        for (let i = 0; i < n && 6 + (i >> 3) < pdu.length; i++) {
            entry.values.push(Boolean((pdu[6 + (i >> 3)] >> (i & 7)) & 1));
        }
    } else if (fc === 16 && pdu.length >= 6) {
        const n = pdu.readUInt16BE(3);
        entry.values = [];
        for (let i = 0; i < n && 6 + 2 * i + 1 < pdu.length; i++) {
            entry.values.push(pdu.readUInt16BE(6 + 2 * i));
        }
    } else if (fc === 22 && pdu.length >= 7) {
        entry.and_mask = pdu.readUInt16BE(3);
        entry.or_mask = pdu.readUInt16BE(5);
    }
    fs.writeSync(writes, JSON.stringify(entry) + "\n");
    console.log("write received:", JSON.stringify(entry));
}

const server = new ServerTCP(vector, { host, port, unitID: UNIT, debug: false });
server._server.on("connection", (sock) => {
    let buf = Buffer.alloc(0);
    sock.on("data", (data) => {
        buf = Buffer.concat([buf, data]);
        while (buf.length >= 7) {
            const len = buf.readUInt16BE(4); // unit id + PDU
            if (buf.length < 6 + len) {
                break;
            }
            recordFrame(buf.subarray(7, 6 + len), buf[6]);
            buf = buf.subarray(6 + len);
        }
    });
});
server.on("socketError", (e) => console.error("socket error:", e.message));
server.on("serverError", (e) => {
    console.error("server error:", e.message);
    process.exit(1);
});
server.on("initialized", () => {
    dumpState(); // also the readiness signal for run.sh
    console.log(`serving unit ${UNIT}, Modbus TCP on ${host}:${port} (modbus-serial ServerTCP)`);
});

for (const sig of ["SIGTERM", "SIGINT"]) {
    process.on(sig, () => {
        console.log("stopping");
        server.close(() => process.exit(0));
        setTimeout(() => process.exit(0), 2000).unref();
    });
}
