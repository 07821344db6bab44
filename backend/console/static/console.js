"use strict";
// The sealmq console page. Every value shown comes from the backend's JSON and is put into the page as
// text (textContent, element attributes set through the DOM API): a device's strings cannot become markup.
(function () {
  const MAX_ROWS = 100;
  const HEX_SHOWN = 48;       // bytes of ciphertext shown per broker-view line
  const charts = new Map();   // device -> {plot, points: [{t, values}], latest: element}
  let field = "";             // the telemetry value charted
  const brokerRows = new Map();

  function el(tag, text, cls) {
    const e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = String(text);
    if (cls) e.className = cls;
    return e;
  }
  function time(t) { return t ? new Date(t * 1000).toLocaleTimeString() : "—"; }
  function bytes(n) {
    if (n >= 1048576) return (n / 1048576).toFixed(1) + " MB";
    if (n >= 1024) return (n / 1024).toFixed(1) + " KB";
    return n + " B";
  }
  async function getJson(url) {
    const r = await fetch(url, {credentials: "same-origin", cache: "no-store"});
    if (r.status === 401) { location.href = "/login"; throw new Error("signed out"); }
    return r.json();
  }
  function setStatus(text, bad) {
    const s = document.getElementById("status");
    s.textContent = text;
    s.className = bad ? "bad" : "muted";
  }

  // -- devices ---------------------------------------------------------------------------------
  function credentialText(c) {
    if (!c) return "—";
    if (c.type === "ccs") return "CCS kid " + c.kid;
    return c.subject + " · serial " + c.serial + " · expires " + c.not_after.slice(0, 10);
  }
  async function loadDevices() {
    const data = await getJson("/api/devices");
    const body = document.querySelector("#devices tbody");
    body.replaceChildren();
    for (const d of data.devices) {
      const tr = el("tr");
      tr.dataset.device = d.id;
      if (d.revoked) tr.className = "revoked";
      tr.append(el("td", d.id, "mono"), el("td", credentialText(d.credential)),
        el("td", d.revoked ? "REVOKED" : d.session, d.session === "established" ? "ok" : "muted"),
        el("td", d.epoch === null ? "—" : d.epoch),
        el("td", d.seen_ago === null ? "never" : d.seen_ago + " s ago"),
        el("td", d.records_in, "num"), el("td", d.records_out, "num"), el("td", d.rejections, "num"));
      body.append(tr);
      if (!charts.has(d.id)) await addChart(d.id);
    }
    if (data.broker_view) {
      const off = document.getElementById("broker-off");
      off.textContent = "Broker view off: " + data.broker_view;
      off.hidden = false;
    }
  }

  // -- telemetry -------------------------------------------------------------------------------
  function numericFields(values) {
    return Object.keys(values).filter((k) => typeof values[k] === "number");
  }
  function chartData(points) {
    const xs = [], ys = [];
    for (const p of points) {
      const v = p.values[field];
      if (typeof v === "number") { xs.push(p.t); ys.push(v); }
    }
    return [xs, ys];
  }
  function refreshFields() {
    const select = document.getElementById("field");
    const names = new Set();
    for (const c of charts.values()) for (const p of c.points.slice(-5)) numericFields(p.values).forEach((k) => names.add(k));
    const have = new Set(Array.from(select.options).map((o) => o.value));
    for (const n of [...names].sort()) if (!have.has(n)) select.append(new Option(n, n));
    if (!field && select.options.length) {
      const preferred = Array.from(select.options).find((o) => o.value === "temperature_c");
      field = (preferred || select.options[0]).value;
      select.value = field;
      for (const c of charts.values()) c.plot.setData(chartData(c.points));
    }
  }
  function showLatest(c, point) {
    c.latest.replaceChildren();
    for (const [k, v] of Object.entries(point.values)) {
      const item = el("span", null, "kv");
      item.append(el("b", k), document.createTextNode(" " + (typeof v === "object" ? JSON.stringify(v) : v)));
      c.latest.append(item);
    }
  }
  async function addChart(device) {
    const box = el("div", null, "chart");
    box.dataset.device = device;
    box.append(el("h3", device));
    const latest = el("div", null, "latest");
    const holder = el("div");
    box.append(holder, latest);
    document.getElementById("charts").append(box);
    const opts = {
      width: 400, height: 170, legend: {show: false},
      // one point (or equal times) would make an empty time range: show a minute around it
      scales: {x: {time: true, range: (u, min, max) => (min === max ? [min - 30, max + 30] : [min, max])}},
      series: [{}, {label: device, stroke: "#2a6fdb", width: 2}],
      axes: [{}, {size: 50}],
    };
    const c = {plot: new uPlot(opts, [[], []], holder), points: [], latest};
    charts.set(device, c);
    const data = await getJson("/api/telemetry?device=" + encodeURIComponent(device) + "&limit=200");
    c.points = data.points.concat(c.points);
    refreshFields();
    c.plot.setData(chartData(c.points));
    if (c.points.length) showLatest(c, c.points[c.points.length - 1]);
  }
  function onTelemetry(ev) {
    const c = charts.get(ev.device);
    if (!c) return;
    c.points.push({t: ev.t, values: ev.values});
    if (c.points.length > 400) c.points.shift();
    refreshFields();
    c.plot.setData(chartData(c.points));
    showLatest(c, {values: ev.values});
    document.getElementById("telemetry-section").dataset.updates =
      String(Number(document.getElementById("telemetry-section").dataset.updates || 0) + 1);
  }

  // -- media -----------------------------------------------------------------------------------
  async function loadMedia() {
    const data = await getJson("/api/media");
    const gallery = document.getElementById("gallery");
    gallery.replaceChildren();
    for (const m of data.media) {
      const card = el("figure", null, "card");
      if (m.inline && m.content_type.startsWith("image/")) {
        const img = el("img", null, "thumb");
        img.src = m.url;
        img.alt = m.name;
        img.loading = "lazy";
        card.append(img);
      } else if (m.inline && m.content_type.startsWith("video/")) {
        const video = el("video", null, "thumb");
        video.src = m.url;
        video.controls = true;
        video.preload = "metadata";
        card.append(video);
      }
      const caption = el("figcaption");
      const link = el("a", m.name);
      link.href = m.url;
      link.download = "";
      caption.append(link, el("div", m.device + " · " + bytes(m.size) + " · " + m.content_type),
        el("div", "SHA-256 " + m.sha256.slice(0, 16) + "…", "mono"),
        el("div", m.signature_verified ? "signature verified" : "NOT VERIFIED", m.signature_verified ? "ok" : "bad"));
      card.append(caption);
      gallery.append(card);
    }
  }

  // -- broker view -----------------------------------------------------------------------------
  function onBroker(e) {
    if (brokerRows.has(e.id)) return;
    const tr = el("tr");
    const wire = el("td", null, "mono wire");
    // a prefix of the hex; the whole line (up to 512 bytes) is in /api/broker
    const shown = e.hex.slice(0, 2 * HEX_SHOWN);
    const cut = shown.length < e.hex.length || e.truncated;
    wire.append(el("span", e.topic, "topic"), document.createTextNode(" " + shown + (cut ? "… (" + e.size + " bytes)" : "")));
    const opened = el("td", e.backend ? e.backend.text : "—", e.backend ? e.backend.status : "muted");
    tr.append(wire, opened);
    brokerRows.set(e.id, opened);
    const body = document.querySelector("#broker tbody");
    body.prepend(tr);
    while (body.rows.length > MAX_ROWS) {
      body.deleteRow(-1);
    }
    if (brokerRows.size > 4 * MAX_ROWS) brokerRows.delete(brokerRows.keys().next().value);
  }
  function onPaired(e) {
    const cell = brokerRows.get(e.id);
    if (cell) { cell.textContent = e.backend.text; cell.className = e.backend.status; }
  }

  // -- audit -----------------------------------------------------------------------------------
  function auditMatches(tr) {
    const q = document.getElementById("audit-filter").value.trim().toLowerCase();
    return !q || tr.dataset.text.includes(q);
  }
  function onAudit(a) {
    const details = Object.entries(a).filter(([k]) => !["ts", "component", "event", "device"].includes(k))
      .map(([k, v]) => k + "=" + v).join(" ");
    const tr = el("tr", null, /rejected|failed|lost/.test(a.event) ? "warn" : "");
    tr.append(el("td", time(a.ts)), el("td", a.event), el("td", a.device || ""), el("td", details, "mono"));
    tr.dataset.text = (a.event + " " + (a.device || "") + " " + details).toLowerCase();
    tr.hidden = !auditMatches(tr);
    const body = document.querySelector("#audit tbody");
    body.prepend(tr);
    while (body.rows.length > 3 * MAX_ROWS) body.deleteRow(-1);
  }
  document.getElementById("audit-filter").addEventListener("input", () => {
    for (const tr of document.querySelectorAll("#audit tbody tr")) tr.hidden = !auditMatches(tr);
  });
  document.getElementById("field").addEventListener("change", (ev) => {
    field = ev.target.value;
    for (const c of charts.values()) c.plot.setData(chartData(c.points));
  });

  // -- live updates ----------------------------------------------------------------------------
  function connect() {
    const source = new EventSource("/api/events");
    source.addEventListener("hello", () => setStatus("live"));
    source.addEventListener("telemetry", (m) => onTelemetry(JSON.parse(m.data)));
    source.addEventListener("broker", (m) => onBroker(JSON.parse(m.data)));
    source.addEventListener("paired", (m) => onPaired(JSON.parse(m.data)));
    source.addEventListener("audit", (m) => onAudit(JSON.parse(m.data)));
    source.addEventListener("media", () => loadMedia());
    source.onerror = () => setStatus("disconnected: retrying", true);
  }

  async function start() {
    connect();
    await loadDevices();
    const [broker, audit] = await Promise.all([getJson("/api/broker?limit=50"), getJson("/api/audit?limit=200")]);
    broker.broker.forEach(onBroker);
    audit.audit.forEach(onAudit);
    await loadMedia();
    setInterval(() => loadDevices().catch(() => setStatus("backend unreachable", true)), 2000);
  }
  start().catch((err) => setStatus(String(err), true));
})();
