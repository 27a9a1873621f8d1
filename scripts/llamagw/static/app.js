// llama gateway dashboard. Vanilla JS, no dependencies, served under a strict CSP.
// Every value from the server is rendered as text (textContent / createTextNode), never as
// markup; the page never assigns HTML strings (Trusted Types are required by the CSP).
'use strict';

(() => {
  const SVG_NS = 'http://www.w3.org/2000/svg';
  const HISTORY_MAX = 3600;        // metrics points kept: one hour at 1 Hz
  const CHART_WINDOW_MS = 3600e3;  // charts show the last hour at most
  const ACTIVITY_MAX = 500;        // request rows kept and shown
  const LOG_KEEP = 2000;           // log lines kept in memory
  const LOG_SHOW = 500;            // log lines in the DOM
  const STALE_MS = 5000;           // no event for this long: the channel is stale
  const BACKOFF_MIN = 1000, BACKOFF_MAX = 30000;

  const $ = (id) => document.getElementById(id);
  const state = {
    session: null, view: null, models: [], mode: '', modelsMax: null,
    pending: new Map(), history: [], requests: [], errors: [], logs: [],
    logsLoaded: false, usageRange: 'today', activityPaused: false, keys: [],
  };
  let es = null, backoff = BACKOFF_MIN, reconnectTimer = 0, lastEventAt = 0, staleSince = 0;
  let systemTimer = 0, chartsDirty = true;

  // ---- DOM helpers (text only) -----------------------------------------------------------
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    if (attrs) {
      for (const [name, value] of Object.entries(attrs)) {
        if (value === undefined || value === null || value === false) continue;
        if (name === 'class') node.className = value;
        else if (name === 'text') node.textContent = String(value);
        else if (name.startsWith('on')) throw new Error('no handlers through el()');
        else node.setAttribute(name, String(value));
      }
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }
  function svg(tag, attrs, text) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, String(value));
    if (text !== undefined) node.textContent = String(text);
    return node;
  }
  function setText(id, value) { $(id).textContent = value === null || value === undefined ? '–' : String(value); }
  function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); }
  // data-label on each cell (from the table's head): phones show rows as cards with labels.
  function labelRow(tr, table) {
    const heads = Array.from($(table).tHead.rows[0].cells, (th) => th.textContent);
    Array.from(tr.cells).forEach((cell, i) => { if (heads[i]) cell.setAttribute('data-label', heads[i]); });
    return tr;
  }
  function td(value, cls, title) { return el('td', { class: cls, title }, value === null || value === undefined || value === '' ? '–' : value); }

  // ---- formatting ------------------------------------------------------------------------
  const nf = new Intl.NumberFormat();
  function num(v, digits) {
    if (v === null || v === undefined || Number.isNaN(Number(v))) return '–';
    const n = Number(v);
    if (digits !== undefined) return n.toFixed(digits);
    return nf.format(Math.round(n * 100) / 100);
  }
  function compact(v) {
    if (v === null || v === undefined) return '–';
    const n = Number(v);
    if (Math.abs(n) >= 1e9) return (n / 1e9).toFixed(1) + 'G';
    if (Math.abs(n) >= 1e6) return (n / 1e6).toFixed(1) + 'M';
    if (Math.abs(n) >= 1e4) return (n / 1e3).toFixed(1) + 'k';
    return nf.format(Math.round(n * 10) / 10);
  }
  function bytes(v) {
    if (v === null || v === undefined || v === '') return '–';
    let n = Number(v);
    if (!Number.isFinite(n)) return String(v);
    const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return (i ? n.toFixed(n >= 100 ? 0 : 1) : n) + ' ' + units[i];
  }
  function duration(seconds) {
    if (seconds === null || seconds === undefined) return '–';
    let s = Math.max(0, Math.floor(Number(seconds)));
    const d = Math.floor(s / 86400); s -= d * 86400;
    const h = Math.floor(s / 3600); s -= h * 3600;
    const m = Math.floor(s / 60); s -= m * 60;
    if (d) return `${d}d ${h}h`;
    if (h) return `${h}h ${m}m`;
    if (m) return `${m}m ${s}s`;
    return `${s}s`;
  }
  function ms(v) {
    if (v === null || v === undefined) return '–';
    const n = Number(v);
    if (n < 1000) return Math.round(n) + ' ms';
    return (n / 1000).toFixed(n < 10000 ? 2 : 1) + ' s';
  }
  function toDate(v) {
    if (v === null || v === undefined || v === '') return null;
    if (typeof v === 'number') return new Date(v > 1e12 ? v : v * 1000);
    const d = new Date(v);
    return Number.isNaN(d.getTime()) ? null : d;
  }
  const pad = (n) => String(n).padStart(2, '0');
  function clock(v) {
    const d = toDate(v);
    return d ? `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}` : '–';
  }
  function ago(v) {
    const d = toDate(v);
    if (!d) return 'never';
    const s = (Date.now() - d.getTime()) / 1000;
    if (s < 5) return 'just now';
    if (s < 60) return `${Math.floor(s)} s ago`;
    if (s < 3600) return `${Math.floor(s / 60)} min ago`;
    if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
    return `${Math.floor(s / 86400)} d ago`;
  }
  function timeCell(v, relative) {
    const d = toDate(v);
    return td(d ? (relative ? ago(v) : clock(v)) : (relative ? 'never' : '–'), 'nowrap', d ? d.toLocaleString() : undefined);
  }

  // ---- toasts and confirm ----------------------------------------------------------------
  function toast(message, kind) {
    const node = el('div', { class: 'toast ' + (kind || ''), role: 'status' }, message);
    $('toasts').append(node);
    while ($('toasts').childElementCount > 4) $('toasts').firstElementChild.remove();
    setTimeout(() => node.remove(), kind === 'bad' ? 9000 : 5000);
  }
  function confirmAction(message, okLabel) {
    const dialog = $('confirm');
    $('confirm-text').textContent = message;
    $('confirm-ok').textContent = okLabel || 'Confirm';
    return new Promise((resolve) => {
      const done = (answer) => {
        $('confirm-ok').removeEventListener('click', ok);
        $('confirm-cancel').removeEventListener('click', cancel);
        dialog.removeEventListener('cancel', cancel);
        if (dialog.open) dialog.close();
        resolve(answer);
      };
      const ok = () => done(true);
      const cancel = (e) => { if (e) e.preventDefault(); done(false); };
      $('confirm-ok').addEventListener('click', ok);
      $('confirm-cancel').addEventListener('click', cancel);
      dialog.addEventListener('cancel', cancel);
      dialog.showModal();
      $('confirm-cancel').focus();
    });
  }

  // ---- API -------------------------------------------------------------------------------
  class ApiError extends Error {
    constructor(status, message, code, retryAfter) {
      super(message); this.status = status; this.code = code; this.retryAfter = retryAfter;
    }
  }
  async function api(method, path, body, accept) {
    const headers = { Accept: accept || 'application/json' };
    const init = { method, headers, credentials: 'same-origin', cache: 'no-store' };
    if (method !== 'GET') {
      headers['Content-Type'] = 'application/json';
      if (state.session && state.session.csrf) headers['X-CSRF-Token'] = state.session.csrf;
      init.body = JSON.stringify(body || {});
    }
    let response;
    try {
      response = await fetch(path, init);
    } catch (err) {
      throw new ApiError(0, 'The gateway cannot be reached.', 'network');
    }
    if (response.ok) {
      if (response.status === 204) return null;
      if (accept === 'text/csv') return response.blob();
      return response.json();
    }
    let message = `${response.status} ${response.statusText}`, code = '';
    try {
      const data = await response.json();
      if (data && data.error) {
        message = typeof data.error === 'string' ? data.error : (data.error.message || message);
        code = (data.error && data.error.code) || '';
      }
    } catch (err) { /* not JSON */ }
    const error = new ApiError(response.status, message, code, response.headers.get('Retry-After'));
    if (response.status === 401 && path !== '/admin/session') sessionEnded();
    throw error;
  }

  // ---- sign-in / sign-out ----------------------------------------------------------------
  function showSignIn(message) {
    stopLive();
    state.session = null;
    $('app').hidden = true;
    $('signin-view').hidden = false;
    $('signin-error').textContent = message || '';
    $('key').value = '';
    $('key').focus();
    api('GET', '/admin/setup').then((setup) => {
      $('setup-note').hidden = !(setup && setup.admin_keys === false);
    }).catch(() => { /* an older gateway: no hint */ });
  }
  function sessionEnded() {
    if (state.session) showSignIn('Your session has ended. Sign in again.');
  }
  async function signIn(event) {
    event.preventDefault();
    const key = $('key').value.trim();
    if (!key) { $('signin-error').textContent = 'Enter an admin key.'; return; }
    $('signin-button').disabled = true;
    $('signin-error').textContent = '';
    try {
      const data = await api('POST', '/admin/session', { key });
      $('key').value = '';
      state.session = { csrf: data.csrf, key_id: data.key_id };
      // The cookie is HttpOnly: check that the browser kept it (it drops a Secure cookie over
      // plain http on a LAN address).
      try {
        const check = await api('GET', '/admin/session');
        state.session = { csrf: check.csrf || data.csrf, key_id: check.key_id || data.key_id };
      } catch (err) {
        state.session = null;
        $('signin-error').textContent = 'Signed in, but this browser did not keep the session cookie. Open the dashboard over HTTPS or on localhost.';
        return;
      }
      showApp();
    } catch (err) {
      $('key').value = '';
      if (err.status === 403) $('signin-error').textContent = 'This is an inference key. The dashboard needs a key with the admin role.';
      else if (err.status === 401) $('signin-error').textContent = 'That key is not valid.';
      else if (err.status === 429) $('signin-error').textContent = `Too many attempts. Try again in ${err.retryAfter || 60} s.`;
      else $('signin-error').textContent = err.message;
    } finally {
      $('signin-button').disabled = false;
    }
  }
  async function signOut() {
    try { await api('POST', '/admin/session/logout', {}); } catch (err) { /* gone anyway */ }
    showSignIn('Signed out.');
  }

  function showApp() {
    $('signin-view').hidden = true;
    $('app').hidden = false;
    $('whoami').textContent = state.session.key_id;
    route();
    startLive();
    loadModels();
    loadLogs();
  }

  // ---- routing ---------------------------------------------------------------------------
  const VIEWS = ['overview', 'models', 'activity', 'keys', 'logs', 'system'];
  function route() {
    if (!state.session) return;
    let view = location.hash.replace(/^#\/?/, '');
    if (!VIEWS.includes(view)) view = 'overview';
    state.view = view;
    for (const section of document.querySelectorAll('section.view')) section.hidden = section.dataset.view !== view;
    for (const a of document.querySelectorAll('#nav a')) {
      if (a.dataset.view === view) a.setAttribute('aria-current', 'page'); else a.removeAttribute('aria-current');
    }
    clearInterval(systemTimer);
    if (view === 'overview') { chartsDirty = true; renderOverview(); }
    if (view === 'models') renderModels();
    if (view === 'activity') loadUsage();
    if (view === 'keys') loadKeys();
    if (view === 'logs') scrollLogsToEnd();
    if (view === 'system') { loadSystem(); systemTimer = setInterval(loadSystem, 5000); }
    document.title = `${view[0].toUpperCase()}${view.slice(1)} · llama gateway`;
  }

  // ---- live channel ----------------------------------------------------------------------
  function setConn(kind, text) {
    const pill = $('conn');
    pill.className = 'pill ' + (kind === 'ok' ? 'pill-ok' : kind === 'bad' ? 'pill-bad' : 'pill-wait');
    pill.textContent = text;
  }
  function startLive() {
    stopLive();
    setConn('wait', 'connecting');
    const source = new EventSource('/admin/live');
    es = source;
    const on = (type, handler) => source.addEventListener(type, (e) => {
      if (es !== source) return;
      lastEventAt = Date.now();
      if (staleSince) { staleSince = 0; setConn('ok', 'live'); }
      let data;
      try { data = JSON.parse(e.data); } catch (err) { return; }
      handler(data);
    });
    source.addEventListener('open', () => {
      if (es !== source) return;
      backoff = BACKOFF_MIN; lastEventAt = Date.now(); staleSince = 0; setConn('ok', 'live');
    });
    on('hello', onHello);
    on('models', onModels);
    on('metrics', onMetrics);
    on('request', onRequest);
    on('log', onLog);
    on('dropped', onDropped);
    source.addEventListener('error', () => {
      if (es !== source) return;
      source.close();
      es = null;
      setConn('wait', 'reconnecting');
      scheduleReconnect();
    });
  }
  function stopLive() {
    clearTimeout(reconnectTimer);
    if (es) { es.close(); es = null; }
  }
  function scheduleReconnect() {
    clearTimeout(reconnectTimer);
    const wait = backoff * (0.8 + Math.random() * 0.4);
    backoff = Math.min(backoff * 2, BACKOFF_MAX);
    reconnectTimer = setTimeout(async () => {
      if (!state.session) return;
      try {
        await api('GET', '/admin/session');
      } catch (err) {
        if (err.status === 401) sessionEnded();
        else scheduleReconnect();
        return;
      }
      startLive();
      loadModels();
    }, wait);
  }
  setInterval(() => {
    if (!es || !lastEventAt || es.readyState !== EventSource.OPEN) return;
    if (Date.now() - lastEventAt > STALE_MS && !staleSince) {
      staleSince = lastEventAt;
      setConn('bad', `stale since ${clock(staleSince)}`);
    }
  }, 1000);

  function onHello(data) {
    if (data.key_id && state.session) $('whoami').textContent = data.key_id;
    if (Array.isArray(data.history)) {
      const known = new Set(state.history.map((p) => p.t));
      const extra = data.history.filter((p) => p && typeof p.t === 'number' && !known.has(p.t));
      state.history = extra.concat(state.history).sort((a, b) => a.t - b.t).slice(-HISTORY_MAX);
      chartsDirty = true;
    }
  }
  function onDropped(data) {
    $('notice-text').textContent = `The live channel dropped ${num(data.count)} event(s) because this tab fell behind. ` +
      'Counters stay right; some activity rows or log lines are missing.';
    $('notice').hidden = false;
  }

  // ---- overview --------------------------------------------------------------------------
  function onMetrics(m) {
    state.history.push(m);
    if (state.history.length > HISTORY_MAX) state.history.splice(0, state.history.length - HISTORY_MAX);
    chartsDirty = true;
    if (state.view === 'overview') renderOverview();
  }
  function stateBadge(text) {
    const s = String(text || 'unknown');
    const cls = /^(ready|loaded|ok|up)$/.test(s) ? 'b-ok' : /^(loading|starting|draining)/.test(s) ? 'b-warn' :
      /^(down|failed|error)/.test(s) ? 'b-bad' : 'b-muted';
    return el('span', { class: 'badge ' + cls }, s);
  }
  function renderOverview() {
    const m = state.history[state.history.length - 1];
    if (m) {
      const stateNode = $('ov-state');
      clear(stateNode);
      stateNode.append(stateBadge(m.state));
      setText('ov-uptime', 'uptime ' + duration(m.uptime_s));
      setText('ov-rps', num(m.requests_per_s, 2));
      setText('ov-tps', compact(m.tokens_per_s));
      setText('ov-ttft', ms(m.ttft_p50_ms));
      setText('ov-ttft95', 'p95 ' + ms(m.ttft_p95_ms));
      setText('ov-inflight', num(m.in_flight));
      setText('ov-queue', 'queue ' + num(m.queue));
      setText('ov-errors', m.error_rate === null || m.error_rate === undefined ? '–' : (Number(m.error_rate) * 100).toFixed(1) + ' %');
      setText('ov-updated', 'updated ' + clock(m.t || Date.now() / 1000));
      const list = $('ov-loaded');
      clear(list);
      const loaded = Array.isArray(m.loaded) ? m.loaded : [];
      if (!loaded.length) list.append(el('li', { class: 'muted' }, 'none'));
      for (const name of loaded) list.append(el('li', null, name));
    }
    if (chartsDirty) {
      chartsDirty = false;
      const h = state.history;
      lineChart($('chart-rps'), [h.map((p) => [p.t, p.requests_per_s])], 2);
      lineChart($('chart-tps'), [h.map((p) => [p.t, p.tokens_per_s])], 0);
      lineChart($('chart-ttft'), [h.map((p) => [p.t, p.ttft_p50_ms]), h.map((p) => [p.t, p.ttft_p95_ms])], 0);
      lineChart($('chart-inflight'), [h.map((p) => [p.t, p.in_flight]), h.map((p) => [p.t, p.queue])], 0);
    }
    const body = $('ov-recent-errors');
    clear(body);
    for (const r of state.errors.slice(0, 5)) {
      body.append(el('tr', null, timeCell(r.t), td(r.key_id), td(r.model, 'wrap'), td(r.route, 'wrap'), td(r.status)));
    }
    if (!state.errors.length) body.append(el('tr', null, el('td', { colspan: 5, class: 'muted' }, 'No errors since this page opened.')));
  }

  // A line chart of [t (s), value] series over the last hour, drawn in SVG.
  function lineChart(node, series, digits) {
    clear(node);
    const box = node.viewBox.baseVal;
    const W = box && box.width ? box.width : 460, H = box && box.height ? box.height : 150;
    const L = 40, R = 8, T = 12, B = 20;
    const pts = series.map((s) => s.filter((p) => typeof p[0] === 'number' && p[1] !== null && p[1] !== undefined && Number.isFinite(Number(p[1]))));
    const all = pts.flat();
    if (all.length < 2) {
      node.append(svg('text', { x: W / 2, y: H / 2, 'text-anchor': 'middle', class: 'empty' }, 'Collecting data…'));
      return;
    }
    const tMax = Math.max(...all.map((p) => p[0]));
    const tMin = Math.max(Math.min(...all.map((p) => p[0])), tMax - CHART_WINDOW_MS / 1000);
    const span = Math.max(tMax - tMin, 60);
    const top = Math.max(...all.filter((p) => p[0] >= tMin).map((p) => Number(p[1])), 0);
    const step = niceStep(top);
    const vMax = Math.max(1, Math.ceil(top / step)) * step;
    const x = (t) => L + ((t - (tMax - span)) / span) * (W - L - R);
    const y = (v) => T + (1 - Number(v) / vMax) * (H - T - B);
    for (let v = 0; v <= vMax + step / 2; v += step) {
      const yy = y(v);
      node.append(svg('line', { x1: L, x2: W - R, y1: yy, y2: yy, class: 'grid' }));
      node.append(svg('text', { x: L - 6, y: yy + 4, 'text-anchor': 'end', class: 'axis' }, compact(Number(v.toFixed(digits || 0)))));
    }
    node.append(svg('text', { x: L, y: H - 5, class: 'axis' }, clock(tMax - span)));
    node.append(svg('text', { x: W - R, y: H - 5, 'text-anchor': 'end', class: 'axis' }, clock(tMax)));
    pts.forEach((s, i) => {
      const shown = downsample(s.filter((p) => p[0] >= tMax - span), W - L - R);
      if (!shown.length) return;
      const d = shown.map((p, j) => `${j ? 'L' : 'M'}${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`).join('');
      if (i === 0) {
        const area = `${d}L${x(shown[shown.length - 1][0]).toFixed(1)},${y(0)}L${x(shown[0][0]).toFixed(1)},${y(0)}Z`;
        node.append(svg('path', { d: area, class: 'area' }));
      }
      node.append(svg('path', { d, class: `line s${i + 1}` }));
    });
  }
  // The grid step: 1, 2, 2.5 or 5 times a power of ten, so that the top is at most 5 steps.
  function niceStep(v) {
    if (!(v > 0)) return 1;
    const p = Math.pow(10, Math.floor(Math.log10(v / 5)));
    for (const m of [1, 2, 2.5, 5, 10]) if (v / (m * p) <= 5) return m * p;
    return 10 * p;
  }
  function downsample(points, buckets) {
    if (points.length <= buckets) return points;
    const out = [], size = points.length / buckets;
    for (let i = 0; i < buckets; i++) {
      const slice = points.slice(Math.floor(i * size), Math.floor((i + 1) * size));
      if (slice.length) out.push(slice.reduce((a, b) => (Number(b[1]) > Number(a[1]) ? b : a)));
    }
    return out;
  }

  // ---- models ----------------------------------------------------------------------------
  async function loadModels() {
    try { onModels(await api('GET', '/admin/models')); } catch (err) { /* the live channel brings them */ }
  }
  function onModels(data) {
    const before = new Map(state.models.map((m) => [m.name, m.state]));
    state.models = Array.isArray(data.models) ? data.models : [];
    state.mode = data.mode || '';
    state.modelsMax = data.max === undefined ? null : data.max;
    for (const m of state.models) {
      const prev = before.get(m.name);
      const pending = state.pending.get(m.name);
      if (pending && (m.state !== pending.from || m.state === 'failed')) state.pending.delete(m.name);
      if (prev && prev !== m.state) {
        if (m.state === 'loaded') toast(`${m.name} is loaded.`, 'ok');
        if (m.state === 'failed') toast(`${m.name} failed to load${m.failure ? ': ' + String(m.failure).slice(0, 200) : '.'}`, 'bad');
      }
    }
    renderModels();
  }
  function renderModels() {
    if (state.view !== 'models') return;
    const single = state.mode === 'single';
    setText('models-mode', state.mode ? `${state.mode} mode${state.modelsMax ? ` · at most ${state.modelsMax} loaded` : ''}` : '');
    $('models-unload-all').hidden = single;
    $('models-unload-all').disabled = !state.models.some((m) => m.state === 'loaded' || m.state === 'loading');
    const body = $('models-body');
    clear(body);
    $('models-empty').hidden = state.models.length > 0;
    for (const m of state.models) {
      const nameCell = el('td', { class: 'name' }, m.name);
      if (Array.isArray(m.aliases) && m.aliases.length) nameCell.append(el('span', { class: 'aliases' }, 'aka ' + m.aliases.join(', ')));
      const badge = el('span', { class: 'badge b-' + (['loaded', 'loading', 'failed', 'unloaded'].includes(m.state) ? m.state : 'muted') }, m.state || 'unknown');
      const stateCell = el('td', { class: 'nowrap' }, badge);
      if (m.draining) stateCell.append(' ', el('span', { class: 'badge b-warn' }, 'draining'));
      let failure = td('', 'no-failure');
      if (m.failure) {
        const text = String(m.failure);
        const firstLine = text.split('\n')[0].slice(0, 120);
        failure = el('td', { class: 'wrap span' }, el('details', { class: 'failure' }, el('summary', null, firstLine), el('pre', null, text)));
      }
      const actions = el('div', { class: 'row-actions' });
      const pending = state.pending.get(m.name);
      if (!single) {
        const button = (label, action, cls) => {
          const b = el('button', { type: 'button', class: 'small ' + (cls || ''), 'data-action': action, 'data-model': m.name }, label);
          b.disabled = Boolean(pending) || m.state === 'loading';
          b.addEventListener('click', () => modelAction(action, m));
          actions.append(b);
        };
        if (pending) actions.append(el('span', { class: 'muted' }, pending.action + '…'));
        else if (m.state === 'loading') actions.append(el('span', { class: 'muted' }, 'loading…'));
        else if (m.state === 'loaded') button('Unload', 'unload');
        else { button(m.state === 'failed' ? 'Retry' : 'Load', 'load', 'primary'); button('Switch', 'switch'); }
      }
      body.append(labelRow(el('tr', { 'data-model': m.name },
        nameCell, stateCell, td(bytes(m.size), 'num'), td(m.quantization), td(m.context ? num(m.context) : '', 'num'),
        td(num(m.in_flight || 0), 'num'), timeCell(m.last_used, true), failure, el('td', { class: 'actions-cell' }, actions)), 'models-table'));
    }
  }
  async function modelAction(action, m) {
    if (action === 'unload' && m.in_flight > 0 &&
        !(await confirmAction(`${m.name} has ${m.in_flight} request(s) in flight. Unload it anyway?`, 'Unload'))) return;
    if (action === 'switch') {
      const others = state.models.filter((o) => o.name !== m.name && o.state === 'loaded').map((o) => o.name);
      if (others.length && !(await confirmAction(`Switch to ${m.name}? This unloads ${others.join(', ')}.`, 'Switch'))) return;
    }
    state.pending.set(m.name, { action: action === 'unload' ? 'unloading' : action === 'switch' ? 'switching' : 'loading', from: m.state });
    renderModels();
    try {
      await api('POST', `/admin/models/${action}`, { model: m.name });
    } catch (err) {
      state.pending.delete(m.name);
      toast(`${action} ${m.name}: ${err.message}`, 'bad');
      renderModels();
    }
  }
  async function unloadAll() {
    const loaded = state.models.filter((m) => m.state === 'loaded' || m.state === 'loading');
    const inFlight = loaded.reduce((n, m) => n + (m.in_flight || 0), 0);
    const message = `Unload ${loaded.length} model(s)?` + (inFlight ? ` ${inFlight} request(s) are in flight.` : '');
    if (!(await confirmAction(message, 'Unload all'))) return;
    for (const m of loaded) {
      state.pending.set(m.name, { action: 'unloading', from: m.state });
      api('POST', '/admin/models/unload', { model: m.name }).catch((err) => {
        state.pending.delete(m.name); toast(`unload ${m.name}: ${err.message}`, 'bad'); renderModels();
      });
    }
    renderModels();
  }

  // ---- activity --------------------------------------------------------------------------
  function requestMatches(r) {
    const f = $('activity-filter').value.trim().toLowerCase();
    if (!f) return true;
    return [r.key_id, r.model, r.route, r.status].some((v) => String(v === null || v === undefined ? '' : v).toLowerCase().includes(f));
  }
  function requestRow(r) {
    const status = Number(r.status);
    const cls = status >= 500 ? 'b-bad' : status >= 400 ? 'b-warn' : 'b-ok';
    return el('tr', null, timeCell(r.t), td(r.key_id, 'wrap'), td(r.model, 'wrap'), td(r.route, 'wrap'),
      el('td', { class: 'num' }, el('span', { class: 'badge ' + cls }, r.status)),
      td(`${compact(r.prompt_tokens)} / ${compact(r.completion_tokens)}`, 'num'),
      td(ms(r.duration_ms), 'num'), td(ms(r.ttfb_ms), 'num'));
  }
  function onRequest(r) {
    state.requests.unshift(r);
    if (state.requests.length > ACTIVITY_MAX) state.requests.length = ACTIVITY_MAX;
    if (Number(r.status) >= 400) {
      state.errors.unshift(r);
      if (state.errors.length > 5) state.errors.length = 5;
      if (state.view === 'overview') renderOverview();
    }
    if (state.activityPaused) return;
    const body = $('activity-body');
    if (requestMatches(r)) {
      body.insertBefore(requestRow(r), body.firstChild);
      while (body.childElementCount > ACTIVITY_MAX) body.lastElementChild.remove();
    }
    $('activity-empty').hidden = body.childElementCount > 0;
  }
  function renderActivity() {
    const body = $('activity-body');
    clear(body);
    for (const r of state.requests) if (requestMatches(r)) body.append(requestRow(r));
    $('activity-empty').hidden = body.childElementCount > 0;
  }
  function rangeFrom(range) {
    if (range === 'today') return new Date().toISOString().slice(0, 10);   // UTC day, as the ledger
    return range;   // 7d, 30d: the API takes relative times
  }
  async function loadUsage() {
    const from = rangeFrom(state.usageRange);
    for (const b of document.querySelectorAll('#usage-range button')) b.setAttribute('aria-pressed', String(b.dataset.range === state.usageRange));
    $('usage-note').textContent = 'Loading…';
    try {
      const data = await api('GET', `/admin/usage?group=key&from=${encodeURIComponent(from)}`);
      renderUsage(Array.isArray(data.rows) ? data.rows : []);
      $('usage-note').textContent = state.usageRange === 'today' ? 'Since midnight UTC.' : `Last ${state.usageRange.replace('d', ' days')}.`;
    } catch (err) {
      renderUsage([]);
      $('usage-note').textContent = 'Usage is not available: ' + err.message;
    }
  }
  function renderUsage(rows) {
    const body = $('usage-body');
    clear(body);
    rows = rows.slice().sort((a, b) => (b.prompt_tokens + b.completion_tokens) - (a.prompt_tokens + a.completion_tokens));
    for (const r of rows) {
      body.append(el('tr', null, td(r.key_id === null || r.key_id === undefined ? '(none)' : r.key_id, 'name'), td(num(r.requests), 'num'),
        td(num(r.prompt_tokens), 'num'), td(num(r.completion_tokens), 'num'), td(num(r.errors), 'num')));
    }
    if (!rows.length) body.append(el('tr', null, el('td', { colspan: 5, class: 'muted' }, 'No usage in this range.')));
    // bar chart: prompt + completion tokens per key, stacked
    const chart = $('usage-chart');
    clear(chart);
    const shown = rows.slice(0, 12);
    const rowH = 24, W = 600, L = 130, R = 70;
    const H = Math.max(1, shown.length) * rowH + 8;
    chart.setAttribute('viewBox', `0 0 ${W} ${H}`);
    if (!shown.length) { chart.setAttribute('viewBox', `0 0 ${W} 30`); chart.append(svg('text', { x: W / 2, y: 20, 'text-anchor': 'middle', class: 'empty' }, 'No tokens in this range')); return; }
    const max = Math.max(...shown.map((r) => r.prompt_tokens + r.completion_tokens), 1);
    const scale = (v) => (v / max) * (W - L - R);
    shown.forEach((r, i) => {
      const y = 4 + i * rowH;
      const name = String(r.key_id === null || r.key_id === undefined ? '(none)' : r.key_id);
      chart.append(svg('text', { x: L - 8, y: y + 15, 'text-anchor': 'end', class: 'label' }, name.length > 18 ? name.slice(0, 17) + '…' : name));
      const wp = scale(r.prompt_tokens), wc = scale(r.completion_tokens);
      chart.append(svg('rect', { x: L, y: y + 3, width: Math.max(wp, 0).toFixed(1), height: rowH - 8, rx: 3, class: 'bar1' }));
      chart.append(svg('rect', { x: (L + wp).toFixed(1), y: y + 3, width: Math.max(wc, 0).toFixed(1), height: rowH - 8, rx: 3, class: 'bar2' }));
      chart.append(svg('text', { x: (L + wp + wc + 6).toFixed(1), y: y + 15, class: 'axis' }, compact(r.prompt_tokens + r.completion_tokens)));
    });
  }
  async function exportCsv() {
    const from = rangeFrom(state.usageRange);
    try {
      const blob = await api('GET', `/admin/usage?group=key&from=${encodeURIComponent(from)}`, null, 'text/csv');
      const url = URL.createObjectURL(blob);
      const a = el('a', { href: url, download: `usage-by-key-${state.usageRange}-${new Date().toISOString().slice(0, 10)}.csv` });
      document.body.append(a);
      a.click();
      a.remove();
      setTimeout(() => URL.revokeObjectURL(url), 10000);
    } catch (err) {
      toast('CSV export: ' + err.message, 'bad');
    }
  }

  // ---- keys ------------------------------------------------------------------------------
  async function loadKeys() {
    try {
      const data = await api('GET', '/admin/keys');
      state.keys = Array.isArray(data.keys) ? data.keys : [];
    } catch (err) {
      toast('Keys: ' + err.message, 'bad');
    }
    renderKeys();
  }
  function renderKeys() {
    const body = $('keys-body');
    clear(body);
    for (const k of state.keys) {
      const actions = el('div', { class: 'row-actions' });
      const rotate = el('button', { type: 'button', class: 'small', 'data-action': 'rotate', 'data-key': k.key_id }, 'Rotate');
      rotate.addEventListener('click', () => keyAction('rotate', k));
      const revoke = el('button', { type: 'button', class: 'small danger', 'data-action': 'revoke', 'data-key': k.key_id }, 'Revoke');
      revoke.addEventListener('click', () => keyAction('revoke', k));
      actions.append(rotate, revoke);
      const models = Array.isArray(k.models) ? k.models.join(', ') : (k.models || 'all');
      const role = el('span', { class: 'badge ' + (k.role === 'admin' ? 'b-info' : 'b-muted') }, k.role || 'user');
      const me = state.session && k.key_id === state.session.key_id ? el('span', { class: 'muted' }, ' (you)') : null;
      body.append(labelRow(el('tr', { 'data-key': k.key_id }, el('td', { class: 'name' }, k.key_id, me), el('td', null, role),
        td(k.rpm === null || k.rpm === undefined ? 'default' : num(k.rpm), 'num'),
        td(k.concurrency === null || k.concurrency === undefined ? 'default' : num(k.concurrency), 'num'),
        td(k.tpm === null || k.tpm === undefined ? '∞' : compact(k.tpm), 'num'), td(k.tpd === null || k.tpd === undefined ? '∞' : compact(k.tpd), 'num'),
        td(models, 'wrap'), td(k.hashed ? 'hash' : 'plain'), timeCell(k.last_used, true), el('td', { class: 'actions-cell' }, actions)), 'keys-table'));
    }
    if (!state.keys.length) body.append(el('tr', null, el('td', { colspan: 10, class: 'muted' }, 'No keys.')));
  }
  function showSecret(keyId, secret) {
    $('secret-key-id').textContent = keyId;
    $('secret-value').textContent = secret;
    $('secret-box').hidden = false;
    $('secret-copy').textContent = 'Copy';
    $('secret-copy').focus();
  }
  function hideSecret() {
    $('secret-value').textContent = '';
    $('secret-key-id').textContent = '';
    $('secret-box').hidden = true;
  }
  async function copySecret() {
    const text = $('secret-value').textContent;
    try {
      await navigator.clipboard.writeText(text);
      $('secret-copy').textContent = 'Copied';
    } catch (err) {
      const range = document.createRange();
      range.selectNodeContents($('secret-value'));
      const sel = window.getSelection();
      sel.removeAllRanges();
      sel.addRange(range);
      $('secret-copy').textContent = 'Selected: press Ctrl+C';
    }
  }
  async function keyAction(action, k) {
    const own = state.session && k.key_id === state.session.key_id;
    const message = action === 'revoke'
      ? `Revoke ${k.key_id}? Clients using it are refused from the next reload.${own ? ' This is the key you signed in with: you will be signed out.' : ''}`
      : `Rotate ${k.key_id}? The old secret stops working; the new one is shown once.${own ? ' This is the key you signed in with: you will be signed out.' : ''}`;
    if (!(await confirmAction(message, action === 'revoke' ? 'Revoke' : 'Rotate'))) return;
    try {
      const data = await api('POST', `/admin/keys/${action}`, { key_id: k.key_id });
      if (action === 'rotate' && data && data.secret) showSecret(data.key_id || k.key_id, data.secret);
      toast(`${k.key_id} ${action === 'revoke' ? 'revoked' : 'rotated'}.`, 'ok');
    } catch (err) {
      toast(`${action} ${k.key_id}: ${err.message}`, 'bad');
    }
    if (state.session) loadKeys();
  }
  async function createKey(event) {
    event.preventDefault();
    const body = { key_id: $('new-key-id').value.trim(), role: $('new-key-role').value };
    $('key-create-error').textContent = '';
    if (!/^[A-Za-z0-9._-]{1,64}$/.test(body.key_id)) {
      $('key-create-error').textContent = 'Name: 1 to 64 characters from A-Z a-z 0-9 . _ -';
      return;
    }
    for (const field of ['rpm', 'concurrency', 'tpm', 'tpd']) {
      const v = $('new-key-' + field).value.trim();
      if (v) body[field] = Number(v);
    }
    const models = $('new-key-models').value.split(',').map((s) => s.trim()).filter(Boolean);
    if (models.length) body.models = models;
    $('key-create-button').disabled = true;
    try {
      const data = await api('POST', '/admin/keys', body);
      showSecret(data.key_id, data.secret);
      $('key-create').reset();
      loadKeys();
    } catch (err) {
      $('key-create-error').textContent = err.message;
    } finally {
      $('key-create-button').disabled = false;
    }
  }

  // ---- logs ------------------------------------------------------------------------------
  let logsFollow = true, logsUnseen = 0;
  async function loadLogs() {
    try {
      const data = await api('GET', '/admin/logs?tail=500');
      const lines = Array.isArray(data.lines) ? data.lines : [];
      const lastT = lines.length ? lines[lines.length - 1].t : -Infinity;
      const live = state.logs.filter((l) => l.t > lastT);
      state.logs = lines.concat(live).slice(-LOG_KEEP);
    } catch (err) { /* live lines still come */ }
    state.logsLoaded = true;
    renderLogs();
  }
  function logMatches(l) {
    const source = $('logs-source').value, level = $('logs-level').value;
    const text = $('logs-filter').value.trim().toLowerCase();
    if (source && l.source !== source) return false;
    if (level === 'error' && !(l.level === 'error' || l.level === 'critical')) return false;
    if (level === 'warning' && !['warning', 'error', 'critical'].includes(l.level)) return false;
    return !text || String(l.text).toLowerCase().includes(text);
  }
  function logLine(l) {
    return el('div', { class: 'logline ' + (l.level || 'info') },
      el('span', { class: 't', title: toDate(l.t) ? toDate(l.t).toLocaleString() : undefined }, clock(l.t)),
      el('span', { class: 'src' }, l.source), el('span', { class: 'msg' }, l.text));
  }
  function renderLogs() {
    const list = $('logs-list');
    clear(list);
    const shown = state.logs.filter(logMatches).slice(-LOG_SHOW);
    for (const l of shown) list.append(logLine(l));
    setText('logs-count', `${shown.length} line(s) shown`);
    logsFollow = true; logsUnseen = 0;
    $('logs-follow').hidden = true;
    scrollLogsToEnd();
  }
  function onLog(l) {
    state.logs.push(l);
    if (state.logs.length > LOG_KEEP) state.logs.splice(0, state.logs.length - LOG_KEEP);
    if (!state.logsLoaded || !logMatches(l)) return;
    const list = $('logs-list');
    list.append(logLine(l));
    while (list.childElementCount > LOG_SHOW) list.firstElementChild.remove();
    setText('logs-count', `${list.childElementCount} line(s) shown`);
    if (logsFollow) scrollLogsToEnd();
    else { logsUnseen++; $('logs-follow').textContent = `Paused: ${logsUnseen} new line(s), jump to latest`; }
  }
  function scrollLogsToEnd() {
    const box = $('logs-box');
    box.scrollTop = box.scrollHeight;
  }
  function onLogsScroll() {
    const box = $('logs-box');
    const atEnd = box.scrollHeight - box.scrollTop - box.clientHeight < 24;
    if (atEnd && !logsFollow) { logsFollow = true; logsUnseen = 0; $('logs-follow').hidden = true; }
    else if (!atEnd && logsFollow) {
      logsFollow = false;
      $('logs-follow').textContent = 'Paused: jump to latest';
      $('logs-follow').hidden = false;
    }
  }

  // ---- system ----------------------------------------------------------------------------
  function meter(id, fraction) {
    const bar = $(id);
    const f = Number.isFinite(fraction) ? Math.min(1, Math.max(0, fraction)) : 0;
    bar.style.width = (f * 100).toFixed(1) + '%';
    bar.classList.toggle('high', f > 0.9);
  }
  async function loadSystem() {
    let s;
    try { s = await api('GET', '/admin/system'); } catch (err) { setText('system-updated', 'not available: ' + err.message); return; }
    const cpu = s.cpu || {}, mem = s.memory || {}, disk = s.disk || {};
    setText('sys-cpu', cpu.percent === null || cpu.percent === undefined ? '–' : num(cpu.percent, 0) + ' %');
    setText('sys-cpu-sub', cpu.count ? `${cpu.count} CPU(s)` : '');
    meter('sys-cpu-bar', Number(cpu.percent) / 100);
    setText('sys-mem', bytes(mem.used));
    setText('sys-mem-sub', `of ${bytes(mem.total)}`);
    meter('sys-mem-bar', Number(mem.used) / Number(mem.total));
    setText('sys-disk', bytes(disk.used));
    setText('sys-disk-sub', `of ${bytes(disk.total)} · ${bytes(disk.free)} free · ${disk.path || ''}`);
    meter('sys-disk-bar', Number(disk.used) / Number(disk.total));
    setText('sys-uptime', duration(s.uptime_s));
    setText('sys-version', s.version ? 'version ' + s.version : '');
    const body = $('gpu-body');
    clear(body);
    const gpus = Array.isArray(s.gpu) ? s.gpu : [];
    $('sys-gpu-note').hidden = !s.gpu_note;
    $('sys-gpu-note').textContent = s.gpu_note ? 'No GPU information: ' + s.gpu_note : '';
    $('gpu-table').parentElement.hidden = gpus.length === 0;
    for (const g of gpus) {
      body.append(el('tr', null, td(g.name, 'name'), td(g.util === null || g.util === undefined ? '–' : num(g.util, 0) + ' %', 'num'),
        td(`${bytes(g.mem_used)} / ${bytes(g.mem_total)}`, 'num'), td(g.temp === null || g.temp === undefined ? '–' : num(g.temp, 0) + ' °C', 'num'),
        td(g.power === null || g.power === undefined ? '–' : num(g.power, 0) + ' W', 'num')));
    }
    setText('system-updated', 'updated ' + clock(Date.now()));
  }

  // ---- wiring ----------------------------------------------------------------------------
  function debounce(fn, wait) {
    let t = 0;
    return () => { clearTimeout(t); t = setTimeout(fn, wait); };
  }
  document.addEventListener('DOMContentLoaded', async () => {
    $('signin-form').addEventListener('submit', signIn);
    $('signout').addEventListener('click', signOut);
    $('notice-close').addEventListener('click', () => { $('notice').hidden = true; });
    window.addEventListener('hashchange', route);
    $('models-unload-all').addEventListener('click', unloadAll);
    $('activity-filter').addEventListener('input', debounce(renderActivity, 120));
    $('activity-pause').addEventListener('click', () => {
      state.activityPaused = !state.activityPaused;
      $('activity-pause').setAttribute('aria-pressed', String(state.activityPaused));
      $('activity-pause').textContent = state.activityPaused ? 'Resume' : 'Pause';
      if (!state.activityPaused) renderActivity();
    });
    for (const b of document.querySelectorAll('#usage-range button')) {
      b.addEventListener('click', () => { state.usageRange = b.dataset.range; loadUsage(); });
    }
    $('usage-refresh').addEventListener('click', loadUsage);
    $('usage-csv').addEventListener('click', exportCsv);
    $('keys-refresh').addEventListener('click', loadKeys);
    $('key-create').addEventListener('submit', createKey);
    $('secret-copy').addEventListener('click', copySecret);
    $('secret-done').addEventListener('click', hideSecret);
    $('logs-box').addEventListener('scroll', onLogsScroll, { passive: true });
    $('logs-follow').addEventListener('click', () => { logsFollow = true; logsUnseen = 0; $('logs-follow').hidden = true; scrollLogsToEnd(); });
    for (const id of ['logs-source', 'logs-level']) $(id).addEventListener('change', renderLogs);
    $('logs-filter').addEventListener('input', debounce(renderLogs, 150));
    $('system-refresh').addEventListener('click', loadSystem);
    setInterval(() => { if (state.view === 'overview' && chartsDirty) renderOverview(); }, 5000);

    try {
      const data = await api('GET', '/admin/session');
      state.session = { csrf: data.csrf, key_id: data.key_id };
      showApp();
    } catch (err) {
      showSignIn(err.status === 401 || err.status === 403 ? '' : err.message);
    }
  });
})();
