#!/usr/bin/env python3
"""Writes the seed inputs of fuzz/corpus/<target>/ (seed-*); findings sit beside them.

Run from anywhere: python3 fuzz/make_seeds.py. Idempotent; seeds are small
and named after what they exercise, so a diff of the corpus reads well.
"""
import os, random

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "corpus")
ROOT = os.path.join(HERE, "..")

def put(target, name, data):
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data)

commands = {
    "set-label": '{"id":"1","set":{"deviceAttrib":{"motorStatus":"on"}}}',
    "set-many": '{"id":7,"set":{"deviceAttrib":{"setpoint":33.3,"mode":"manual","speed":50}}}',
    "set-flat-path": '{"id":"f","set":{"deviceAttrib.trim":-1000}}',
    "set-bit": '{"id":"b","set":{"deviceAttrib":{"lamp":true,"valve":false}}}',
    "set-scaled": '{"id":"s","set":{"deviceAttrib":{"offsetTemp":21.37,"flow":12.345,"halfSteps":999.5,"level":-3.3}}}',
    "set-64": '{"id":"64","set":{"deviceAttrib":{"bigCount":9007199254740993,"signed64":-9223372036854775808,"unsigned64":18446744073709551615}}}',
    "set-float-forms": '{"id":"ff","set":{"deviceAttrib":{"precise":1e300,"ratio":0.5,"counter":4e9,"tiny":-5.0}}}',
    "set-strings": '{"id":"t","set":{"deviceAttrib":{"label":"pump A  ","code":"AB12"}}}',
    "set-write-only": '{"id":"w","set":{"deviceAttrib":{"trigger":1}}}',
    "set-read-only": '{"id":"r","set":{"deviceData":{"temperature":20,"mirror":50}}}',
    "set-unknown": '{"id":"u","set":{"deviceAttrib":{"nope":1}}}',
    "set-group": '{"id":"g","set":{"deviceData":{"status":1}}}',
    "set-between-steps": '{"id":"bs","set":{"deviceAttrib":{"offsetTemp":21.375}}}',
    "set-over-max": '{"id":"om","set":{"deviceAttrib":{"setpoint":80.00001}}}',
    "set-dup-key": '{"id":"d","set":{"deviceAttrib":{"mode":"auto","mode":"manual"}}}',
    "set-dup-path": '{"id":"dp","set":{"deviceAttrib":{"mode":"auto"},"deviceAttrib.mode":"manual"}}',
    "set-wrong-types": '{"id":"wt","set":{"deviceAttrib":{"setpoint":"40","motorStatus":1,"lamp":"true","label":7}}}',
    "set-null-array-object": '{"id":"n","set":{"deviceAttrib":{"setpoint":null,"mode":[1],"speed":{"v":1}}}}',
    "set-many-unknown": '{"id":"mu","set":{' + ",".join(f'"k{i}":{i}' for i in range(25)) + '}}',
    "get-all": '{"id":"g1","get":"*"}',
    "get-list": '{"id":"g2","get":["deviceAttrib.motorStatus","deviceData","deviceAttrib.trigger"]}',
    "get-one": '{"get":"deviceData.status.code"}',
    "shutdown": '{"shutdown":true}',
    "two-requests": '{"id":"x","get":"*","set":{"a":1}}',
    "unknown-field": '{"id":"x","sett":{}}',
    "id-types": '{"id":[1],"get":"*"}',
    "id-number-text": '{"id":7.50,"get":"*"}',
    "id-big": '{"id":123456789012345678901234567890,"get":"*"}',
    "id-twice": '{"id":"a","id":"b","get":"*"}',
    "escapes": '{"id":"\\u0000\\n","set":{"deviceAttrib":{"la\\u0062el":"\\u0041"}}}',
    "deep": '[' * 200 + ']' * 200,
    "not-json": 'not json',
    "array": '[1,2]',
    "empty-object": '{}',
}
for k, v in commands.items():
    put("command", k, v)
put("command", "binary", bytes([0xff, 0xfe, 0x00, 0x01, 0x7b]))

# The write target reads its bytes as choices (see point_yaml in src/lib.rs):
# a spread of patterns gets every table and type early.
rng = random.Random(8)
for i in range(24):
    put("write", f"random-{i:02}", bytes(rng.randrange(256) for _ in range(rng.randrange(16, 160))))
put("write", "zeros", bytes(64))
put("write", "ones", bytes([255]) * 64)

configs = {
    "gateway": open(os.path.join(ROOT, "gateway.yaml")).read(),
    "profile": open(os.path.join(ROOT, "tests", "bad_input", "profile.yaml")).read()
        + "buses:\n  b: { tcp: { host: 127.0.0.1 } }\ndevices:\n  d: { bus: b, unit: 1, profile: rich }\n",
    "remote": """connections:
  cloud:
    url: mqtts://broker.example.com:8883
    client_id: line3
    username: gw
    password: ${HOME}
    tls: { alpn: [x-amzn-mqtt-ca] }
    proxy: { url: http://proxy:3128, username: p, password: x }
    presence: { topic: gw/status, retain: false }
    reconnect: { min: 1s, max: 60s }
    outbox: { max_messages: 1000, max_size: 64MiB, max_age: 24h }
    mqtt_version: 5
    keep_alive: 30s
buses:
  rs485: { rtu: { port: /dev/ttyUSB0, baud: 9600, parity: even, data_bits: 8, stop_bits: 1 }, timeout: 300ms, retries: 2, delay: 5ms }
profiles:
  heater:
    read: { max_registers: 60, max_bits: 100, max_gap: 2 }
    mask_write: true
    points:
      deviceAttrib.power: { coil: 0, values: { on: true, off: false } }
      deviceAttrib.setpoint: { holding: 10, type: i16, scale: 0.1, min: 5, max: 60 }
      deviceData.temperature: { input: 0, type: i16, scale: 0.1, deadband: 0.2 }
    commands:
      start:
        args: { speed: { type: number, min: 0, max: 80 } }
        steps:
          - set: { deviceAttrib.setpoint: $speed, deviceAttrib.power: "on" }
          - wait: 5s
          - check: { deviceAttrib.power: "on" }
devices:
  heater-1:
    bus: rs485
    unit: 3
    profile: heater
    poll: 2s
    twin: { connection: cloud, commands: plant/h1/cmd, responses: plant/h1/rsp, telemetry: plant/h1/data, telemetry_interval: 10s, acknowledge: true, allow_shutdown: true, response_topics: [plant/h1/rsp, "app/+/replies"] }
  heater-2:
    bus: rs485
    unit: 4
    profile: heater
    twin: { connection: cloud, shadow: { thing: heater-2, name: main, errors_key: twinbus.errors, running_interval: 10s } }
http: { listen: 127.0.0.1:9180 }
state_dir: /tmp/twinbus-fuzz-state
shutdown_timeout: 10s
""",
    "embedded-users": """connections:
  local:
    embedded:
      listen: 0.0.0.0:1883
      users: { app: { password_file: /etc/hostname, publish: ["site/+/cmd"], subscribe: ["site/#"] } }
      max_connections: 8
buses:
  b: { tcp: { host: 127.0.0.1, port: 5020 } }
devices:
  d:
    bus: b
    unit: 0
    points:
      a.b: { holding: 0, type: string, length: 7 }
      a.c: { holding: 4, bit: 15, access: write }
      a.d: { holding: 4, bit: 2 }
      e.f: { discrete: 3 }
      e.g: { input: 65532, type: u64, word_order: little, byte_order: little }
simulators:
  sim: { listen: 127.0.0.1:5020, serves: [d], initial: { a.b: "hello" }, drift: [e.g], mirror: { e.f: a.d } }
""",
    "flow": "{buses: {b: {tcp: {host: h}}}, devices: {d: {bus: b, unit: 1, points: {x.y: {coil: 1}}}}}",
    "anchors": "buses:\n  b: &bus { tcp: { host: h } }\n  c: *bus\ndevices:\n  d: { bus: b, unit: 1, points: { x.y: &p { coil: 1 } } }\n  e: { bus: b, unit: 2, points: { x.y: *p } }\n",
    "bad-unknown-key": "conections: {}\n",
    "bad-types": "devices:\n  d: { bus: 5, unit: one }\n",
    "empty": "",
}
for k, v in configs.items():
    put("config", k, v)

# delta: messages split at 0x1E; each one's first byte picks its topic
# (0 update/delta, 1 get/accepted, 4 get/rejected; see SUFFIXES in src/lib.rs).
deltas = {
    "delta-set": b'\x00{"state":{"deviceAttrib":{"setpoint":33.5,"motorStatus":"on"}},"version":5,"timestamp":1795631474,"metadata":{"deviceAttrib":{"setpoint":{"timestamp":1795631474}}}}',
    "delta-out-of-limits": b'\x00{"state":{"deviceAttrib":{"setpoint":95,"speed":51,"tiny":-6}},"version":6,"timestamp":1795631474}',
    "delta-64": b'\x00{"state":{"deviceAttrib":{"bigCount":9007199254740993,"signed64":9007199254740993.0,"unsigned64":18446744073709551615}},"version":7,"timestamp":1795631474}',
    "get-accepted": b'\x01{"state":{"desired":{"deviceAttrib":{"mode":"manual","lamp":true}},"delta":{"deviceAttrib":{"mode":"manual","lamp":true}}},"version":3,"timestamp":1795631474,"clientToken":"fuzz-1"}',
    "relay-command": b'\x00{"state":{"command":[{"id":"r1","relay-command":{"topic":"evil/#","payload":"x"}}]},"version":8,"timestamp":1795631474}',
    "two-deltas-stale": b'\x00{"state":{"deviceAttrib":{"trim":5}},"version":9,"timestamp":1795631474}\x1e\x00{"state":{"deviceAttrib":{"trim":-1001}},"version":4,"timestamp":1795631474}',
    "scaled": b'\x00{"state":{"deviceAttrib":{"offsetTemp":21.375,"flow":12.3455,"halfSteps":999.25,"level":-3.3}},"version":10,"timestamp":1795631474}',
    "not-json": b'\x00{"state":',
    "rejected": b'\x04{"code":429,"message":"throttled","clientToken":"fuzz-1"}',
}
for k, v in deltas.items():
    put("delta", k, v)
