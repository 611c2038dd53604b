// Vulcan's web console: a single page over the public HTTP API.
//
// Everything a guest or a user wrote (log lines, args, errors, output) reaches
// the page as text nodes only; this file never assigns HTML. The token, when
// the server needs one, lives in sessionStorage for this tab and travels in an
// Authorization header, never in a URL.
'use strict';

const TOKEN_KEY = 'vulcan.token';
const STATUSES = ['pending', 'running', 'completed', 'failed', 'killed'];
const KINDS = { 'module': 'p1 module', 'wasi-command': 'p2 command', 'vulcan-workload': 'SDK component' };

// ---------------------------------------------------------------- helpers

/** An element with attributes/properties and children (strings become text). */
function el(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === 'class') node.className = value;
    else if (key === 'text') node.textContent = value;
    else if (key === 'dataset') Object.assign(node.dataset, value);
    else if (key.startsWith('on')) node.addEventListener(key.slice(2), value);
    else if (key in node && typeof value !== 'string') node[key] = value;
    else node.setAttribute(key, value === true ? '' : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

function pill(status) {
  return el('span', { class: `pill st-${status}`, text: status, dataset: { status } });
}

function shortHash(hash) {
  return hash ? hash.replace(/^sha256:/, '').slice(0, 12) : '';
}

function duration(ms) {
  if (ms === null || ms === undefined) return '';
  if (ms < 1000) return `${ms} ms`;
  if (ms < 60000) return `${(ms / 1000).toFixed(ms < 10000 ? 2 : 1)} s`;
  const m = Math.floor(ms / 60000);
  return `${m} min ${Math.round((ms % 60000) / 1000)} s`;
}

function bytes(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1 << 20) return `${(n / 1024).toFixed(1)} KiB`;
  return `${(n / (1 << 20)).toFixed(1)} MiB`;
}

function when(ts) {
  if (!ts) return '';
  const d = new Date(ts);
  return Number.isNaN(d.getTime()) ? ts : d.toLocaleString();
}

function rate(n) {
  return n >= 100 ? Math.round(n).toLocaleString() : n.toFixed(n >= 10 ? 1 : 2);
}

// ---------------------------------------------------------------- API

class ApiFailure extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

let tokenPrompt = null;

/** Asks for the token once, however many requests are waiting for it. */
function askToken(refused) {
  if (tokenPrompt) return tokenPrompt;
  const dialog = document.getElementById('token-dialog');
  const form = document.getElementById('token-form');
  const input = document.getElementById('token-input');
  const error = document.getElementById('token-error');
  error.hidden = !refused;
  error.textContent = refused ? 'That token was refused.' : '';
  input.value = '';
  tokenPrompt = new Promise((resolve) => {
    const done = (event) => {
      event.preventDefault();
      const token = input.value.trim();
      if (!token) return;
      sessionStorage.setItem(TOKEN_KEY, token);
      form.removeEventListener('submit', done);
      dialog.close();
      tokenPrompt = null;
      updateSignOut();
      resolve();
    };
    form.addEventListener('submit', done);
    // The token is the only way in; Escape must not leave a blank page.
    dialog.addEventListener('cancel', (event) => event.preventDefault(), { once: true });
  });
  if (!dialog.open) dialog.showModal();
  input.focus();
  return tokenPrompt;
}

function updateSignOut() {
  document.getElementById('sign-out').hidden = !sessionStorage.getItem(TOKEN_KEY);
}

/** fetch() with the tab's token; asks for one when the server says 401. */
async function api(path, options = {}) {
  for (;;) {
    const headers = new Headers(options.headers || {});
    const token = sessionStorage.getItem(TOKEN_KEY);
    if (token) headers.set('Authorization', `Bearer ${token}`);
    const response = await fetch(path, { ...options, headers });
    if (response.status !== 401) return response;
    await response.body?.cancel();
    await askToken(Boolean(token));
  }
}

/** The JSON answer of `path`, or an ApiFailure with the server's message. */
async function apiJson(path, options) {
  const response = await api(path, options);
  const body = await response.json().catch(() => null);
  if (!response.ok) {
    const error = body && body.error ? body.error : {};
    throw new ApiFailure(response.status, error.code || 'error', error.message || response.statusText);
  }
  return body;
}

/**
 * Follows a workload's log over SSE (the same contract as any client):
 * resumes with Last-Event-ID after a dropped connection, so every seq
 * arrives once. Calls onLines with batches, onEnd with the final record.
 */
async function followLog(id, after, { onLines, onEnd, onState, signal }) {
  let last = after;
  let backoff = 250;
  while (!signal.aborted) {
    try {
      const headers = { Accept: 'text/event-stream' };
      if (last !== null) headers['Last-Event-ID'] = String(last);
      const response = await api(`/v1/workloads/${encodeURIComponent(id)}/logs?format=json`, { headers, signal });
      if (!response.ok) {
        const body = await response.json().catch(() => null);
        throw new ApiFailure(response.status, body?.error?.code, body?.error?.message || response.statusText);
      }
      onState('live');
      backoff = 250;
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let buffer = '';
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        const batch = [];
        let cut;
        while ((cut = buffer.indexOf('\n\n')) >= 0) {
          const event = parseEvent(buffer.slice(0, cut));
          buffer = buffer.slice(cut + 2);
          if (event.type === 'end') {
            if (batch.length) onLines(batch);
            onEnd(JSON.parse(event.data));
            return;
          }
          if (event.type === 'error') throw new Error(event.data);
          if (event.data === null) continue; // keep-alive comment
          // Repeats are the viewer's to count and drop: the server's
          // contract is that a resumed stream has none.
          const line = JSON.parse(event.data);
          if (last === null || line.seq > last) last = line.seq;
          batch.push(line);
        }
        if (batch.length) onLines(batch);
      }
    } catch (error) {
      if (signal.aborted) return;
      if (error instanceof ApiFailure && error.status < 500) {
        onState(`error: ${error.message}`);
        return;
      }
    }
    onState('reconnecting…');
    await sleep(backoff);
    backoff = Math.min(backoff * 2, 5000);
  }
}

function parseEvent(text) {
  let type = 'message';
  let data = null;
  for (const line of text.split('\n')) {
    if (line.startsWith(':')) continue;
    const colon = line.indexOf(':');
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? '' : line.slice(colon + 1);
    if (value.startsWith(' ')) value = value.slice(1);
    if (field === 'event') type = value;
    else if (field === 'data') data = data === null ? value : `${data}\n${value}`;
  }
  return { type, data };
}

/** Stored lines from seq `from`, at most `limit` (fewer at the page's byte bound). */
async function readHistory(id, from, limit) {
  const after = from > 0 ? `&after=${from - 1}` : '';
  const page = await apiJson(`/v1/workloads/${encodeURIComponent(id)}/logs/history?limit=${limit}${after}`);
  return page.lines;
}

/** A line as `vulcan logs` prints it. */
function lineText(line) {
  let text = line.level ? `[${line.level}] ${line.line}` : line.line;
  const fields = Object.entries(line.fields || {});
  if (fields.length) text += ` ${fields.map(([k, v]) => `${k}=${v}`).join(' ')}`;
  return text;
}

// ---------------------------------------------------------------- routing

let unmount = () => {};

function navigate(path) {
  window.history.pushState(null, '', path);
  route();
}

function route() {
  unmount();
  unmount = () => {};
  const main = document.getElementById('main');
  main.replaceChildren();
  const path = location.pathname;
  for (const id of ['nav-workloads', 'nav-run', 'nav-modules']) document.getElementById(id).classList.remove('active');
  let match;
  if (path === '/') {
    document.getElementById('nav-workloads').classList.add('active');
    unmount = workloadsPage(main);
  } else if ((match = path.match(/^\/workloads\/([^/]+)$/))) {
    unmount = workloadPage(main, decodeURIComponent(match[1]));
  } else if (path === '/run') {
    document.getElementById('nav-run').classList.add('active');
    unmount = runPage(main);
  } else if (path === '/modules') {
    document.getElementById('nav-modules').classList.add('active');
    unmount = modulesPage(main);
  } else {
    main.append(el('p', { class: 'error', text: `No page at ${path}.` }));
  }
}

document.addEventListener('click', (event) => {
  const link = event.target.closest('a[data-nav]');
  if (!link || event.button !== 0 || event.metaKey || event.ctrlKey || event.shiftKey) return;
  event.preventDefault();
  navigate(link.getAttribute('href'));
});
window.addEventListener('popstate', route);

/** Runs `fn` now and every `ms` while the page is mounted and visible. */
function every(ms, fn) {
  let stopped = false;
  let timer = null;
  const tick = async () => {
    if (stopped) return;
    if (document.visibilityState !== 'hidden') {
      try {
        await fn();
      } catch (error) {
        showConn(`error: ${error.message}`);
      }
    }
    if (!stopped) timer = setTimeout(tick, ms);
  };
  tick();
  return () => {
    stopped = true;
    clearTimeout(timer);
  };
}

function showConn(text) {
  document.getElementById('conn').textContent = text;
}

// ---------------------------------------------------------------- workloads

const PAGE_SIZE = 50;

function workloadsPage(main) {
  const params = new URLSearchParams(location.search);
  let status = STATUSES.includes(params.get('status')) ? params.get('status') : '';
  let offset = Math.max(0, Number.parseInt(params.get('offset') || '0', 10) || 0);
  const seen = new Set();
  let first = true;

  const health = healthPanel();
  const filter = el('select', { id: 'status-filter', 'aria-label': 'Status' },
    el('option', { value: '', text: 'All statuses' }),
    STATUSES.map((s) => el('option', { value: s, text: s })));
  filter.value = status;
  const summary = el('span', { class: 'muted', id: 'list-summary' });
  const prev = el('button', { type: 'button', text: '← Newer', id: 'page-prev' });
  const next = el('button', { type: 'button', text: 'Older →', id: 'page-next' });
  const head = el('tr', {});
  const body = el('tbody', { id: 'workload-rows' });
  const table = el('table', { id: 'workloads' }, el('thead', {}, head), body);
  const empty = el('p', { class: 'muted', hidden: true, text: 'No workloads yet. Run one from the Run page.' });
  main.append(
    health.node,
    el('h1', {}, 'Workloads'),
    el('div', { class: 'toolbar' }, filter, summary, el('span', { class: 'spacer' }), el('a', { href: '/run', 'data-nav': true, text: 'Run a workload →' })),
    table, empty,
    el('div', { class: 'pager' }, prev, next));

  const setUrl = () => {
    const q = new URLSearchParams();
    if (status) q.set('status', status);
    if (offset) q.set('offset', String(offset));
    window.history.replaceState(null, '', q.toString() ? `/?${q}` : '/');
  };
  filter.addEventListener('change', () => {
    status = filter.value;
    offset = 0;
    setUrl();
    refresh();
  });
  prev.addEventListener('click', () => { offset = Math.max(0, offset - PAGE_SIZE); setUrl(); refresh(); });
  next.addEventListener('click', () => { offset += PAGE_SIZE; setUrl(); refresh(); });

  let columnsWithNode = null;
  const rows = new Map();
  async function refresh() {
    const q = new URLSearchParams({ limit: String(PAGE_SIZE), offset: String(offset) });
    if (status) q.set('status', status);
    const page = await apiJson(`/v1/workloads?${q}`);
    showConn('');
    const clustered = page.items.some((w) => w.node);
    if (columnsWithNode !== clustered) {
      columnsWithNode = clustered;
      head.replaceChildren(...['ID', 'Status', 'Exit', 'Duration', 'Lines', 'Module', ...(clustered ? ['Node'] : []), 'Created']
        .map((name) => el('th', { class: ['Exit', 'Duration', 'Lines'].includes(name) ? 'num' : '', text: name })));
      rows.clear();
    }
    const order = [];
    for (const w of page.items) {
      let row = rows.get(w.id);
      if (!row) {
        row = workloadRow(w.id, clustered);
        rows.set(w.id, row);
        if (!first && !seen.has(w.id)) row.node.classList.add('fresh');
      }
      seen.add(w.id);
      row.update(w);
      order.push(row.node);
    }
    for (const [id, row] of rows) if (!order.includes(row.node)) rows.delete(id);
    body.replaceChildren(...order);
    // Lets a benchmark read when the table was first drawn.
    if (first) performance.mark('vulcan:workloads-drawn');
    first = false;
    empty.hidden = page.total > 0;
    const end = Math.min(offset + page.items.length, page.total);
    summary.textContent = page.total ? `${offset + 1}–${end} of ${page.total.toLocaleString()}` : '';
    prev.disabled = offset === 0;
    next.disabled = end >= page.total;
  }

  const stopList = every(1000, refresh);
  return () => {
    stopList();
    health.stop();
  };
}

function workloadRow(id, clustered) {
  const cells = {
    id: el('td', { class: 'mono' }, el('a', { href: `/workloads/${encodeURIComponent(id)}`, 'data-nav': true, text: id })),
    status: el('td', {}),
    exit: el('td', { class: 'num' }),
    duration: el('td', { class: 'num' }),
    lines: el('td', { class: 'num' }),
    module: el('td', { class: 'mono' }),
    node: clustered ? el('td', { class: 'mono' }) : null,
    created: el('td', { class: 'muted' }),
  };
  const node = el('tr', { dataset: { id } }, Object.values(cells).filter(Boolean));
  let last = '';
  return {
    node,
    update(w) {
      const key = JSON.stringify(w);
      if (key === last && w.status !== 'running') return;
      last = key;
      node.dataset.status = w.status;
      cells.status.replaceChildren(pill(w.status));
      cells.exit.textContent = w.exit_code ?? '';
      cells.duration.textContent = w.status === 'running' && w.started_at
        ? `${duration(Math.max(0, Date.now() - Date.parse(w.started_at)))}…`
        : duration(w.duration_ms);
      // A live record's count is not kept up to date on a single node.
      const live = ['pending', 'running'].includes(w.status);
      cells.lines.textContent = live ? '' : (w.line_count ?? 0).toLocaleString();
      cells.module.textContent = shortHash(w.module);
      cells.module.title = w.module;
      if (cells.node) cells.node.textContent = w.node ?? '';
      cells.created.textContent = when(w.created_at);
      node.title = w.error || '';
    },
  };
}

// ---------------------------------------------------------------- health

function healthPanel() {
  const running = el('b', { id: 'health-running', text: '–' });
  const workloads = el('b', { id: 'health-workloads', text: '–' });
  const lines = el('b', { id: 'health-lines', text: '–' });
  const canvas = el('canvas', { class: 'chart', id: 'health-chart', width: 600, height: 80 });
  const node = el('section', { class: 'panel', id: 'health' },
    el('div', { class: 'health' },
      el('div', { class: 'figure' }, running, el('span', { text: 'running now' })),
      el('div', { class: 'figure' }, workloads, el('span', { text: 'workloads/s (last 10 s)' })),
      el('div', { class: 'figure' }, lines, el('span', { text: 'lines/s (last 10 s)' })),
      el('div', {}, canvas, el('div', { class: 'legend' },
        el('span', {}, el('i', { class: 'k-w' }), 'workloads/s'),
        el('span', {}, el('i', { class: 'k-l' }), 'lines/s (own scale)'),
        el('span', { class: 'span' })))));
  node.querySelector('.k-w').style.background = '#ea580c';
  node.querySelector('.k-l').style.background = '#2563eb';
  const stop = every(2000, async () => {
    let stats;
    try {
      stats = await apiJson('/v1/stats');
    } catch (error) {
      // Server-wide figures are for admins; a tenant's console goes without.
      if (error.status !== 403) throw error;
      node.hidden = true;
      return;
    }
    const samples = stats.samples;
    const recent = samples.slice(-10);
    const per = (key) => recent.reduce((sum, s) => sum + s[key], 0) / Math.max(1, recent.length);
    running.textContent = samples.length ? samples[samples.length - 1].running : '0';
    workloads.textContent = rate(per('workloads'));
    lines.textContent = rate(per('lines'));
    drawChart(canvas, samples);
  });
  return { node, stop };
}

function drawChart(canvas, samples) {
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth || 600;
  const height = canvas.clientHeight || 80;
  canvas.width = Math.round(width * ratio);
  canvas.height = Math.round(height * ratio);
  const g = canvas.getContext('2d');
  g.scale(ratio, ratio);
  g.clearRect(0, 0, width, height);
  g.strokeStyle = '#e5e7eb';
  g.beginPath();
  g.moveTo(0, height - 0.5);
  g.lineTo(width, height - 0.5);
  g.stroke();
  // A young server's few samples fill the chart; it widens to ten minutes.
  const span = Math.max(60, samples.length);
  const minutes = span / 60;
  canvas.parentElement.querySelector('.span').textContent =
    minutes >= 2 ? `last ${Math.round(minutes)} minutes` : `last ${span} s`;
  const series = (key, color) => {
    const max = Math.max(1, ...samples.map((s) => s[key]));
    g.strokeStyle = color;
    g.lineWidth = 1.5;
    g.beginPath();
    samples.forEach((s, i) => {
      const x = width - ((samples.length - 1 - i) / (span - 1)) * width;
      const y = height - 2 - (s[key] / max) * (height - 6);
      if (i === 0) g.moveTo(x, y);
      else g.lineTo(x, y);
    });
    g.stroke();
  };
  series('lines', '#2563eb');
  series('workloads', '#ea580c');
}

// ---------------------------------------------------------------- one workload

function workloadPage(main, id) {
  const controller = new AbortController();
  const title = el('h1', {}, el('span', { class: 'mono', text: id }));
  const statusSlot = el('span', { id: 'workload-status' });
  const kill = el('button', { type: 'button', class: 'danger', id: 'kill', text: 'Kill', disabled: true });
  const download = el('button', { type: 'button', id: 'download', text: 'Download log' });
  const message = el('p', { class: 'error', hidden: true });
  const record = el('section', { class: 'panel', id: 'record' }, el('p', { class: 'muted', text: 'Loading…' }));
  const viewer = new LogView(id, controller.signal);
  title.append(statusSlot, el('span', { class: 'spacer' }), kill, download);
  main.append(title, message, record, viewer.node);

  let current = null;
  const show = (w) => {
    current = w;
    statusSlot.replaceChildren(pill(w.status));
    kill.disabled = !['pending', 'running'].includes(w.status);
    record.replaceChildren(...recordDetails(w));
    viewer.ended(w);
  };
  const fail = (error) => {
    message.hidden = false;
    message.textContent = error.message;
  };

  kill.addEventListener('click', async () => {
    kill.disabled = true;
    try {
      const response = await api(`/v1/workloads/${encodeURIComponent(id)}`, { method: 'DELETE' });
      const body = await response.json().catch(() => null);
      if (response.status === 200 && body && body.id) show(body);
      else if (!response.ok && response.status !== 409) fail(new Error(body?.error?.message || response.statusText));
    } catch (error) {
      fail(error);
    }
  });
  download.addEventListener('click', () => downloadLog(id, download).catch(fail));

  (async () => {
    let w;
    try {
      w = await apiJson(`/v1/workloads/${encodeURIComponent(id)}`);
    } catch (error) {
      record.replaceChildren(el('p', { class: 'error', text: error.status === 404 ? `No workload ${id}.` : error.message }));
      viewer.node.hidden = true;
      return;
    }
    show(w);
    const ended = !['pending', 'running'].includes(w.status);
    // A finished log is paged from history; a live one is followed from
    // its start (the viewer keeps only a window of it in memory).
    const after = ended ? Math.max(0, w.line_count) - 1 : null;
    if (ended) viewer.grow(w.line_count);
    followLog(id, after >= 0 ? after : null, {
      signal: controller.signal,
      onLines: (lines) => viewer.add(lines),
      onEnd: (final) => show(final),
      onState: (state) => viewer.state(state),
    });
    // Pending → running is not a log event: look again until it ends.
    const poll = every(1000, async () => {
      if (!current || !['pending', 'running'].includes(current.status)) return;
      const again = await apiJson(`/v1/workloads/${encodeURIComponent(id)}`);
      if (again.status !== current.status && ['pending', 'running'].includes(again.status)) show(again);
    });
    controller.signal.addEventListener('abort', poll);
  })();

  return () => {
    controller.abort();
    viewer.destroy();
  };
}

function recordDetails(w) {
  const short = [];
  const wide = [];
  const add = (label, value, isWide) => {
    if (value === undefined || value === null || value === '') return;
    const cls = isWide ? 'wide' : undefined;
    (isWide ? wide : short).push(el('dt', { class: cls, text: label }), el('dd', { class: cls }, value));
  };
  const number = (n) => (n === undefined || n === null ? null : String(n));
  add('Status', pill(w.status));
  add('Exit code', number(w.exit_code));
  add('Failure', w.failure);
  add('Duration', duration(w.duration_ms));
  // A live workload's count is the log viewer's; the record has it once ended.
  if (!['pending', 'running'].includes(w.status)) add('Lines', (w.line_count ?? 0).toLocaleString());
  add('Node', w.node);
  add('Attempt', number(w.attempt));
  add('Log level', w.log_level);
  add('Created', when(w.created_at));
  add('Started', when(w.started_at));
  add('Finished', when(w.finished_at));
  add('Error', w.error ? el('pre', { class: 'text', id: 'record-error', text: w.error }) : null, true);
  // A retried workload's earlier attempts, each with its lines' seqs.
  if (w.attempts && w.attempts.length) {
    const rows = w.attempts.map((a) => {
      const last = a.first_seq + a.lines - 1;
      const lines = !a.lines ? 'no lines' : a.lines === 1 ? `line ${last}` : `lines ${a.first_seq}–${last}`;
      const why = (a.error || '').split('\n')[0];
      return `attempt ${a.attempt}: ${a.failure || 'failed'} after ${duration(a.duration_ms)}, ${lines}${why ? ` — ${why}` : ''}`;
    });
    add('Earlier attempts', el('pre', { class: 'text', id: 'record-attempts', text: rows.join('\n') }), true);
  }
  add('Module', el('span', {}, el('code', { text: w.module }), ' ',
    el('a', { href: `/run?module=${encodeURIComponent(w.module)}`, 'data-nav': true, text: 'run again' })), true);
  if (w.args && w.args.length) add('Args', el('code', { id: 'record-args', text: JSON.stringify(w.args) }), true);
  const limits = Object.entries(w.limits || {}).map(([k, v]) => `${k}=${v}`).join('  ');
  add('Limits', limits ? el('code', { text: limits }) : null, true);
  if (w.allowed_hosts && w.allowed_hosts.length) add('Allowed hosts', el('code', { text: JSON.stringify(w.allowed_hosts) }), true);
  if (w.output !== undefined) add('Output', el('pre', { class: 'text', id: 'record-output', text: JSON.stringify(w.output, null, 2) }), true);
  if (w.output_text !== undefined) add('Output', el('pre', { class: 'text', id: 'record-output', text: w.output_text }), true);
  if (w.output_base64 !== undefined) add('Output (base64)', el('pre', { class: 'text', text: w.output_base64 }), true);
  return [el('dl', { class: 'grid' }, short, wide)];
}

async function downloadLog(id, button) {
  const label = button.textContent;
  button.disabled = true;
  try {
    const parts = [];
    let from = 0;
    for (;;) {
      const lines = await readHistory(id, from, 10000);
      if (!lines.length) break;
      for (const line of lines) parts.push(lineText(line), line.continued ? '' : '\n');
      from = lines[lines.length - 1].seq + 1;
      button.textContent = `Downloading… ${from.toLocaleString()} lines`;
    }
    const url = URL.createObjectURL(new Blob(parts, { type: 'text/plain;charset=utf-8' }));
    const a = el('a', { href: url, download: `${id}.log` });
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  } finally {
    button.disabled = false;
    button.textContent = label;
  }
}

// ---------------------------------------------------------------- log viewer

/** Lines fetched or received per cache page. */
const LOG_PAGE = 500;
/** Pages kept in memory at most (the rest are fetched again when shown). */
const LOG_PAGES_KEPT = 80;
/** Tallest scroll area; longer logs map the scrollbar onto line numbers. */
const MAX_SCROLL = 8_000_000;
const ROW = 20;

/**
 * A log of any length in a fixed number of DOM rows: only the visible lines
 * are rendered, and only a window of pages is held in memory.
 */
class LogView {
  constructor(id, signal) {
    this.id = id;
    this.signal = signal;
    this.count = 0;
    this.pages = new Map();
    this.loading = new Set();
    this.follow = true;
    this.match = null;
    this.query = '';
    this.frame = 0;
    this.liveNext = undefined;
    this.liveGaps = 0;
    this.liveRepeats = 0;
    this.reconnects = 0;
    this.ours = null; // the scrollTop the viewer itself set last

    this.stateText = el('span', { class: 'muted', id: 'log-state' });
    this.countText = el('span', { class: 'muted', id: 'log-count', text: '0 lines' });
    this.followBox = el('input', { type: 'checkbox', id: 'log-follow', checked: true });
    this.search = el('input', { type: 'search', id: 'log-search', placeholder: 'Search the log', size: 28 });
    this.found = el('span', { class: 'muted', id: 'log-found' });
    const prev = el('button', { type: 'button', id: 'log-prev', text: '↑' , title: 'Previous match' });
    const next = el('button', { type: 'button', id: 'log-next', text: '↓', title: 'Next match' });
    this.rows = el('div', { class: 'log-rows' });
    this.spacer = el('div', { class: 'log-spacer' }, this.rows);
    this.empty = el('div', { class: 'log-empty', text: 'No lines yet.' });
    this.scroller = el('div', { class: 'log', id: 'log', tabindex: 0 }, this.spacer, this.empty);
    this.whole = el('pre', { class: 'text whole', id: 'log-whole', hidden: true });
    this.node = el('section', { class: 'panel' },
      el('div', { class: 'toolbar' },
        el('h2', { text: 'Log' }), this.countText, this.stateText, el('span', { class: 'spacer' }),
        this.search, prev, next, this.found,
        el('label', {}, this.followBox, ' follow')),
      this.scroller, this.whole);

    this.pool = [];
    this.scroller.addEventListener('scroll', () => this.onScroll());
    this.followBox.addEventListener('change', () => {
      this.follow = this.followBox.checked;
      if (this.follow) this.toBottom();
    });
    this.search.addEventListener('keydown', (e) => {
      if (e.key === 'Enter') this.find(e.shiftKey ? -1 : 1);
    });
    this.search.addEventListener('input', () => {
      this.query = this.search.value;
      this.match = null;
      this.found.textContent = '';
      this.schedule();
    });
    prev.addEventListener('click', () => this.find(-1));
    next.addEventListener('click', () => this.find(1));
    this.rows.addEventListener('click', (e) => {
      const row = e.target.closest('.row');
      if (!row || row.dataset.seq === undefined) return;
      const line = this.line(Number(row.dataset.seq));
      this.whole.hidden = !line;
      if (line) this.whole.textContent = `#${line.seq} ${line.stream} ${line.ts}\n${lineText(line)}`;
    });
    this.resize = new ResizeObserver(() => this.schedule());
    this.resize.observe(this.scroller);
  }

  destroy() {
    this.resize.disconnect();
    cancelAnimationFrame(this.frame);
  }

  state(text) {
    if (text === 'reconnecting…') this.reconnects++;
    this.stateText.textContent = text === 'live' ? '' : text;
  }

  ended(w) {
    if (!['pending', 'running'].includes(w.status)) {
      this.grow(w.line_count || 0);
      this.stateText.textContent = '';
    }
  }

  grow(count) {
    if (count > this.count) {
      this.count = count;
      this.schedule();
    }
  }

  /** Lines from the live stream, in seq order. */
  add(lines) {
    for (const line of lines) {
      // What the stream delivered, kept on the element for anyone checking
      // the contract: the next seq expected, seqs that came again (dropped)
      // and how often one was not the next.
      if (this.liveNext !== undefined && line.seq < this.liveNext) {
        this.liveRepeats++;
        continue;
      }
      if (this.liveNext !== undefined && line.seq !== this.liveNext) this.liveGaps++;
      this.liveNext = line.seq + 1;
      const no = Math.floor(line.seq / LOG_PAGE);
      let page = this.pages.get(no);
      if (!page) {
        // Keep what the viewer may show soon: the tail (followed) and the
        // pages on screen; anything else is fetched again when scrolled to.
        if (!this.follow && !this.nearView(no)) {
          this.count = Math.max(this.count, line.seq + 1);
          continue;
        }
        page = new Array(LOG_PAGE);
        this.pages.set(no, page);
        this.evict();
      }
      page[line.seq % LOG_PAGE] = line;
      if (line.seq + 1 > this.count) this.count = line.seq + 1;
    }
    this.schedule();
  }

  line(seq) {
    const page = this.pages.get(Math.floor(seq / LOG_PAGE));
    return page ? page[seq % LOG_PAGE] : undefined;
  }

  nearView(no) {
    const [first, last] = this.visibleRange();
    return no >= Math.floor(first / LOG_PAGE) - 1 && no <= Math.floor(last / LOG_PAGE) + 1;
  }

  evict() {
    if (this.pages.size <= LOG_PAGES_KEPT) return;
    const [first] = this.visibleRange();
    const here = Math.floor(first / LOG_PAGE);
    const tail = Math.floor(Math.max(0, this.count - 1) / LOG_PAGE);
    const byDistance = [...this.pages.keys()]
      .filter((no) => no !== tail && Math.abs(no - here) > 1)
      .sort((a, b) => Math.abs(b - here) - Math.abs(a - here));
    for (const no of byDistance.slice(0, this.pages.size - LOG_PAGES_KEPT)) this.pages.delete(no);
  }

  /** Fetches the missing lines of one page from history. */
  async load(no) {
    if (this.loading.has(no) || this.signal.aborted) return;
    const start = no * LOG_PAGE;
    const end = Math.min(this.count, start + LOG_PAGE);
    let page = this.pages.get(no);
    let from = start;
    while (from < end && page && page[from - start]) from++;
    if (from >= end) return;
    this.loading.add(no);
    try {
      const lines = await readHistory(this.id, from, end - from);
      page = this.pages.get(no);
      if (!page) {
        page = new Array(LOG_PAGE);
        this.pages.set(no, page);
        this.evict();
      }
      for (const line of lines) if (line.seq < start + LOG_PAGE) page[line.seq - start] = line;
    } catch (error) {
      this.stateText.textContent = `could not read lines: ${error.message}`;
    } finally {
      this.loading.delete(no);
    }
    this.schedule();
  }

  height() {
    return Math.min(this.count * ROW, MAX_SCROLL);
  }

  /** First (fractional) line at the top of the view. */
  topLine() {
    const view = this.scroller.clientHeight;
    const total = this.count * ROW;
    if (total <= MAX_SCROLL) return this.scroller.scrollTop / ROW;
    const room = Math.max(1, MAX_SCROLL - view);
    const lines = Math.max(0, this.count - view / ROW);
    return (Math.min(this.scroller.scrollTop, room) / room) * lines;
  }

  visibleRange() {
    const top = Math.floor(this.topLine());
    const rows = Math.ceil(this.scroller.clientHeight / ROW) + 1;
    return [top, Math.min(this.count, top + rows) - 1];
  }

  scrollToLine(seq) {
    const view = this.scroller.clientHeight;
    const target = Math.max(0, seq - Math.floor(view / ROW / 2));
    const total = this.count * ROW;
    let top;
    if (total <= MAX_SCROLL) top = target * ROW;
    else top = (target / Math.max(1, this.count - view / ROW)) * (MAX_SCROLL - view);
    this.setFollow(false);
    this.scrollTo(top);
    this.schedule();
  }

  toBottom() {
    this.scrollTo(this.scroller.scrollHeight - this.scroller.clientHeight);
  }

  /** Scrolls without it counting as the user's scroll (which sets follow). */
  scrollTo(top) {
    this.scroller.scrollTop = top;
    this.ours = this.scroller.scrollTop;
  }

  setFollow(on) {
    this.follow = on;
    this.followBox.checked = on;
  }

  onScroll() {
    // Compared by position, not by a flag: a scroll the viewer set may
    // fire no event (same position), and must not swallow the user's next.
    if (this.ours !== null && Math.abs(this.scroller.scrollTop - this.ours) <= 1) {
      this.ours = null;
    } else {
      const atBottom = this.scroller.scrollTop + this.scroller.clientHeight >= this.scroller.scrollHeight - 2;
      this.setFollow(atBottom);
    }
    this.schedule();
  }

  schedule() {
    if (!this.frame) this.frame = requestAnimationFrame(() => {
      this.frame = 0;
      this.render();
    });
  }

  render() {
    Object.assign(this.scroller.dataset, {
      liveNext: this.liveNext ?? 0,
      liveGaps: this.liveGaps,
      liveRepeats: this.liveRepeats,
      reconnects: this.reconnects,
    });
    this.spacer.style.height = `${this.height()}px`;
    this.empty.hidden = this.count > 0;
    this.countText.textContent = `${this.count.toLocaleString()} line${this.count === 1 ? '' : 's'}`;
    if (this.follow && this.count) {
      const bottom = this.scroller.scrollHeight - this.scroller.clientHeight;
      if (Math.abs(this.scroller.scrollTop - bottom) > 1) this.scrollTo(bottom);
    }
    const exact = this.topLine();
    const first = Math.floor(exact);
    const wanted = Math.min(this.count - first, Math.ceil(this.scroller.clientHeight / ROW) + 1);
    const offset = this.count * ROW <= MAX_SCROLL ? first * ROW : this.scroller.scrollTop - (exact - first) * ROW;
    this.rows.style.transform = `translateY(${Math.max(0, offset)}px)`;
    while (this.pool.length < wanted) {
      const row = el('div', { class: 'row' },
        el('span', { class: 'seq' }), el('span', { class: 'tag' }), el('span', { class: 'txt' }));
      this.pool.push(row);
      this.rows.append(row);
    }
    const needed = new Set();
    const query = this.query.toLowerCase();
    this.pool.forEach((row, i) => {
      const seq = first + i;
      if (i >= wanted) {
        row.hidden = true;
        return;
      }
      row.hidden = false;
      const line = this.line(seq);
      row.dataset.seq = String(seq);
      row.children[0].textContent = String(seq);
      const text = row.children[2];
      if (!line) {
        needed.add(Math.floor(seq / LOG_PAGE));
        row.className = 'row missing';
        row.children[1].textContent = '';
        text.textContent = '…';
        return;
      }
      row.className = `row s-${line.stream}${line.level ? ` l-${line.level}` : ''}${line.continued ? ' cont' : ''}${seq === this.match ? ' hit' : ''}`;
      row.children[1].textContent = line.level || line.stream;
      const shown = lineText(line).replace(/^\[[a-z]+\] /, line.level ? '' : '$&');
      const at = query ? shown.toLowerCase().indexOf(query) : -1;
      if (at < 0) {
        text.textContent = shown;
      } else {
        text.replaceChildren(shown.slice(0, at), el('mark', { text: shown.slice(at, at + query.length) }), shown.slice(at + query.length));
      }
    });
    for (const no of needed) this.load(no);
  }

  /** Moves to the next (dir 1) or previous (-1) line containing the query. */
  async find(dir) {
    const query = this.search.value.toLowerCase();
    if (!query) return;
    const token = (this.searching = {});
    const [top] = this.visibleRange();
    let at = this.match !== null ? this.match + dir : dir > 0 ? top : Math.max(0, top - 1);
    const CHUNK = 5000;
    this.found.textContent = 'searching…';
    try {
      while (at >= 0 && at < this.count) {
        const from = dir > 0 ? at : Math.max(0, at - CHUNK + 1);
        const lines = await readHistory(this.id, from, dir > 0 ? CHUNK : at - from + 1);
        if (this.searching !== token || this.signal.aborted) return;
        if (!lines.length) break;
        const ordered = dir > 0 ? lines : lines.slice().reverse();
        const hit = ordered.find((l) => (dir > 0 ? l.seq >= at : l.seq <= at) && lineText(l).toLowerCase().includes(query));
        if (hit) {
          this.match = hit.seq;
          this.found.textContent = `line ${hit.seq.toLocaleString()}`;
          this.scrollToLine(hit.seq);
          return;
        }
        at = dir > 0 ? lines[lines.length - 1].seq + 1 : from - 1;
        this.found.textContent = `searching… ${at.toLocaleString()}`;
      }
      this.found.textContent = dir > 0 ? 'no more matches below' : 'no more matches above';
    } catch (error) {
      this.found.textContent = error.message;
    }
  }
}

// ---------------------------------------------------------------- run

function runPage(main) {
  const params = new URLSearchParams(location.search);
  let file = null;
  const fileInput = el('input', { type: 'file', id: 'run-file', accept: '.wasm,application/wasm' });
  const fileName = el('span', { id: 'run-file-name', class: 'mono' });
  const drop = el('div', { class: 'drop', id: 'run-drop' },
    'Drop a .wasm here, or ', fileInput, ' ', fileName);
  const moduleSelect = el('select', { id: 'run-module' }, el('option', { value: '', text: '— or an uploaded module —' }));
  const args = el('textarea', { id: 'run-args', placeholder: 'one argument per line' });
  const env = el('textarea', { id: 'run-env', placeholder: 'KEY=value, one per line' });
  const inputKind = el('select', { id: 'run-input-kind' },
    el('option', { value: 'none', text: 'no input' }),
    el('option', { value: 'stdin', text: 'stdin (text)' }),
    el('option', { value: 'input', text: 'SDK input (JSON)' }));
  const input = el('textarea', { id: 'run-input', placeholder: 'stdin text, or the SDK workload\'s JSON input' });
  const limit = (id, label, placeholder) => el('label', {}, label, el('input', { id, type: 'number', min: 1, placeholder }));
  const limits = el('div', { class: 'limits' },
    limit('run-timeout', 'timeout (ms)', 'server default'),
    limit('run-memory', 'max memory (MiB)', 'server default'),
    limit('run-fuel', 'fuel', 'unlimited'),
    limit('run-output', 'max output (bytes)', 'server default'));
  const logLevel = el('select', { id: 'run-log-level' },
    ['', 'trace', 'debug', 'info', 'warn', 'error'].map((l) => el('option', { value: l, text: l || 'all SDK log records' })));
  const error = el('p', { class: 'error', id: 'run-error', hidden: true });
  const submit = el('button', { type: 'submit', class: 'primary', id: 'run-submit', text: 'Run' });
  const form = el('form', { class: 'panel', id: 'run-form' },
    el('div', { class: 'form' },
      el('label', { text: 'Module' }), el('div', {}, drop, el('div', { class: 'toolbar' }), moduleSelect),
      el('label', { for: 'run-args', text: 'Arguments' }), args,
      el('label', { for: 'run-env', text: 'Environment' }), env,
      el('label', { text: 'Input' }), el('div', {}, inputKind, input),
      el('label', { text: 'Limits' }), limits,
      el('label', { for: 'run-log-level', text: 'SDK log level' }), logLevel),
    error,
    el('div', { class: 'actions' }, submit));
  main.append(el('h1', { text: 'Run a workload' }), form);

  const choose = (f) => {
    file = f || null;
    fileName.textContent = file ? bytes(file.size) : '';
    if (file) moduleSelect.value = '';
  };
  fileInput.addEventListener('change', () => choose(fileInput.files[0]));
  drop.addEventListener('dragover', (e) => { e.preventDefault(); drop.classList.add('over'); });
  drop.addEventListener('dragleave', () => drop.classList.remove('over'));
  drop.addEventListener('drop', (e) => {
    e.preventDefault();
    drop.classList.remove('over');
    choose(e.dataTransfer.files[0]);
  });
  moduleSelect.addEventListener('change', () => {
    if (moduleSelect.value) {
      file = null;
      fileInput.value = '';
      fileName.textContent = '';
    }
  });

  apiJson('/v1/modules').then((list) => {
    for (const m of list.items) {
      moduleSelect.append(el('option', { value: m.hash, text: `${shortHash(m.hash)} · ${KINDS[m.kind] || m.kind} · ${bytes(m.size)}` }));
    }
    const wanted = params.get('module');
    if (wanted && list.items.some((m) => m.hash === wanted)) moduleSelect.value = wanted;
  }).catch((e) => { error.hidden = false; error.textContent = e.message; });

  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    error.hidden = true;
    submit.disabled = true;
    try {
      const spec = buildSpec();
      if (file) {
        submit.textContent = 'Uploading…';
        const uploaded = await apiJson('/v1/modules', {
          method: 'POST',
          headers: { 'Content-Type': 'application/wasm' },
          body: file,
        });
        spec.module = uploaded.hash;
      } else if (moduleSelect.value) {
        spec.module = moduleSelect.value;
      } else {
        throw new Error('Choose a .wasm file or an uploaded module.');
      }
      submit.textContent = 'Starting…';
      const started = await apiJson('/v1/workloads/async', {
        method: 'POST',
        headers: { 'Content-Type': 'application/json' },
        body: JSON.stringify(spec),
      });
      navigate(`/workloads/${encodeURIComponent(started.id)}`);
    } catch (e) {
      error.hidden = false;
      error.textContent = e.message;
    } finally {
      submit.disabled = false;
      submit.textContent = 'Run';
    }
  });

  function buildSpec() {
    const spec = {};
    const lines = (text) => text.split('\n').map((l) => l.replace(/\r$/, '')).filter((l) => l !== '');
    spec.args = lines(args.value);
    spec.env = {};
    for (const pair of lines(env.value)) {
      const eq = pair.indexOf('=');
      if (eq <= 0) throw new Error(`Environment lines are KEY=value: ${pair}`);
      spec.env[pair.slice(0, eq)] = pair.slice(eq + 1);
    }
    if (inputKind.value === 'stdin') spec.stdin = input.value;
    if (inputKind.value === 'input') {
      try {
        spec.input = JSON.parse(input.value);
      } catch (e) {
        throw new Error(`The SDK input is not JSON: ${e.message}`);
      }
    }
    const number = (id) => {
      const v = document.getElementById(id).value.trim();
      return v === '' ? undefined : Number(v);
    };
    spec.limits = {
      timeout_ms: number('run-timeout'),
      max_memory_mb: number('run-memory'),
      fuel: number('run-fuel'),
      max_output_bytes: number('run-output'),
    };
    if (logLevel.value) spec.log_level = logLevel.value;
    return spec;
  }

  return () => {};
}

// ---------------------------------------------------------------- modules

function modulesPage(main) {
  const body = el('tbody', { id: 'module-rows' });
  const note = el('p', { class: 'muted' });
  main.append(el('h1', { text: 'Modules' }),
    el('table', { id: 'modules' },
      el('thead', {}, el('tr', {}, ['Hash', 'Kind', 'Size', 'First seen', ''].map((h) => el('th', { class: h === 'Size' ? 'num' : '', text: h })))),
      body),
    note);
  apiJson('/v1/modules').then((list) => {
    body.replaceChildren(...list.items.map((m) => el('tr', { dataset: { hash: m.hash } },
      el('td', { class: 'mono', title: m.hash, text: shortHash(m.hash) }),
      el('td', { text: KINDS[m.kind] || m.kind }),
      el('td', { class: 'num', text: bytes(m.size) }),
      el('td', { class: 'muted', text: when(m.created_at) }),
      el('td', {}, el('a', { href: `/run?module=${encodeURIComponent(m.hash)}`, 'data-nav': true, text: 'Run' })))));
    note.textContent = list.items.length ? '' : 'No modules yet: upload one from the Run page.';
  }).catch((e) => {
    note.className = 'error';
    note.textContent = e.message;
  });
  return () => {};
}

// ---------------------------------------------------------------- start

document.getElementById('sign-out').addEventListener('click', () => {
  sessionStorage.removeItem(TOKEN_KEY);
  updateSignOut();
  route();
});
updateSignOut();
route();
