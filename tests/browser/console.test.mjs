// The local web console in a real browser (Debian's Chromium, driven by
// playwright-core), against the shipped demo: gateway.yaml as it is, on free
// ports, with its simulator run as its own process (`twinbus simulate`) so
// that the test can make it go silent (SIGSTOP) as a dead device would.
//
// Run by run.sh (which .ci/run calls); needs TWINBUS_BIN, a built twinbus.
// SCREENSHOTS_DIR, when set, receives console-overview.png and
// console-device.png (the README's pictures: `SCREENSHOTS_DIR=docs`).
//
// Every process it starts is stopped by its pid, also on SIGTERM/SIGINT.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, execFile } from 'node:child_process';
import { mkdtempSync, readFileSync, writeFileSync, mkdirSync, rmSync } from 'node:fs';
import { createServer, Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { chromium } from 'playwright-core';

const repo = resolve(import.meta.dirname, '../..');
const bin = process.env.TWINBUS_BIN || join(repo, 'target/release/twinbus');
const shots = process.env.SCREENSHOTS_DIR ? resolve(repo, process.env.SCREENSHOTS_DIR) : null;
const work = mkdtempSync(join(tmpdir(), 'twinbus-console-'));
const children = [];
let browser, page, url, sim, ports;

function freePort() {
  return new Promise((ok, fail) => {
    const s = createServer();
    s.on('error', fail);
    s.listen(0, '127.0.0.1', () => { const { port } = s.address(); s.close(() => ok(port)); });
  });
}

// Starts a process, keeps its pid for the end, and collects its output.
function start(name, args) {
  const child = spawn(bin, args, { cwd: work, stdio: ['ignore', 'pipe', 'pipe'] });
  child.output = '';
  const take = (chunk) => { child.output += chunk; };
  child.stdout.on('data', take);
  child.stderr.on('data', take);
  child.label = name;
  children.push(child);
  return child;
}

// Resolves when `child` has printed something matching `pattern`.
function waitForOutput(child, pattern, ms) {
  return new Promise((ok, fail) => {
    const timer = setTimeout(() => fail(new Error(`${child.label} did not print ${pattern} within ${ms} ms:\n${child.output}`)), ms);
    const look = () => {
      const m = child.output.match(pattern);
      if (m) { clearTimeout(timer); child.stdout.off('data', look); child.stderr.off('data', look); ok(m); }
    };
    child.stdout.on('data', look);
    child.stderr.on('data', look);
    child.on('exit', (code) => { clearTimeout(timer); fail(new Error(`${child.label} exited (${code}):\n${child.output}`)); });
    look();
  });
}

function stop(child) {
  return new Promise((ok) => {
    if (child.exitCode !== null || child.signalCode !== null) return ok();
    const kill = setTimeout(() => { try { process.kill(child.pid, 'SIGKILL'); } catch {} }, 5000);
    child.once('exit', () => { clearTimeout(kill); ok(); });
    try {
      process.kill(child.pid, 'SIGCONT'); // a stopped simulator must be able to end
      process.kill(child.pid, 'SIGTERM');
    } catch { clearTimeout(kill); ok(); }
  });
}

async function stopAll() {
  if (browser) await browser.close().catch(() => {});
  await Promise.all(children.map(stop));
  rmSync(work, { recursive: true, force: true });
}
for (const signal of ['SIGTERM', 'SIGINT']) {
  process.once(signal, () => { stopAll().finally(() => process.exit(1)); });
}

// One Modbus TCP "write single register" (function 6) to the simulator, as
// a technician's tool would do on the real device.
function writeRegister(port, unit, address, value) {
  return new Promise((ok, fail) => {
    const s = new Socket();
    s.setTimeout(3000, () => { s.destroy(); fail(new Error('no Modbus answer')); });
    s.on('error', fail);
    s.connect(port, '127.0.0.1', () => {
      const frame = Buffer.from([0, 1, 0, 0, 0, 6, unit, 6, address >> 8, address & 255, value >> 8, value & 255]);
      s.write(frame);
    });
    s.on('data', (answer) => { s.destroy(); answer[7] === 6 ? ok() : fail(new Error(`Modbus exception ${answer[8]}`)); });
  });
}

function publish(topic, message) {
  return new Promise((ok, fail) => {
    execFile('mosquitto_pub', ['-h', '127.0.0.1', '-p', String(ports.mqtt), '-q', '1', '-t', topic, '-m', message], { timeout: 10000 }, (e) => (e ? fail(e) : ok()));
  });
}

before(async () => {
  ports = { mqtt: await freePort(), modbus: await freePort(), http: await freePort() };
  const demo = readFileSync(join(repo, 'gateway.yaml'), 'utf8')
    .replaceAll('127.0.0.1:1883', `127.0.0.1:${ports.mqtt}`)
    .replaceAll('127.0.0.1:5020', `127.0.0.1:${ports.modbus}`)
    .replaceAll('port: 5020', `port: ${ports.modbus}`)
    .replaceAll('127.0.0.1:9180', `127.0.0.1:${ports.http}`);
  assert.ok(demo.includes('console: true'), 'the demo enables the console');
  const cut = demo.indexOf('\nsimulators:');
  assert.ok(cut > 0, 'the demo has a simulator');
  writeFileSync(join(work, 'sim.yaml'), demo);
  writeFileSync(join(work, 'gateway.yaml'), `${demo.slice(0, cut)}\nstate_dir: ${join(work, 'state')}\n`);

  sim = start('simulator', ['simulate', '-c', 'sim.yaml']);
  await waitForModbus(ports.modbus);
  const gateway = start('gateway', ['-c', 'gateway.yaml']);
  // The log names the page to open.
  [, url] = await waitForOutput(gateway, /console: open (http:\/\/\S+) in a browser/, 30000);
  assert.equal(url, `http://127.0.0.1:${ports.http}/console/`);

  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: true,
    // This machine has no network beyond loopback: no background traffic.
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
  page = await browser.newPage({ viewport: { width: 1100, height: 760 } });
  if (shots) mkdirSync(shots, { recursive: true });
});

after(stopAll);

async function waitForModbus(port) {
  const deadline = Date.now() + 20000;
  for (;;) {
    const up = await new Promise((ok) => {
      const s = new Socket();
      s.once('connect', () => { s.destroy(); ok(true); });
      s.once('error', () => ok(false));
      s.connect(port, '127.0.0.1');
    });
    if (up) return;
    if (Date.now() > deadline) throw new Error(`the simulator did not listen:\n${sim.output}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

const deviceRow = (name) => page.locator(`#devices tr[data-name="${name}"]`);
const pointValue = (path) => page.locator(`#points tr[data-path="${path}"] .value`);

test('the overview shows the pump online, the connection and the bus', async () => {
  await page.goto(url);
  await page.locator('#link.live').waitFor({ timeout: 10000 });
  await assertText(deviceRow('demo-pump').locator('.state'), /online/, 15000);
  await assertText(page.locator('#connections tr[data-name="local"] .state'), /connected/, 10000);
  await page.locator('#buses tr[data-name="demo-line"]').waitFor();
});

test('a command sent over MQTT shows in the device page with its outcome', async () => {
  await deviceRow('demo-pump').locator('a').click();
  await page.waitForURL(/\/console\/device\/demo-pump$/);
  await pointValue('deviceData.temperature').filter({ hasText: /\d/ }).waitFor({ timeout: 10000 });
  await publish('iot/v1/cmd', JSON.stringify({ id: 'browser-1', set: { deviceAttrib: { motorStatus: 'on', setpoint: 62.5 } } }));
  const row = page.locator('#commands tr[data-id=\'"browser-1"\']');
  await assertText(row.locator('.outcome'), /succeeded/, 10000);
  await assertText(row, /deviceAttrib\.setpoint = 62\.5/, 1000);
  await assertText(pointValue('deviceAttrib.setpoint'), /^62\.5$/, 5000);
  // A chart needs a few seconds of readings: the temperature drifts.
  await page.waitForFunction(() => (document.querySelector('#points tr[data-path="deviceData.temperature"] polyline')?.getAttribute('points') || '').split(' ').length >= 8, null, { timeout: 20000 });
  if (shots) await page.screenshot({ path: join(shots, 'console-device.png'), fullPage: true });
});

test('a value written on the simulator shows within one poll', async () => {
  // deviceAttrib.mode is holding register 12: 1 is "manual". The demo polls every second.
  await assertText(pointValue('deviceAttrib.mode'), /^auto$/, 5000);
  const written = Date.now();
  await writeRegister(ports.modbus, 1, 12, 1);
  await assertText(pointValue('deviceAttrib.mode'), /^manual$/, 5000);
  const took = Date.now() - written;
  // One poll period, plus the page's event pacing (250 ms) and some slack for a busy machine.
  assert.ok(took <= 1000 + 250 + 750, `shown after ${took} ms`);
  console.log(`# a simulator write showed on the page after ${took} ms`);
});

test('the page fits a phone', async () => {
  await page.setViewportSize({ width: 390, height: 844 });
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  assert.ok(overflow <= 0, `the page is ${overflow} px wider than the phone`);
  await page.setViewportSize({ width: 1100, height: 760 });
});

test('with a login and `write: true`, a person writes a point from the page and is named for it', async () => {
  // A second gateway on the same simulator: the demo plus a login and writing on.
  const [http2, mqtt2] = [await freePort(), await freePort()];
  writeFileSync(join(work, 'password'), 's3cret');
  const yaml = readFileSync(join(work, 'gateway.yaml'), 'utf8')
    .replace(`127.0.0.1:${ports.mqtt}`, `127.0.0.1:${mqtt2}`)
    .replace(`listen: 127.0.0.1:${ports.http}\n  console: true`, `listen: 127.0.0.1:${http2}\n  username: ops\n  password_file: ${join(work, 'password')}\n  console: { write: true }`)
    .replace(`state_dir: ${join(work, 'state')}`, `state_dir: ${join(work, 'state2')}`);
  assert.ok(yaml.includes('write: true'));
  writeFileSync(join(work, 'writable.yaml'), yaml);
  const gateway = start('gateway with writes', ['-c', 'writable.yaml']);
  const [, url2] = await waitForOutput(gateway, /console: open (http:\/\/\S+) in a browser/, 30000);
  // Without the login: nothing (a browser would ask for it).
  assert.equal((await fetch(url2)).status, 401);
  assert.equal((await fetch(`${url2}api/device/demo-pump/write`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: '{"path":"deviceAttrib.setpoint","value":1}' })).status, 401);
  const context = await browser.newContext({ httpCredentials: { username: 'ops', password: 's3cret' }, viewport: { width: 1100, height: 760 } });
  const p = await context.newPage();
  await p.goto(`${url2}device/demo-pump`);
  const form = p.locator('form.write[data-path="deviceAttrib.setpoint"]');
  await form.locator('input').fill('95');
  await form.locator('button').click();
  await assertText(p.locator('#points tr[data-path="deviceAttrib.setpoint"] .answer'), /rejected.*80/, 10000);
  await form.locator('input').fill('30');
  await form.locator('button').click();
  await assertText(p.locator('#points tr[data-path="deviceAttrib.setpoint"] .answer'), /succeeded/, 10000);
  await assertText(p.locator('#points tr[data-path="deviceAttrib.setpoint"] .value'), /^30$/, 5000);
  const rows = p.locator('#commands tbody tr');
  await assertText(rows.first(), /console \(ops\).*succeeded.*deviceAttrib\.setpoint = 30/s, 5000);
  await assertText(rows.nth(1), /console \(ops\).*rejected/s, 5000);
  assert.match(gateway.output, /write from the console.*by=ops/);
  await context.close();
  await stop(gateway);
});

test('the simulator going silent turns the device offline on both pages', async () => {
  process.kill(sim.pid, 'SIGSTOP');
  await assertText(page.locator('#device .badge'), /offline/, 20000);
  await assertText(page.locator('#device .reason'), /\S/, 1000);
  await assertText(pointValue('deviceData.temperature'), /^—$/, 5000);
  await page.goto(url);
  await assertText(deviceRow('demo-pump').locator('.state'), /offline/, 10000);
  process.kill(sim.pid, 'SIGCONT');
  await assertText(deviceRow('demo-pump').locator('.state'), /online/, 20000);
  if (shots) await page.screenshot({ path: join(shots, 'console-overview.png'), fullPage: true });
});

test('the page and its assets weigh under 200 KB', async () => {
  const sizes = await page.evaluate(async () => {
    const out = {};
    for (const path of ['/console/', '/console/app.js', '/console/app.css']) out[path] = (await (await fetch(path)).arrayBuffer()).byteLength;
    return out;
  });
  const total = Object.values(sizes).reduce((a, b) => a + b, 0);
  console.log(`# page weight: ${total} bytes (${JSON.stringify(sizes)})`);
  assert.ok(total < 200 * 1024, `${total} bytes`);
});

async function assertText(locator, pattern, timeout) {
  const deadline = Date.now() + timeout;
  let last = '';
  for (;;) {
    // Playwright's own wait for the text: no fixed sleep.
    try {
      await locator.filter({ hasText: pattern }).first().waitFor({ timeout: Math.max(1, deadline - Date.now()) });
      return;
    } catch {
      last = await locator.first().textContent({ timeout: 1000 }).catch(() => '(none)');
      if (Date.now() >= deadline) assert.fail(`${locator} did not show ${pattern}; it shows ${JSON.stringify(last)}`);
    }
  }
}
