// twinbus console: the overview (/console/) and a device's page
// (/console/device/NAME). Each follows one server-sent event stream whose
// every event is the whole view as JSON; the browser reconnects by itself.
// No framework, no build step: this file is served as written.
'use strict';

const $ = (sel, root = document) => root.querySelector(sel);
const esc = (v) => String(v ?? '').replace(/[&<>"']/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' }[c]));
const app = $('#app');
const link = $('#link');

// Times from the gateway are epoch ms; "ago" is counted from the gateway's
// own clock (the event's `time`) so that a skewed phone still reads right.
let skew = 0;
function ago(ms) {
  if (ms == null) return '—';
  const s = Math.max(0, Math.round((Date.now() - skew - ms) / 1000));
  if (s < 60) return `${s} s ago`;
  if (s < 3600) return `${Math.floor(s / 60)} min ago`;
  return `${Math.floor(s / 3600)} h ago`;
}
const when = (ms) => (ms == null ? '—' : `<span data-at="${ms}" title="${esc(new Date(ms).toLocaleString())}">${ago(ms)}</span>`);
// Relative times move on between events.
setInterval(() => document.querySelectorAll('[data-at]').forEach((e) => { e.textContent = ago(Number(e.dataset.at)); }), 1000);

const badge = (cls, text) => `<span class="badge ${esc(cls)}">${esc(text)}</span>`;
const ms = (x) => (x == null ? '—' : x >= 10000 ? `${(x / 1000).toFixed(0)} s` : x >= 1000 ? `${(x / 1000).toFixed(1)} s` : `${x} ms`);
const num = (x) => (x == null ? '—' : String(x));

function follow(url, onData, onGone) {
  const source = new EventSource(url);
  source.onopen = () => { link.textContent = 'live'; link.className = 'link live'; };
  source.onmessage = (e) => {
    let doc;
    try { doc = JSON.parse(e.data); } catch { return; }
    if (doc.time) skew = Date.now() - doc.time;
    onData(doc);
  };
  source.onerror = () => {
    link.textContent = 'gateway unreachable, retrying…';
    link.className = 'link lost';
    // A device that left (reload) answers 404: the browser gives up then.
    if (source.readyState === EventSource.CLOSED && onGone) onGone();
  };
}

// ---------------------------------------------------------------- overview
function overview() {
  document.title = 'twinbus console';
  follow('/console/events', (o) => {
    const conns = o.connections.map((c) => `<tr data-name="${esc(c.name)}">
      <td>${esc(c.name)}</td><td class="state">${badge(c.connected ? 'up' : 'down', c.connected ? 'connected' : 'disconnected')}</td>
      <td class="mono wide">${esc(c.broker)}</td>
      <td>${c.last_error ? `<span class="err">${esc(c.last_error)}</span> <span class="muted">${when(c.last_error_at)}</span>` : '—'}</td>
      <td class="num">${num(c.outbox)}</td></tr>`).join('');
    const buses = o.buses.map((b) => `<tr data-name="${esc(b.name)}">
      <td>${esc(b.name)}</td><td class="num">${b.per_second == null ? '—' : b.per_second}</td>
      <td class="num">${num(b.transactions)}</td><td class="num">${num(b.errors)}</td><td class="num">${num(b.timeouts)}</td></tr>`).join('');
    const devices = o.devices.map((d) => `<tr data-name="${esc(d.name)}">
      <td><a href="/console/device/${encodeURIComponent(d.name)}">${esc(d.name)}</a></td>
      <td class="state">${badge(d.state, d.state)}${d.reason ? `<div class="reason">${esc(d.reason)}</div>` : ''}</td>
      <td class="wide">${esc(d.bus)} / ${esc(d.unit)}</td>
      <td>${when(d.last_poll)}</td>
      <td class="num">${ms(d.period_ms)} <span class="muted">of ${ms(d.poll_ms)}</span></td>
      <td class="num">${d.point_errors || 0}</td></tr>`).join('');
    app.innerHTML = `
      <h2>Devices <span class="muted">(${o.devices.length})</span></h2>
      <div class="card"><table id="devices"><thead><tr><th>Device</th><th>State</th><th class="wide">Bus / unit</th><th>Last poll</th><th>Poll period</th><th>Point errors</th></tr></thead><tbody>${devices || '<tr><td colspan="6" class="muted">No device runs.</td></tr>'}</tbody></table></div>
      <h2>Connections</h2>
      <div class="card"><table id="connections"><thead><tr><th>Connection</th><th>State</th><th class="wide">Broker</th><th>Last error</th><th>Outbox</th></tr></thead><tbody>${conns}</tbody></table></div>
      <h2>Buses</h2>
      <div class="card"><table id="buses"><thead><tr><th>Bus</th><th>Transactions/s</th><th>Transactions</th><th>Errors</th><th>Timeouts</th></tr></thead><tbody>${buses}</tbody></table></div>`;
  });
}

// ------------------------------------------------------------------ device
function chart(history, now, span) {
  const pts = history.filter(([t]) => t >= now - span);
  if (pts.length < 2) return { svg: '<svg class="chart" viewBox="0 0 160 36"></svg>', range: '' };
  // While the history fills (after a start or a reload), what there is spans the width.
  span = Math.min(span, Math.max(5000, now - pts[0][0]));
  let lo = Math.min(...pts.map((p) => p[1])), hi = Math.max(...pts.map((p) => p[1]));
  const flat = hi === lo;
  if (flat) { lo -= 1; hi += 1; }
  const xy = pts.map(([t, v]) => `${(((t - (now - span)) / span) * 160).toFixed(1)},${(34 - ((v - lo) / (hi - lo)) * 32).toFixed(1)}`).join(' ');
  const values = flat ? `${pts[0][1]}` : `${Math.min(...pts.map((p) => p[1]))} – ${Math.max(...pts.map((p) => p[1]))}`;
  const range = `${values} · ${span >= 60000 ? `${Math.round(span / 60000)} min` : `${Math.round(span / 1000)} s`}`;
  return { svg: `<svg class="chart" viewBox="0 0 160 36" preserveAspectRatio="none"><polyline points="${xy}"/></svg>`, range };
}

function writeForm(p) {
  const field = p.labels
    ? `<select name="value">${p.labels.map((l) => `<option value="${esc(JSON.stringify(l))}">${esc(l)}</option>`).join('')}</select>`
    : `<input name="value" inputmode="decimal" placeholder="${esc([p.min, p.max].every((x) => x != null) ? `${p.min} … ${p.max}` : 'value')}">`;
  return `<form class="write" data-path="${esc(p.path)}">${field}<button>Write</button></form><div class="answer"></div>`;
}

function device(name) {
  document.title = `${name} · twinbus console`;
  $('#crumb').textContent = `› ${name}`;
  const history = new Map(); // path → [[t, x], …], oldest first
  let shape = '';

  follow(`/console/events/device/${encodeURIComponent(name)}`, (d) => {
    // A new stream (first event, or a restarted device) brings whole histories.
    for (const p of d.points) {
      if (p.history) history.set(p.path, p.history.slice());
      else if (p.sample) {
        const h = history.get(p.path) || [];
        // The gateway keeps the newest reading of each second: so does the page.
        const last = h[h.length - 1];
        if (last && Math.floor(last[0] / 1000) === Math.floor(p.sample[0] / 1000)) h[h.length - 1] = p.sample;
        else if (!last || last[0] < p.sample[0]) h.push(p.sample);
        while (h.length && h[0][0] < d.time - d.history_ms) h.shift();
        history.set(p.path, h);
      }
    }
    // The points table is built once per set of points, so that a value
    // being typed into a write field survives the updates.
    const now = d.points.map((p) => p.path).join('\n') + d.write;
    if (now !== shape) {
      shape = now;
      app.innerHTML = `<div id="device"></div>
        <h2>Points</h2><div class="card"><table id="points"><thead><tr><th>Point</th><th>Value</th><th class="wide">Type</th><th>Registers</th><th>Changed</th><th>Recent (up to ${Math.round(d.history_ms / 60000)} min)</th></tr></thead><tbody>
        ${d.points.map((p, i) => `<tr data-path="${esc(p.path)}"><td>${esc(p.path)}<div class="muted">${esc(p.access)}</div></td>
          <td><span class="value" id="v${i}"></span><div class="err" id="e${i}"></div>${d.write && p.writable ? writeForm(p) : ''}</td>
          <td class="wide mono">${esc(p.type)}</td><td class="mono"><div>${esc(p.where)}</div><div class="raw" id="r${i}"></div></td>
          <td id="c${i}"></td><td><div id="g${i}"></div><div class="range" id="n${i}"></div></td></tr>`).join('')}
        </tbody></table></div>
        <h2>Last commands</h2><div class="card"><table id="commands"><thead><tr><th>When</th><th>Source</th><th>Id</th><th>Command</th><th>Outcome</th><th>Latency</th><th>Read back</th></tr></thead><tbody></tbody></table></div>`;
      app.querySelectorAll('form.write').forEach((f) => f.addEventListener('submit', (e) => write(e, name)));
    }
    $('#device').innerHTML = `<div class="summary">
        <span>${badge(d.state, d.state)}</span>
        ${d.reason ? `<span class="reason">${esc(d.reason)}</span>` : ''}
        <span>bus <b>${esc(d.bus)}</b>, unit <b>${esc(d.unit)}</b></span>
        <span>last poll <b>${when(d.last_poll)}</b></span>
        <span>poll period <b>${ms(d.period_ms)}</b> <span class="muted">of ${ms(d.poll_ms)}</span></span>
      </div>`;
    d.points.forEach((p, i) => {
      $(`#v${i}`).textContent = p.text ?? '—';
      $(`#e${i}`).textContent = p.error ?? '';
      $(`#r${i}`).textContent = p.raw ?? '';
      $(`#c${i}`).innerHTML = when(p.changed);
      const c = chart(history.get(p.path) || [], d.time, d.history_ms);
      $(`#g${i}`).innerHTML = c.svg;
      $(`#n${i}`).textContent = c.range;
    });
    $('#commands tbody').innerHTML = d.commands.length
      ? d.commands.map((c) => `<tr data-id="${esc(c.id)}">
          <td>${when(c.at)}</td><td>${esc(c.source)}${c.by ? ` <span class="muted">(${esc(c.by)})</span>` : ''}</td>
          <td class="mono">${esc(c.id ?? '—')}</td><td>${esc(c.kind)}</td>
          <td class="outcome">${badge(c.outcome, c.outcome)}${c.error ? `<div class="err">${esc(c.error)}</div>` : ''}</td>
          <td class="num">${ms(c.ms)}</td>
          <td class="mono">${c.values.map(([p, v]) => `${esc(p)} = ${esc(JSON.stringify(v))}`).join('<br>') || '—'}</td></tr>`).join('')
      : '<tr><td colspan="7" class="muted">No command since the gateway started.</td></tr>';
  }, () => { app.innerHTML = `<p>No device named <b>${esc(name)}</b> runs now. <a href="/console/">Back to the overview</a></p>`; });
}

// A write is the same request as a cloud command's `set`: the gateway checks
// it, writes, reads back and answers; the command list shows it too.
async function write(e, name) {
  e.preventDefault();
  const form = e.target;
  const out = form.nextElementSibling;
  const field = form.elements.value;
  let value = field.value.trim();
  if (field.tagName === 'SELECT') value = JSON.parse(value);
  else if (value !== '' && !Number.isNaN(Number(value))) value = Number(value);
  out.textContent = 'writing…';
  try {
    const r = await fetch(`/console/api/device/${encodeURIComponent(name)}/write`, {
      method: 'POST', headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ path: form.dataset.path, value }),
    });
    const a = await r.json();
    out.innerHTML = `${badge(a.status, a.status)} ${esc(a.error || '')}`;
  } catch (err) {
    out.textContent = `not sent: ${err}`;
  }
}

const m = location.pathname.match(/^\/console\/device\/(.+)$/);
if (m) device(decodeURIComponent(m[1])); else overview();
