// fedhive dashboard: live updates from /api/events (server-sent events). The pages are
// rendered by the server; this only re-renders their live parts when a status changes and ages
// the "… s ago" times. No framework, no third-party code.
(function () {
  "use strict";
  const body = document.body;
  const page = body.dataset.page;
  if (!page || page === "login") return;

  let offset = Number(body.dataset.serverTime || 0) - Date.now() / 1000; // server - local clock
  let current = body.dataset.aggregator || "";
  const csrf = body.dataset.csrf || "";

  const esc = (v) => String(v).replace(/[&<>"']/g, (c) => ({
    "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;",
  })[c]);
  const dash = (v) => (v === null || v === undefined ? "-" : v);
  const now = () => Date.now() / 1000 + offset;
  const badge = (state) => `<span class="badge ${esc(state)}">${esc(state)}</span>`;
  const num = (v) => String(Number(v.toPrecision(6)));
  const limit = (n) => (n ? String(n) : "no limit");
  const secondsSetting = (v) => (v === null ? "never" : v === 0 ? "disabled" : `${num(v)} s`);

  function ago(seconds) {
    if (seconds === null || seconds === undefined || !isFinite(seconds)) return "-";
    const s = Math.max(0, seconds);
    if (s < 60) return `${s.toFixed(1)} s ago`;
    if (s < 3600) return `${Math.round(s / 60)} min ago`;
    if (s < 172800) return `${(s / 3600).toFixed(1)} h ago`;
    return `${Math.round(s / 86400)} d ago`;
  }
  const since = (epoch) => `<span data-since="${epoch}">${ago(now() - epoch)}</span>`;

  function tick() {
    const t = now();
    for (const el of document.querySelectorAll("[data-since]")) {
      el.textContent = ago(t - Number(el.dataset.since));
    }
  }

  function setText(id, value) {
    const el = document.getElementById(id);
    if (el && el.textContent !== String(value)) el.textContent = value;
  }
  function setHtml(id, html) {
    const el = document.getElementById(id);
    if (el && el.innerHTML !== html) el.innerHTML = html;
  }

  function controlButton(aggregator, command, label, back, cls, disabled) {
    return `<form method="post" action="/control" class="inline">` +
      `<input type="hidden" name="csrf" value="${esc(csrf)}">` +
      `<input type="hidden" name="aggregator" value="${esc(aggregator)}">` +
      `<input type="hidden" name="command" value="${esc(command)}">` +
      `<input type="hidden" name="next" value="${esc(back)}">` +
      `<button class="${cls}" type="submit" data-command="${esc(command)}" ` +
      `data-aggregator="${esc(aggregator)}"${disabled ? " disabled" : ""}>${esc(label)}</button></form>`;
  }

  function setConnection(connected, error) {
    const el = document.getElementById("conn");
    if (!el) return;
    el.dataset.connected = connected ? "true" : "false";
    el.title = error || "";
    setText("conn-text", connected ? "broker connected" : "broker not connected");
  }

  // ---------------------------------------------------------------- overview
  function renderOverview(snap) {
    const aggs = snap.aggregators;
    setText("kpi-aggregators", aggs.length);
    setText("kpi-aggregators-note", `${aggs.filter((s) => s.state === "ACTIVE").length} active`);
    setText("kpi-agents", aggs.reduce((n, s) => n + s.active, 0));
    setText("kpi-round", aggs.length ? Math.max(...aggs.map((s) => s.round)) : "-");
    const rows = aggs.map((s) => {
      const method = esc(s.method) + (s.next_method ? ` → ${esc(s.next_method)}` : "");
      return `<tr data-aggregator="${esc(s.sender)}">` +
        `<td><a href="/aggregation?aggregator=${encodeURIComponent(s.sender)}">${esc(s.sender)}</a></td>` +
        `<td>${badge(s.state)}${s.paused ? ' <span class="muted">paused</span>' : ""}` +
        `${s.blocker ? `<div class="blocker">${esc(s.blocker)}</div>` : ""}</td>` +
        `<td class="num" data-field="round">${s.round}</td><td>${method}</td>` +
        `<td class="num">${num(s.threshold)}</td><td class="num">${s.active}</td>` +
        `<td class="num">${s.needed}</td><td class="num">${s.collected}</td>` +
        `<td>${esc(dash(s.sg_aggregator))}</td><td>${since(s.ts)}</td>` +
        `<td><div class="actions">` +
        controlButton(s.sender, "stop", "Stop", "/", "btn btn-danger btn-small", s.state !== "ACTIVE") +
        controlButton(s.sender, "restart", "Restart", "/", "btn btn-small", s.state !== "INACTIVE") +
        `</div></td></tr>`;
    });
    setHtml("agg-rows", rows.join("") ||
      `<tr><td colspan="11" class="empty">No aggregator has published a status in project ` +
      `${esc(snap.project)} yet.</td></tr>`);
    const sg = snap.sg;
    const panel = document.getElementById("sg-panel");
    const table = document.getElementById("sg-aggregators");
    if (panel) panel.hidden = !sg;
    if (table) table.hidden = !(sg && sg.aggregators.length);
    if (!sg) {
      setHtml("kpi-sg", "none");
      return;
    }
    setHtml("kpi-sg", `${badge(sg.state)} round ${sg.round}`);
    setHtml("sg-updated", `${esc(sg.sender)} · updated ${since(sg.ts)}`);
    const from = sg.regional_from.length ? ` (${sg.regional_from.map(esc).join(", ")})` : "";
    setHtml("sg-body", `<dl class="kv kv-wide">` +
      `<dt>State</dt><dd>${badge(sg.state)}${sg.blocker ? ` <span class="blocker">${esc(sg.blocker)}</span>` : ""}</dd>` +
      `<dt>Round</dt><dd>${sg.round}</dd>` +
      `<dt>Method</dt><dd>${esc(sg.method)}${sg.next_method ? ` (next: ${esc(sg.next_method)})` : ""}</dd>` +
      `<dt>Threshold</dt><dd>${num(sg.threshold)}</dd>` +
      `<dt>Aggregators alive</dt><dd>${sg.alive} (${sg.counted} waited for)</dd>` +
      `<dt>Regional results</dt><dd>${sg.collected} of ${sg.needed} needed${from}</dd></dl>`);
    setHtml("sg-rows", sg.aggregators.map((a) =>
      `<tr><td>${esc(a.name)}</td><td>${badge(a.state)}</td><td class="num">${dash(a.round)}</td>` +
      `<td class="num">${a.agents}</td>` +
      `<td>${a.last_status === null ? "-" : since(sg.ts - a.last_status)}</td>` +
      `<td class="num">${dash(a.last_round)}</td></tr>`).join(""));
  }

  // ---------------------------------------------------------------- aggregation, settings
  function pick(snap) {
    if (!current && snap.aggregators.length) current = snap.aggregators[0].sender;
    return snap.aggregators.find((s) => s.sender === current) || null;
  }

  function renderCommon(s) {
    setHtml("state", s ? badge(s.state) : "-");
    setText("threshold", s ? num(s.threshold) : "-");
    setText("agent-timeout", s ? secondsSetting(s.agent_timeout) : "-");
    setText("max-agents", s ? limit(s.max_agents) : "-");
    setText("max-rounds", s ? limit(s.max_rounds) : "-");
    for (const btn of document.querySelectorAll("button[data-command]")) {
      const command = btn.dataset.command;
      if (command === "stop") btn.disabled = !s || s.state !== "ACTIVE";
      if (command === "restart") btn.disabled = !s || s.state !== "INACTIVE";
      if (command === "complete_round") btn.disabled = !s || s.collected === 0;
    }
  }

  function renderAggregation(snap) {
    const s = pick(snap);
    setText("agg-name", current || "none yet");
    renderCommon(s);
    if (!s) return;
    setHtml("agg-updated", `updated ${since(s.ts)}`);
    setText("blocker", s.blocker || "");
    setText("round", s.round);
    setText("method", s.method + (s.next_method ? ` → ${s.next_method}` : ""));
    setText("active", s.active);
    setText("needed", s.needed);
    setText("collected", s.collected);
    setText("agent-count", s.agents.length + s.agents_omitted);
    const counts = {};
    for (const a of s.agents) counts[a.state] = (counts[a.state] || 0) + 1;
    setHtml("state-counts", ["ACTIVE", "TIMEOUT", "OFFLINE", "REJECTED"]
      .filter((state) => counts[state])
      .map((state) => `${badge(state)}&nbsp;${counts[state]} `).join(""));
    setText("agents-omitted", s.agents_omitted ? `… and ${s.agents_omitted} more not listed` : "");
    const rows = s.agents.map((a) =>
      `<tr><td>${esc(a.name)}</td><td>${badge(a.state)}</td>` +
      `<td>${a.last_heartbeat === null ? "-" : since(s.ts - a.last_heartbeat)}</td>` +
      `<td class="num">${dash(a.last_round)}</td></tr>`);
    setHtml("agent-rows", rows.join("") ||
      `<tr class="empty-row"><td colspan="4" class="empty">No agent known to this aggregator yet.</td></tr>`);
  }

  function renderSettings(snap) {
    const s = pick(snap);
    renderCommon(s);
    if (!s) return;
    setHtml("agg-updated", `as of its status ${since(s.ts)}`);
    setText("method", s.method + (s.next_method ? ` → ${s.next_method} from the next round` : ""));
  }

  const renderers = { overview: renderOverview, aggregation: renderAggregation, settings: renderSettings };

  function connect() {
    const render = renderers[page];
    const agents = page === "aggregation" ? (current || "all") : "none";
    const source = new EventSource(`/api/events?agents=${encodeURIComponent(agents)}`);
    source.addEventListener("snapshot", (event) => {
      const snap = JSON.parse(event.data);
      offset = snap.server_time - Date.now() / 1000;
      setConnection(snap.connected, snap.error);
      if (render) render(snap);
      body.dataset.liveVersion = String(Number(body.dataset.liveVersion || 0) + 1);
    });
    source.onerror = () => {
      setConnection(false, "the dashboard's event stream is reconnecting");
      if (source.readyState === EventSource.CLOSED) {
        // Refused for good: most likely the session ended. Ask where that leaves us.
        fetch("/api/overview", { credentials: "same-origin" }).then((answer) => {
          if (answer.status === 401) {
            window.location.assign(`/login?next=${encodeURIComponent(location.pathname + location.search)}`);
          }
        }).catch(() => undefined);
      }
    };
  }

  connect();
  window.setInterval(tick, 1000);
})();
