// The Sluice console: a small single-page app over the admin API. No framework, no network
// beyond the broker itself.
"use strict";

const state = { auth: sessionStorage.getItem("sluice-auth"), timer: null, view: null };

const $ = (selector, root = document) => root.querySelector(selector);
const h = (tag, attrs = {}, ...children) => {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else if (value === true) el.setAttribute(key, "");
    else if (value !== false && value != null) el.setAttribute(key, value);
  }
  for (const child of children.flat()) {
    if (child == null) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
};

const fmt = {
  int: (n) => (n == null ? "—" : Math.round(n).toLocaleString()),
  rate: (n) => (n >= 1e6 ? (n / 1e6).toFixed(2) + " M/s" : n >= 1e3 ? (n / 1e3).toFixed(1) + " k/s" : Math.round(n) + " /s"),
  bytes: (n) => {
    if (n == null) return "—";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return (i ? n.toFixed(1) : n) + " " + units[i];
  },
  time: (ms) => (ms ? new Date(ms).toLocaleString() : "—"),
  duration: (ms) => {
    const s = Math.floor(ms / 1000);
    const d = Math.floor(s / 86400), hr = Math.floor((s % 86400) / 3600), m = Math.floor((s % 3600) / 60);
    return d ? `${d}d ${hr}h` : hr ? `${hr}h ${m}m` : m ? `${m}m ${s % 60}s` : `${s}s`;
  },
};

class ApiError extends Error {
  constructor(status, detail) { super(detail); this.status = status; }
}

async function api(path, options = {}) {
  const headers = { "X-Sluice-Console": "1", Authorization: "Basic " + state.auth };
  if (options.body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method: options.method || "GET",
    headers,
    body: options.body !== undefined ? JSON.stringify(options.body) : undefined,
  });
  if (response.status === 204) return null;
  const text = await response.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (_) { data = null; }
  if (response.status === 401) {
    const detail = (data && data.detail) || "Please log in.";
    logout(detail);
    throw new ApiError(401, detail);
  }
  if (!response.ok) throw new ApiError(response.status, (data && data.detail) || response.statusText);
  return data;
}

// ---- login ----

function showLogin(message = "") {
  $("#app").hidden = true;
  $("#login").hidden = false;
  $("#login-error").textContent = message;
}

function logout(message = "") {
  sessionStorage.removeItem("sluice-auth");
  state.auth = null;
  clearInterval(state.timer);
  showLogin(message);
}

$("#login-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  state.auth = btoa($("#login-user").value + ":" + $("#login-password").value);
  try {
    await api("/api/overview");
    sessionStorage.setItem("sluice-auth", state.auth);
    start();
  } catch (error) {
    showLogin(error.message);
  }
});
$("#logout").addEventListener("click", () => logout());

// ---- chart ----

function drawChart(canvas, series, labels) {
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth, height = canvas.clientHeight;
  canvas.width = width * ratio; canvas.height = height * ratio;
  const ctx = canvas.getContext("2d");
  ctx.scale(ratio, ratio);
  ctx.clearRect(0, 0, width, height);
  const pad = { l: 56, r: 10, t: 10, b: 22 };
  const points = series[0].values.length;
  const peak = Math.max(1, ...series.flatMap((s) => s.values));
  const step = Math.pow(10, Math.floor(Math.log10(peak)));
  const max = [1, 2, 2.5, 5, 10].map((m) => m * step).find((m) => m >= peak);
  ctx.strokeStyle = "#e3e6ec"; ctx.fillStyle = "#6b7385"; ctx.font = "11px system-ui"; ctx.lineWidth = 1;
  for (let i = 0; i <= 4; i++) {
    const y = pad.t + ((height - pad.t - pad.b) * i) / 4;
    ctx.beginPath(); ctx.moveTo(pad.l, y); ctx.lineTo(width - pad.r, y); ctx.stroke();
    ctx.fillText(fmt.rate((max * (4 - i)) / 4).replace(" /s", "/s"), 4, y + 4);
  }
  if (labels.length) {
    ctx.fillText(labels[0], pad.l, height - 6);
    const last = labels[labels.length - 1];
    ctx.fillText(last, width - pad.r - ctx.measureText(last).width, height - 6);
  }
  for (const s of series) {
    ctx.strokeStyle = s.color; ctx.lineWidth = 2; ctx.beginPath();
    s.values.forEach((v, i) => {
      const x = pad.l + ((width - pad.l - pad.r) * i) / Math.max(1, points - 1);
      const y = pad.t + (height - pad.t - pad.b) * (1 - v / max);
      if (i) ctx.lineTo(x, y); else ctx.moveTo(x, y);
    });
    ctx.stroke();
  }
}

// ---- views ----

function table(columns, rows, empty) {
  if (!rows.length) return h("div", { class: "card table-card" }, h("div", { class: "empty" }, empty));
  return h("div", { class: "card table-card" },
    h("table", {},
      h("thead", {}, h("tr", {}, columns.map((c) => h("th", { class: c.num ? "num" : null }, c.title)))),
      h("tbody", {}, rows.map((row) => h("tr", { "data-row": row._key || null },
        columns.map((c) => h("td", { class: c.num ? "num" : null }, c.render(row))))))));
}

function stat(label, value) {
  return h("div", { class: "stat" }, h("div", { class: "label" }, label), h("div", { class: "value" }, value));
}

const views = {
  async overview(root) {
    const [overview, history] = await Promise.all([api("/api/overview"), api("/api/overview/history")]);
    $("#node-info").textContent = `node ${overview.node_id} · v${overview.version}`;
    const t = overview.totals, r = overview.rates;
    const canvas = h("canvas", { id: "throughput" });
    root.replaceChildren(
      h("div", { class: "toolbar" }, h("h1", {}, "Overview"), h("span", { class: "note" }, "up " + fmt.duration(overview.uptime_ms))),
      h("div", { class: "cards" },
        stat("Records in", fmt.rate(r.records_in_per_s)),
        stat("Records out", fmt.rate(r.records_out_per_s)),
        stat("Bytes in", fmt.bytes(r.bytes_in_per_s) + "/s"),
        stat("Topics", fmt.int(t.topics)),
        stat("Partitions", fmt.int(t.partitions)),
        stat("Records stored", fmt.int(t.records)),
        stat("Log size", fmt.bytes(t.log_bytes)),
        stat("Consumer groups", fmt.int(t.consumer_groups)),
        stat("Messages published", fmt.rate(r.messages_published_per_s)),
        stat("Messages delivered", fmt.rate(r.messages_delivered_per_s)),
        stat("Queues", fmt.int(t.queues)),
        stat("Messages ready", fmt.int(t.messages_ready)),
        stat("Unacknowledged", fmt.int(t.messages_unacknowledged)),
        stat("Connections", fmt.int(t.connections)),
        stat("Channels", fmt.int(t.channels)),
        stat("Fsync (mean)", overview.fsync_mean_ms.toFixed(2) + " ms"),
        stat("Alarms", t.alarms.length ? t.alarms.join(", ") : "none")),
      h("div", { class: "card chart-card" },
        h("h3", {}, "Throughput, last five minutes"),
        canvas,
        h("div", { class: "legend" },
          h("span", { style: "--c:#2563eb" }, "records in"),
          h("span", { style: "--c:#16a34a" }, "records out"),
          h("span", { style: "--c:#d97706" }, "messages published"),
          h("span", { style: "--c:#9333ea" }, "messages delivered"))),
      h("div", { class: "card" }, h("h3", {}, "Listeners"),
        h("div", {}, Object.entries(overview.listeners).map(([k, v]) => h("div", {}, h("b", {}, k), " ", h("code", {}, v))))));
    const labels = history.length ? [new Date(history[0].at_ms).toLocaleTimeString(), new Date(history[history.length - 1].at_ms).toLocaleTimeString()] : [];
    drawChart(canvas, [
      { color: "#2563eb", values: history.map((s) => s.records_in_per_s) },
      { color: "#16a34a", values: history.map((s) => s.records_out_per_s) },
      { color: "#d97706", values: history.map((s) => s.messages_published_per_s) },
      { color: "#9333ea", values: history.map((s) => s.messages_delivered_per_s) },
    ], labels);
  },

  async topics(root) {
    const topics = await api("/api/topics");
    const name = h("input", { placeholder: "new-topic", id: "new-topic-name", required: true });
    const partitions = h("input", { type: "number", min: "1", value: "1", id: "new-topic-partitions" });
    const message = h("p", { class: "error" });
    const form = h("form", { class: "card form-grid", id: "create-topic" },
      h("label", {}, "Name", name), h("label", {}, "Partitions", partitions), h("button", { type: "submit" }, "Create topic"), message);
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      try {
        await api("/api/topics", { method: "POST", body: { name: name.value, partitions: Number(partitions.value) } });
        location.hash = "#topics/" + encodeURIComponent(name.value);
      } catch (error) { message.textContent = error.message; }
    });
    root.replaceChildren(
      h("div", { class: "toolbar" }, h("h1", {}, "Topics")),
      form,
      table([
        { title: "Name", render: (t) => h("a", { href: "#topics/" + encodeURIComponent(t.name) }, t.name) },
        { title: "Partitions", num: true, render: (t) => fmt.int(t.partitions) },
        { title: "Records", num: true, render: (t) => fmt.int(t.records) },
        { title: "Size", num: true, render: (t) => fmt.bytes(t.size_bytes) },
        { title: "In since start", num: true, render: (t) => fmt.int(t.records_in) },
        { title: "Out since start", num: true, render: (t) => fmt.int(t.records_out) },
      ], topics.map((t) => ({ ...t, _key: t.name })), "No topics yet."));
  },

  async topic(root, name) {
    const topic = await api("/api/topics/" + encodeURIComponent(name));
    const messages = await api(`/api/topics/${encodeURIComponent(name)}/messages?limit=20`);
    const key = h("input", { placeholder: "key (optional)", id: "publish-key" });
    const value = h("textarea", { placeholder: "message value", id: "publish-value", required: true });
    const result = h("p", { class: "note", id: "publish-result" });
    const publish = h("form", { class: "card", id: "publish-form" },
      h("h3", {}, "Publish a test message"),
      h("div", { class: "form-grid" }, h("label", {}, "Key", key)),
      h("label", { class: "note" }, "Value", value),
      h("p", {}, h("button", { type: "submit" }, "Publish")), result);
    publish.addEventListener("submit", async (event) => {
      event.preventDefault();
      try {
        const body = { value: value.value };
        if (key.value) body.key = key.value;
        const out = await api(`/api/topics/${encodeURIComponent(name)}/messages`, { method: "POST", body });
        result.textContent = `Published to partition ${out.partition} at offset ${out.offset}.`;
        setTimeout(() => render(), 300);
      } catch (error) { result.textContent = error.message; }
    });
    const remove = h("button", { class: "danger", onclick: async () => {
      if (!confirm(`Delete topic ${name} and all its data?`)) return;
      await api("/api/topics/" + encodeURIComponent(name), { method: "DELETE" });
      location.hash = "#topics";
    } }, "Delete topic");
    root.replaceChildren(
      h("div", { class: "toolbar" }, h("h1", {}, "Topic ", h("code", {}, topic.name)), remove),
      h("p", { class: "note" }, "id ", h("code", {}, topic.id), " · created " + fmt.time(topic.created_ms)),
      h("h2", {}, "Partitions"),
      table([
        { title: "Partition", render: (p) => p.partition },
        { title: "Leader", render: (p) => p.leader ?? "none" },
        { title: "Epoch", num: true, render: (p) => p.epoch },
        { title: "Replicas", render: (p) => p.replicas.join(", ") },
        { title: "Moving", render: (p) => p.adding == null ? "—"
          : [p.adding.length ? `+${p.adding.join(", +")}` : "", p.removing.length ? `−${p.removing.join(", −")}` : ""]
            .filter(Boolean).join(" ") || "—" },
        { title: "Followers (lag)", render: (p) => p.followers == null ? "—"
          : p.followers.map((f) => `${f.node}${f.voter === false ? " (learner)" : f.in_sync ? "" : " (out of sync)"}: ${f.lag ?? "?"}`).join(", ") },
        { title: "Start offset", num: true, render: (p) => fmt.int(p.log_start_offset) },
        { title: "High watermark", num: true, render: (p) => fmt.int(p.high_watermark) },
        { title: "Size", num: true, render: (p) => fmt.bytes(p.size_bytes) },
        { title: "Segments", num: true, render: (p) => p.segments ?? "—" },
      ], topic.partitions, "No partitions."),
      h("div", { class: "two" },
        publish,
        h("div", { class: "card" }, h("h3", {}, "Configuration"),
          h("table", {}, h("tbody", {}, topic.config.map((c) => h("tr", {},
            h("td", { class: "mono" }, c.name),
            h("td", { class: "mono" }, c.value, c.is_default ? null : h("span", { class: "badge" }, " override")))))))),
      h("h2", {}, "Latest messages"),
      table([
        { title: "Partition", render: (m) => m.partition },
        { title: "Offset", num: true, render: (m) => m.offset },
        { title: "Time", render: (m) => fmt.time(m.timestamp_ms) },
        { title: "Key", render: (m) => h("code", {}, m.key ?? (m.key_base64 ? "base64:" + m.key_base64 : "—")) },
        { title: "Value", render: (m) => h("pre", { class: "message mono" }, m.value ?? (m.value_base64 ? "base64:" + m.value_base64 : "null")) },
      ], messages.map((m) => ({ ...m, _key: m.partition + ":" + m.offset })), "No messages."));
  },

  async groups(root) {
    const groups = await api("/api/groups");
    root.replaceChildren(
      h("div", { class: "toolbar" }, h("h1", {}, "Consumer groups")),
      table([
        { title: "Group", render: (g) => h("a", { href: "#groups/" + encodeURIComponent(g.group_id) }, g.group_id) },
        { title: "State", render: (g) => h("span", { class: "badge " + (g.state === "Stable" ? "good" : "warn") }, g.state) },
        { title: "Members", num: true, render: (g) => g.members },
        { title: "Lag", num: true, render: (g) => fmt.int(g.lag) },
      ], groups.map((g) => ({ ...g, _key: g.group_id })), "No consumer groups yet."));
  },

  async group(root, id) {
    const g = await api("/api/groups/" + encodeURIComponent(id));
    root.replaceChildren(
      h("div", { class: "toolbar" }, h("h1", {}, "Group ", h("code", {}, g.group_id)), h("span", { class: "badge" }, g.state)),
      h("p", { class: "note" }, `protocol ${g.protocol || "—"} · generation ${g.generation} · total lag ${fmt.int(g.lag)}`),
      h("h2", {}, "Members"),
      table([
        { title: "Member", render: (m) => h("code", {}, m.member_id) },
        { title: "Client", render: (m) => m.client_id + " " + m.client_host },
        { title: "Assignment", render: (m) => m.assignment.map((a) => `${a.topic} [${a.partitions.join(", ")}]`).join("; ") },
      ], g.members, "No active members."),
      h("h2", {}, "Offsets and lag"),
      table([
        { title: "Topic", render: (o) => o.topic },
        { title: "Partition", num: true, render: (o) => o.partition },
        { title: "Committed", num: true, render: (o) => fmt.int(o.committed) },
        { title: "High watermark", num: true, render: (o) => fmt.int(o.high_watermark) },
        { title: "Lag", num: true, render: (o) => fmt.int(o.lag) },
      ], g.offsets, "No committed offsets."));
  },

  async queues(root) {
    const [queues, vhosts] = await Promise.all([api("/api/queues"), api("/api/vhosts")]);
    const vhost = h("select", { id: "new-queue-vhost" }, vhosts.map((v) => h("option", { value: v.name }, v.name)));
    const name = h("input", { placeholder: "new-queue", id: "new-queue-name", required: true });
    const durable = h("input", { type: "checkbox", id: "new-queue-durable", checked: true });
    const message = h("p", { class: "error" });
    const form = h("form", { class: "card form-grid", id: "declare-queue" },
      h("label", {}, "Virtual host", vhost), h("label", {}, "Name", name),
      h("label", { class: "check" }, durable, "Durable"), h("button", { type: "submit" }, "Declare queue"), message);
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      try {
        await api(`/api/queues/${encodeURIComponent(vhost.value)}/${encodeURIComponent(name.value)}`,
          { method: "PUT", body: { durable: durable.checked } });
        location.hash = `#queues/${encodeURIComponent(vhost.value)}/${encodeURIComponent(name.value)}`;
      } catch (error) { message.textContent = error.message; }
    });
    root.replaceChildren(h("div", { class: "toolbar" }, h("h1", {}, "Queues")),
      form,
      table([
        { title: "Virtual host", render: (q) => q.vhost },
        { title: "Name", render: (q) => [h("a", { href: `#queues/${encodeURIComponent(q.vhost)}/${encodeURIComponent(q.name)}` }, q.name),
          q.unreadable ? h("span", { class: "badge warn", title: q.unreadable.reason }, " unreadable message") : null] },
        { title: "Features", render: (q) => [q.durable ? "D" : null, q.auto_delete ? "AD" : null, q.exclusive ? "Excl" : null,
          Object.keys(q.arguments).length ? "Args" : null].filter(Boolean).join(" ") },
        { title: "Ready", num: true, render: (q) => fmt.int(q.messages_ready) },
        { title: "Unacked", num: true, render: (q) => fmt.int(q.messages_unacknowledged) },
        { title: "Consumers", num: true, render: (q) => fmt.int(q.consumers) },
        { title: "Publish", num: true, render: (q) => fmt.rate(q.rates.publish_per_s) },
        { title: "Deliver", num: true, render: (q) => fmt.rate(q.rates.deliver_per_s) },
        { title: "Ack", num: true, render: (q) => fmt.rate(q.rates.ack_per_s) },
      ], queues.map((q) => ({ ...q, _key: q.vhost + "/" + q.name })), "No queues yet."));
  },

  async queue(root, vhost, name) {
    const path = `/api/queues/${encodeURIComponent(vhost)}/${encodeURIComponent(name)}`;
    const [q, bindings] = await Promise.all([api(path), api("/api/bindings/" + encodeURIComponent(vhost))]);
    const body = h("textarea", { placeholder: "message body", id: "queue-publish-body", required: true });
    const persistent = h("input", { type: "checkbox", id: "queue-publish-persistent", checked: true });
    const result = h("p", { class: "note", id: "queue-publish-result" });
    const publish = h("form", { class: "card", id: "queue-publish-form" },
      h("h3", {}, "Publish a message"),
      h("p", { class: "note" }, "Sent through the default exchange with the queue's name as routing key."),
      h("label", { class: "note" }, "Body", body),
      h("label", { class: "check" }, persistent, "Persistent"),
      h("p", {}, h("button", { type: "submit" }, "Publish")), result);
    publish.addEventListener("submit", async (event) => {
      event.preventDefault();
      try {
        const out = await api(`/api/exchanges/${encodeURIComponent(vhost)}/amq.default/publish`, { method: "POST",
          body: { routing_key: name, payload: body.value, properties: persistent.checked ? { delivery_mode: 2 } : {} } });
        result.textContent = out.routed ? "Published." : "Not routed: the queue is gone.";
        body.value = "";
        setTimeout(() => render(), 300);
      } catch (error) { result.textContent = error.message; }
    });
    const peeked = h("div", { id: "queue-peeked" });
    const count = h("input", { type: "number", min: "1", max: "100", value: "10", id: "queue-get-count" });
    const peek = h("form", { class: "card", id: "queue-get-form" },
      h("h3", {}, "Get messages"),
      h("p", { class: "note" }, "Messages are put back in the queue (marked redelivered)."),
      h("div", { class: "form-grid" }, h("label", {}, "Count", count), h("button", { type: "submit" }, "Get messages")));
    peek.addEventListener("submit", async (event) => {
      event.preventDefault();
      try {
        const messages = await api(path + "/get", { method: "POST", body: { count: Number(count.value) } });
        peeked.replaceChildren(h("h2", {}, "Messages"), table([
          { title: "#", num: true, render: (m) => m._key },
          { title: "Exchange", render: (m) => m.exchange || "(default)" },
          { title: "Routing key", render: (m) => h("code", {}, m.routing_key) },
          { title: "Redelivered", render: (m) => (m.redelivered ? "yes" : "no") },
          { title: "Properties", render: (m) => h("code", {}, JSON.stringify(m.properties)) },
          { title: "Payload", render: (m) => h("pre", { class: "message mono" }, m.payload ?? "base64:" + m.payload_base64) },
        ], messages.map((m, i) => ({ ...m, _key: i + 1 })), "The queue is empty."));
      } catch (error) { peeked.replaceChildren(h("div", { class: "card error" }, error.message)); }
    });
    const purge = h("button", { onclick: async () => {
      if (!confirm(`Drop every ready message of ${name}?`)) return;
      await api(path + "/contents", { method: "DELETE" });
      render();
    } }, "Purge");
    const remove = h("button", { class: "danger", onclick: async () => {
      if (!confirm(`Delete queue ${name} and its messages?`)) return;
      await api(path, { method: "DELETE" });
      location.hash = "#queues";
    } }, "Delete queue");
    root.replaceChildren(
      h("div", { class: "toolbar" }, h("h1", {}, "Queue ", h("code", {}, q.name)), h("span", {}, purge, " ", remove)),
      h("p", { class: "note" }, `virtual host ${q.vhost} · ${q.durable ? "durable" : "transient"}` +
        (q.auto_delete ? " · auto-delete" : "") + (q.exclusive ? " · exclusive" : "") + " · created " + fmt.time(q.created_ms)),
      q.unreadable ? h("div", { class: "card alarm", id: "queue-unreadable" },
        h("h3", {}, "Unreadable message"),
        h("p", {}, `The queue cannot read its message at offset ${q.unreadable.offset} (${q.unreadable.reason}), in `,
          h("code", {}, q.unreadable.file),
          q.unreadable.position == null ? "" : ` at byte ${q.unreadable.position}`,
          `, since ${fmt.time(q.unreadable.since_ms)}. It keeps the message and delivers nothing past it; ` +
          "it tries again every few seconds. Restore the file, or purge or delete the queue to go on without it.")) : "",
      h("div", { class: "cards", id: "queue-stats" },
        stat("Ready", fmt.int(q.messages_ready)),
        stat("Unacked", fmt.int(q.messages_unacknowledged)),
        stat("Consumers", fmt.int(q.consumers)),
        stat("Published", fmt.int(q.published)),
        stat("Delivered", fmt.int(q.delivered)),
        stat("Acknowledged", fmt.int(q.acked)),
        stat("Publish rate", fmt.rate(q.rates.publish_per_s)),
        stat("Deliver rate", fmt.rate(q.rates.deliver_per_s))),
      Object.keys(q.arguments).length ? h("div", { class: "card" }, h("h3", {}, "Arguments"), h("code", {}, JSON.stringify(q.arguments))) : null,
      h("div", { class: "two" }, publish, peek),
      peeked,
      h("h2", {}, "Bindings"),
      table([
        { title: "From exchange", render: (b) => b.source || "(default)" },
        { title: "Routing key", render: (b) => h("code", {}, b.routing_key) },
        { title: "Arguments", render: (b) => h("code", {}, JSON.stringify(b.arguments)) },
      ], bindings.filter((b) => b.destination_type === "queue" && b.destination === name)
        .map((b) => ({ ...b, _key: b.source + "/" + b.routing_key })), "Only the default exchange routes to this queue."));
  },

  async exchanges(root) {
    const exchanges = await api("/api/exchanges");
    root.replaceChildren(h("div", { class: "toolbar" }, h("h1", {}, "Exchanges")),
      table([
        { title: "Virtual host", render: (e) => e.vhost },
        { title: "Name", render: (e) => h("a", { href: `#exchanges/${encodeURIComponent(e.vhost)}/${encodeURIComponent(e.name || "amq.default")}` }, e.name || "(default)") },
        { title: "Type", render: (e) => e.type },
        { title: "Features", render: (e) => [e.durable ? "D" : null, e.auto_delete ? "AD" : null, e.internal ? "I" : null].filter(Boolean).join(" ") },
        { title: "Bindings", num: true, render: (e) => fmt.int(e.bindings) },
      ], exchanges.map((e) => ({ ...e, _key: e.vhost + "/" + e.name })), "No exchanges."));
  },

  async exchange(root, vhost, name) {
    const path = `/api/exchanges/${encodeURIComponent(vhost)}/${encodeURIComponent(name)}`;
    const [x, bindings] = await Promise.all([api(path), api("/api/bindings/" + encodeURIComponent(vhost))]);
    const key = h("input", { placeholder: "routing key", id: "exchange-publish-key" });
    const body = h("textarea", { placeholder: "message body", id: "exchange-publish-body", required: true });
    const result = h("p", { class: "note", id: "exchange-publish-result" });
    const publish = h("form", { class: "card", id: "exchange-publish-form" },
      h("h3", {}, "Publish a message"),
      h("div", { class: "form-grid" }, h("label", {}, "Routing key", key)),
      h("label", { class: "note" }, "Body", body),
      h("p", {}, h("button", { type: "submit" }, "Publish")), result);
    publish.addEventListener("submit", async (event) => {
      event.preventDefault();
      try {
        const out = await api(path + "/publish", { method: "POST", body: { routing_key: key.value, payload: body.value } });
        result.textContent = out.routed ? `Routed to ${out.queues} queue${out.queues === 1 ? "" : "s"}.` : "Not routed to any queue.";
      } catch (error) { result.textContent = error.message; }
    });
    const queue = h("input", { placeholder: "queue", id: "bind-queue", required: true });
    const bindKey = h("input", { placeholder: "routing key", id: "bind-key" });
    const bindMessage = h("p", { class: "error" });
    const bind = h("form", { class: "card", id: "bind-form" },
      h("h3", {}, "Bind a queue"),
      h("div", { class: "form-grid" }, h("label", {}, "Queue", queue), h("label", {}, "Routing key", bindKey),
        h("button", { type: "submit" }, "Bind")), bindMessage);
    bind.addEventListener("submit", async (event) => {
      event.preventDefault();
      try {
        await api("/api/bindings/" + encodeURIComponent(vhost), { method: "POST",
          body: { source: x.name, destination: queue.value, destination_type: "queue", routing_key: bindKey.value } });
        render();
      } catch (error) { bindMessage.textContent = error.message; }
    });
    const builtIn = x.name === "" || x.name.startsWith("amq.");
    root.replaceChildren(
      h("div", { class: "toolbar" }, h("h1", {}, "Exchange ", h("code", {}, x.name || "(default)")),
        builtIn ? null : h("button", { class: "danger", onclick: async () => {
          if (!confirm(`Delete exchange ${x.name}?`)) return;
          await api(path, { method: "DELETE" });
          location.hash = "#exchanges";
        } }, "Delete exchange")),
      h("p", { class: "note" }, `${x.type} · virtual host ${x.vhost} · ${x.durable ? "durable" : "transient"}` +
        (x.internal ? " · internal" : "") + (Object.keys(x.arguments).length ? " · " + JSON.stringify(x.arguments) : "")),
      h("div", { class: "two" }, x.internal ? null : publish, x.name === "" ? null : bind),
      h("h2", {}, "Bindings from this exchange"),
      table([
        { title: "To", render: (b) => `${b.destination_type} ${b.destination}` },
        { title: "Routing key", render: (b) => h("code", {}, b.routing_key) },
        { title: "Arguments", render: (b) => h("code", {}, JSON.stringify(b.arguments)) },
        { title: "", render: (b) => h("button", { class: "danger", onclick: async () => {
          await api("/api/bindings/" + encodeURIComponent(vhost), { method: "DELETE",
            body: { source: b.source, destination: b.destination, destination_type: b.destination_type, routing_key: b.routing_key, arguments: b.arguments } });
          render();
        } }, "Unbind") },
      ], bindings.filter((b) => b.source === x.name).map((b) => ({ ...b, _key: b.destination_type + "/" + b.destination + "/" + b.routing_key })),
      x.name === "" ? "The default exchange routes to every queue by its name." : "No bindings."));
  },

  async admin(root) {
    const [vhosts, users, permissions] = await Promise.all([api("/api/vhosts"), api("/api/users"), api("/api/permissions")]);
    const message = h("p", { class: "error", id: "admin-error", role: "alert" });
    const attempt = (work) => async (event) => {
      if (event) event.preventDefault();
      try { await work(); message.textContent = ""; await render(); } catch (error) { message.textContent = error.message; }
    };
    const segment = encodeURIComponent;

    const vhostName = h("input", { placeholder: "new-vhost", id: "new-vhost-name", required: true });
    const vhostForm = h("form", { class: "card form-grid", id: "add-vhost" },
      h("label", {}, "Name", vhostName), h("button", { type: "submit" }, "Add virtual host"));
    vhostForm.addEventListener("submit", attempt(() => api("/api/vhosts/" + segment(vhostName.value), { method: "PUT" })));

    const userName = h("input", { placeholder: "new-user", id: "new-user-name", required: true });
    const password = h("input", { type: "password", id: "new-user-password", autocomplete: "new-password" });
    const tags = h("input", { placeholder: "administrator, monitoring", id: "new-user-tags" });
    const userForm = h("form", { class: "card form-grid", id: "add-user" },
      h("label", {}, "Name", userName), h("label", {}, "Password", password), h("label", {}, "Tags", tags),
      h("button", { type: "submit" }, "Add or update user"));
    userForm.addEventListener("submit", attempt(() => {
      const body = { tags: tags.value.split(",").map((t) => t.trim()).filter(Boolean) };
      if (password.value) body.password = password.value;
      return api("/api/users/" + segment(userName.value), { method: "PUT", body });
    }));

    const permissionUser = h("select", { id: "permission-user" }, users.map((u) => h("option", { value: u.name }, u.name)));
    const permissionVhost = h("select", { id: "permission-vhost" }, vhosts.map((v) => h("option", { value: v.name }, v.name)));
    const pattern = (id) => h("input", { id, value: ".*", required: true });
    const configure = pattern("permission-configure"), write = pattern("permission-write"), read = pattern("permission-read");
    const permissionForm = h("form", { class: "card form-grid", id: "set-permission" },
      h("label", {}, "User", permissionUser), h("label", {}, "Virtual host", permissionVhost),
      h("label", {}, "Configure", configure), h("label", {}, "Write", write), h("label", {}, "Read", read),
      h("button", { type: "submit" }, "Set permissions"));
    permissionForm.addEventListener("submit", attempt(() =>
      api(`/api/permissions/${segment(permissionVhost.value)}/${segment(permissionUser.value)}`,
        { method: "PUT", body: { configure: configure.value, write: write.value, read: read.value } })));

    root.replaceChildren(h("div", { class: "toolbar" }, h("h1", {}, "Users and virtual hosts")),
      message,
      h("h2", {}, "Virtual hosts"),
      vhostForm,
      table([
        { title: "Name", render: (v) => v.name },
        { title: "Queues", num: true, render: (v) => fmt.int(v.queues) },
        { title: "Exchanges", num: true, render: (v) => fmt.int(v.exchanges) },
        { title: "Ready", num: true, render: (v) => fmt.int(v.messages_ready) },
        { title: "Unacked", num: true, render: (v) => fmt.int(v.messages_unacknowledged) },
        { title: "", render: (v) => h("button", { class: "danger", onclick: attempt(() => {
          if (!confirm(`Delete virtual host ${v.name} with its queues, messages, exchanges and permissions? Its connections are closed.`)) return null;
          return api("/api/vhosts/" + segment(v.name), { method: "DELETE" });
        }) }, "Delete") },
      ], vhosts.map((v) => ({ ...v, _key: "vhost:" + v.name })), "No virtual hosts."),
      h("h2", {}, "Users"),
      userForm,
      table([
        { title: "Name", render: (u) => u.name },
        { title: "Tags", render: (u) => u.tags.join(", ") || "—" },
        { title: "Virtual hosts", render: (u) => u.vhosts.join(", ") || "—" },
        { title: "", render: (u) => h("button", { class: "danger", onclick: attempt(() =>
          api("/api/users/" + segment(u.name), { method: "DELETE" })) }, "Delete") },
      ], users.map((u) => ({ ...u, _key: "user:" + u.name })), "No users."),
      h("h2", {}, "Permissions"),
      permissionForm,
      table([
        { title: "User", render: (p) => p.user },
        { title: "Virtual host", render: (p) => p.vhost },
        { title: "Configure", render: (p) => h("code", {}, p.configure) },
        { title: "Write", render: (p) => h("code", {}, p.write) },
        { title: "Read", render: (p) => h("code", {}, p.read) },
        { title: "", render: (p) => h("button", { class: "danger", onclick: attempt(() =>
          api(`/api/permissions/${segment(p.vhost)}/${segment(p.user)}`, { method: "DELETE" })) }, "Clear") },
      ], permissions.map((p) => ({ ...p, _key: "permission:" + p.vhost + "/" + p.user })), "No permissions."));
  },

  async cluster(root) {
    const c = await api("/api/cluster");
    const removable = (n) => n.id !== c.node_id;
    root.replaceChildren(
      h("div", { class: "toolbar" }, h("h1", {}, "Cluster"),
        h("span", { class: "note" }, c.from_leader ? `as node ${c.reported_by} (the leader) sees it`
          : `as node ${c.reported_by} sees it: the leader did not answer, so lag and last contact are unknown`)),
      h("div", { class: "cards" },
        stat("Cluster", c.cluster_id ?? "forming"),
        stat("This node", String(c.node_id)),
        stat("Leader", c.leader == null ? "none" : String(c.leader)),
        stat("Term", fmt.int(c.term)),
        stat("Commit index", c.commit_index == null ? "—" : fmt.int(c.commit_index)),
        stat("Applied index", c.applied_index == null ? "—" : fmt.int(c.applied_index)),
        stat("Nodes", fmt.int(c.nodes.length))),
      table([
        { title: "Id", render: (n) => h("code", {}, String(n.id)) },
        { title: "Role", render: (n) => n.role },
        { title: "Cluster address", render: (n) => n.cluster_addr ?? "—" },
        { title: "Kafka", render: (n) => n.kafka_addr ?? "—" },
        { title: "AMQP", render: (n) => n.amqp_addr ?? "—" },
        { title: "HTTP", render: (n) => n.http_addr ? h("a", { href: "http://" + n.http_addr + "/#cluster" }, n.http_addr) : "—" },
        { title: "Lag", num: true, render: (n) => n.lag == null ? "—" : fmt.int(n.lag) },
        { title: "Last contact", num: true, render: (n) => n.last_contact_ms == null ? "—" : n.last_contact_ms + " ms" },
        { title: "Joined", render: (n) => n.joined_ms == null ? "—" : fmt.time(n.joined_ms) },
        { title: "", render: (n) => removable(n) ? h("button", { class: "danger", onclick: async () => {
          if (!confirm(`Remove node ${n.id} from the cluster for good? Its id is retired; it can only come back with an empty data directory.`)) return;
          await api("/api/cluster/nodes/" + n.id, { method: "DELETE" });
          setTimeout(() => render(), 300);
        } }, "Remove") : "" },
      ], c.nodes.map((n) => ({ ...n, _key: "node:" + n.id })), "No nodes yet."));
  },

  async connections(root) {
    const [connections, channels] = await Promise.all([api("/api/connections"), api("/api/channels")]);
    root.replaceChildren(h("div", { class: "toolbar" }, h("h1", {}, "Connections")),
      table([
        { title: "Id", render: (c) => h("code", {}, c.id) },
        { title: "Protocol", render: (c) => c.protocol },
        { title: "Peer", render: (c) => c.peer },
        { title: "Client", render: (c) => c.client_id },
        { title: "User", render: (c) => c.user ?? "—" },
        { title: "Virtual host", render: (c) => c.vhost ?? "—" },
        { title: "Channels", num: true, render: (c) => fmt.int(c.channels) },
        { title: "Since", render: (c) => fmt.time(c.connected_at_ms) },
        { title: "Received", num: true, render: (c) => fmt.bytes(c.bytes_in) },
        { title: "Sent", num: true, render: (c) => fmt.bytes(c.bytes_out) },
        { title: "", render: (c) => h("button", { class: "danger", onclick: async () => {
          await api("/api/connections/" + encodeURIComponent(c.id), { method: "DELETE" });
          setTimeout(() => render(), 300);
        } }, "Close") },
      ], connections.map((c) => ({ ...c, _key: c.id })), "No client connections."),
      h("h2", {}, "AMQP channels"),
      table([
        { title: "Connection", render: (c) => h("code", {}, c.connection) },
        { title: "Channel", num: true, render: (c) => c.number },
        { title: "User", render: (c) => c.user },
        { title: "Virtual host", render: (c) => c.vhost },
        { title: "Consumers", num: true, render: (c) => c.consumers },
        { title: "Unacked", num: true, render: (c) => c.unacknowledged },
        { title: "Prefetch", num: true, render: (c) => c.prefetch || "∞" },
        { title: "Mode", render: (c) => [c.confirm ? "confirm" : null, c.transactional ? "tx" : null].filter(Boolean).join(" ") || "—" },
      ], channels.map((c) => ({ ...c, _key: c.connection + ":" + c.number })), "No open channels."));
  },
};

async function render() {
  const [view, ...args] = (location.hash.slice(1) || "overview").split("/");
  const [name, second] = args.map(decodeURIComponent);
  for (const link of document.querySelectorAll(".sidebar a")) link.classList.toggle("active", link.dataset.view === view);
  const root = $("#view");
  try {
    if (view === "topics" && name) await views.topic(root, name);
    else if (view === "groups" && name) await views.group(root, name);
    else if (view === "queues" && second != null) await views.queue(root, name, second);
    else if (view === "exchanges" && second != null) await views.exchange(root, name, second);
    else await (views[view] || views.overview)(root);
  } catch (error) {
    if (error.status !== 401) root.replaceChildren(h("div", { class: "card error" }, error.message));
  }
}

function start() {
  $("#login").hidden = true;
  $("#app").hidden = false;
  render();
  clearInterval(state.timer);
  // Live views refresh themselves; forms are left alone while someone types in them.
  state.timer = setInterval(() => {
    const view = (location.hash.slice(1) || "overview").split("/")[0];
    const typing = document.activeElement && ["INPUT", "TEXTAREA"].includes(document.activeElement.tagName);
    if (!typing && ["overview", "groups", "queues", "connections", "cluster"].includes(view) && (view === "groups" || !location.hash.includes("/"))) render();
  }, 2000);
}

window.addEventListener("hashchange", render);
if (state.auth) start(); else showLogin();
