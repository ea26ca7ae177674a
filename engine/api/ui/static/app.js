// The cairn dashboard: reads /_cairn/api/v1 and builds every element with
// createElement and textContent. No value from the API is ever parsed as
// HTML, so repository names, tags, actors and annotations show as text.
"use strict";

const API = "../api/v1";

function el(name, attributes, ...children) {
  const node = document.createElement(name);
  for (const [key, value] of Object.entries(attributes || {})) {
    if (key === "className") node.className = value;
    else if (key === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(key, String(value));
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.appendChild(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function repositoryPath(name) {
  return name.split("/").map(encodeURIComponent).join("/");
}

async function api(path, query) {
  const url = new URL(`${API}${path}`, window.location.href);
  for (const [key, value] of Object.entries(query || {})) {
    if (value !== null && value !== undefined && value !== "") url.searchParams.set(key, value);
  }
  const response = await fetch(url, { headers: { Accept: "application/json" } });
  const body = await response.json();
  const position = response.headers.get("Cairn-Position");
  if (position !== null) {
    document.getElementById("position").textContent = `log position ${position}`;
  }
  if (!response.ok) {
    const error = (body.errors && body.errors[0]) || {};
    throw new Error(`${response.status} ${error.code || ""}: ${error.message || ""}`);
  }
  return body;
}

function formatBytes(value) {
  if (value === null || value === undefined) return "";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let size = Number(value);
  let unit = 0;
  while (size >= 1024 && unit < units.length - 1) {
    size /= 1024;
    unit += 1;
  }
  return unit === 0 ? `${size} B` : `${size.toFixed(1)} ${units[unit]}`;
}

function formatTime(value) {
  if (!value) return "";
  return value.replace("T", " ").replace(/\.\d+Z$/, "Z");
}

function hourLabel(value) {
  return value.slice(11, 16);
}

function dayLabel(value) {
  return value.slice(5, 10);
}

function shortDigest(digest) {
  if (!digest) return "";
  const [algorithm, hex] = digest.split(":");
  return `${algorithm}:${(hex || "").slice(0, 12)}`;
}

function actorText(actor) {
  if (!actor) return "";
  return actor.user || actor.address || "";
}

function repositoryLink(name) {
  return el("a", { href: `repository.html?name=${encodeURIComponent(name)}`, className: "repository" }, name);
}

function tagLink(repository, tag) {
  const query = `name=${encodeURIComponent(repository)}&tag=${encodeURIComponent(tag)}`;
  return el("a", { href: `tag.html?${query}`, className: "tag" }, tag);
}

function card(label, value, id) {
  const attributes = id ? { className: "card", id } : { className: "card" };
  return el("div", attributes, el("div", { className: "label" }, label),
    el("div", { className: "value" }, value));
}

// columns: [[heading, cell(row) -> Node|string, numeric?]]
function fillTable(table, columns, rows, append) {
  if (!append) {
    table.replaceChildren(el("thead", {}, el("tr", {},
      ...columns.map(([heading, , numeric]) => el("th", numeric ? { className: "number" } : {}, heading)))));
    table.appendChild(el("tbody"));
  }
  const body = table.tBodies[0];
  for (const row of rows) {
    body.appendChild(el("tr", {}, ...columns.map(([, cell, numeric]) => {
      const value = cell(row);
      const className = numeric ? "number" : (value && value.mono ? "mono" : "");
      return el("td", className ? { className } : {}, value && value.mono ? value.text : value);
    })));
  }
  if (rows.length === 0 && !append) {
    body.appendChild(el("tr", {}, el("td", { colspan: columns.length, className: "empty" }, "None.")));
  }
}

// Adds a caption saying that a table shows only the first page of a longer
// list, and where the query API serves the rest. With options.newestFirst the
// caption calls that page the latest items. options.total, when the API
// returns one, is the length of the whole list.
function noteFirstPage(table, page, rows, noun, apiPath, options = {}) {
  if (!page.next_cursor) return;
  const end = options.newestFirst ? "latest" : "first";
  const count = options.total === undefined ? `${rows.length}` : `${rows.length} of ${options.total}`;
  const link = el("a", { href: `/_cairn/api/v1${apiPath}` }, "the query API");
  table.insertBefore(
    el("caption", { className: "more" },
      `Showing the ${end} ${count} ${noun}; `, link, " pages through the rest."),
    table.firstChild);
}

function mono(text) {
  return { mono: true, text };
}

function showError(target, error) {
  target.replaceChildren(el("p", { className: "error" }, String(error.message || error)));
}

const EVENT_COLUMNS = [
  ["Position", (e) => e.position, true],
  ["Time", (e) => formatTime(e.time)],
  ["Type", (e) => e.type],
  ["Repository", (e) => repositoryLink(e.repository)],
  ["Detail", (e) => mono(e.payload.tag ? `${e.payload.tag} → ${shortDigest(e.payload.digest)}` : shortDigest(e.payload.digest))],
  ["Actor", (e) => actorText(e.actor)],
];

// ---- overview ---------------------------------------------------------------

async function loadActivity(bucket, repository) {
  const series = await api("/activity", { bucket, repository });
  const totals = document.getElementById("activity-totals");
  if (totals) {
    totals.replaceChildren(
      card("Pushes", series.totals.pushes, "total-pushes"),
      card("Deletes", series.totals.deletes, "total-deletes"),
      card("Bytes pushed", formatBytes(series.totals.bytes_pushed), "total-bytes"),
      card("Events", series.totals.events, "total-events"),
    );
  }
  window.cairnCharts.activityChart(document.getElementById("activity-chart"), series,
    formatBytes, bucket === "hour" ? hourLabel : dayLabel);
}

const REPOSITORY_COLUMNS = [
  ["Repository", (r) => repositoryLink(r.name)],
  ["Tags", (r) => r.tag_count, true],
  ["Manifests", (r) => r.manifest_count, true],
  ["Stored", (r) => formatBytes(r.stored_bytes), true],
  ["Pushed", (r) => formatBytes(r.pushed_bytes), true],
  ["Last change", (r) => formatTime(r.updated_at)],
];

let repositoryCursor = null;

async function loadRepositories(append) {
  const table = document.getElementById("repositories");
  const page = await api("/repositories", {
    prefix: document.getElementById("prefix").value.trim(),
    sort: document.getElementById("sort").value,
    order: document.getElementById("order").value,
    n: 50,
    cursor: append ? repositoryCursor : null,
  });
  fillTable(table, REPOSITORY_COLUMNS, page.repositories, append);
  repositoryCursor = page.next_cursor;
  document.getElementById("more-repositories").hidden = !repositoryCursor;
}

async function overview() {
  const range = document.getElementById("range");
  range.addEventListener("change", () => loadActivity(range.value).catch((e) =>
    showError(document.getElementById("activity-chart"), e)));
  for (const id of ["sort", "order"]) {
    document.getElementById(id).addEventListener("change", () => loadRepositories(false));
  }
  document.getElementById("prefix").addEventListener("input", () => loadRepositories(false));
  document.getElementById("more-repositories").addEventListener("click", () => loadRepositories(true));

  const tasks = [
    loadActivity("hour").catch((e) => showError(document.getElementById("activity-chart"), e)),
    api("/top", { by: "size", n: 10 }).then((top) => fillTable(document.getElementById("top-size"), [
      ["Repository", (r) => repositoryLink(r.name)],
      ["Stored", (r) => formatBytes(r.stored_bytes), true],
      ["Tags", (r) => r.tag_count, true],
    ], top.repositories)),
    api("/top", { by: "activity", n: 10 }).then((top) => fillTable(document.getElementById("top-activity"), [
      ["Repository", (r) => repositoryLink(r.name)],
      ["Events", (r) => r.events, true],
      ["Pushes", (r) => r.pushes, true],
      ["Bytes pushed", (r) => formatBytes(r.bytes_pushed), true],
    ], top.repositories)),
    loadRepositories(false),
    api("/events", { n: 25 }).then((page) => {
      const table = document.getElementById("events");
      fillTable(table, EVENT_COLUMNS, page.events);
      noteFirstPage(table, page, page.events, "events", "/events", { newestFirst: true });
    }),
  ];
  await Promise.all(tasks);
}

// ---- one repository ---------------------------------------------------------

function platformsText(platforms) {
  return platforms.map((p) => [p.os, p.architecture, p.variant].filter(Boolean).join("/")).join(", ");
}

// Tags drawn on a repository's timeline: the most recently set ones.
const TIMELINE_TAGS = 20;

// A timeline row from the first page of a tag's history. drawnCount is less
// than total when the history has more pages than the one drawn.
function timelineRow(tag, history) {
  return {
    label: tag,
    drawnCount: history.history.length,
    total: history.total,
    segments: history.history.map((entry) => ({
      start: Date.parse(entry.from_time),
      end: entry.to_time ? Date.parse(entry.to_time) : Date.now(),
      digest: entry.digest,
      text: `${tag} → ${shortDigest(entry.digest)} from ${formatTime(entry.from_time)}` +
        (entry.to_time ? ` to ${formatTime(entry.to_time)}` : " until now"),
    })),
  };
}

async function historyRows(repository, tags) {
  const histories = await Promise.all(tags.map((tag) =>
    api(`/repositories/${repositoryPath(repository)}/-/tags/${encodeURIComponent(tag)}/history`, { n: 200 })));
  return tags.map((tag, index) => timelineRow(tag, histories[index]));
}

// Adds a note above the timeline for each tag drawn with only its latest
// changes.
function noteCutTimelineRows(rows) {
  const timeline = document.getElementById("timeline");
  for (const row of rows.filter((r) => r.drawnCount < r.total).reverse()) {
    timeline.prepend(el("p", { className: "more" },
      `Showing the latest ${row.drawnCount} of ${row.total} changes of ${row.label}.`));
  }
}

async function repositoryTimeline(repository, base, tagCount) {
  const recent = await api(`${base}/-/tags`, { n: TIMELINE_TAGS, sort: "recent" });
  const tags = recent.tags.map((t) => t.tag);
  const rows = await historyRows(repository, tags);
  drawTimeline(rows);
  noteCutTimelineRows(rows);
  if (tagCount > tags.length) {
    document.getElementById("timeline").prepend(el("p", { className: "more" },
      `Showing the ${tags.length} most recently set of ${tagCount} tags.`));
  }
}

function drawTimeline(rows) {
  const times = rows.flatMap((row) => row.segments.flatMap((s) => [s.start, s.end]));
  const start = times.length ? Math.min(...times) : Date.now();
  const end = times.length ? Math.max(...times, Date.now()) : Date.now();
  window.cairnCharts.timelineChart(document.getElementById("timeline"), rows, start, end, formatTime);
}

async function repositoryPage() {
  const name = new URLSearchParams(window.location.search).get("name") || "";
  document.getElementById("title").textContent = name;
  document.title = `${name} · cairn`;
  const base = `/repositories/${repositoryPath(name)}`;
  let summary;
  try {
    summary = await api(base);
  } catch (error) {
    showError(document.getElementById("summary"), error);
    return;
  }
  document.getElementById("summary").replaceChildren(
    card("Tags", summary.tag_count, "tag-count"),
    card("Manifests", summary.manifest_count, "manifest-count"),
    card("Stored", formatBytes(summary.stored_bytes), "stored-bytes"),
    card("Pushed", formatBytes(summary.pushed_bytes), "pushed-bytes"),
    card("First push", formatTime(summary.created_at)),
    card("Last change", formatTime(summary.updated_at)),
  );

  const tags = await api(`${base}/-/tags`, { n: 200 });
  fillTable(document.getElementById("tags"), [
    ["Tag", (t) => tagLink(name, t.tag)],
    ["Digest", (t) => mono(shortDigest(t.digest))],
    ["Media type", (t) => t.media_type],
    ["Size", (t) => formatBytes(t.content_size), true],
    ["Platforms", (t) => platformsText(t.platforms)],
    ["Pushed", (t) => formatTime(t.pushed_at)],
    ["By", (t) => actorText(t.pushed_by)],
  ], tags.tags);
  noteFirstPage(document.getElementById("tags"), tags, tags.tags, "tags", `${base}/-/tags`);

  const tasks = [
    repositoryTimeline(name, base, summary.tag_count),
    loadActivity("day", name),
    api(`${base}/-/manifests`, { n: 100 }).then((page) => {
      const table = document.getElementById("manifests");
      fillTable(table, [
        ["Digest", (m) => mono(shortDigest(m.digest))],
        ["Media type", (m) => m.media_type],
        ["Artifact type", (m) => m.artifact_type || ""],
        ["Size", (m) => formatBytes(m.content_size), true],
        ["Tags", (m) => m.tags.join(", ")],
        ["Pushed", (m) => formatTime(m.pushed_at)],
      ], page.manifests);
      noteFirstPage(table, page, page.manifests, "manifests", `${base}/-/manifests`);
    }),
    api(`${base}/-/referrers`, { n: 100 }).then((page) => {
      const table = document.getElementById("referrers");
      fillTable(table, [
        ["Subject", (r) => mono(shortDigest(r.subject))],
        ["Referrer", (r) => mono(shortDigest(r.digest))],
        ["Artifact type", (r) => r.artifact_type || ""],
        ["Annotations", (r) => Object.entries(r.annotations || {}).map(([k, v]) => `${k}=${v}`).join("; ")],
      ], page.referrers);
      noteFirstPage(table, page, page.referrers, "referrers", `${base}/-/referrers`);
    }),
    api("/events", { repository: name, n: 25 }).then((page) => {
      const table = document.getElementById("events");
      fillTable(table, EVENT_COLUMNS, page.events);
      noteFirstPage(table, page, page.events, "events",
        `/events?repository=${encodeURIComponent(name)}`, { newestFirst: true });
    }),
  ];
  await Promise.all(tasks);
}

// ---- one tag ----------------------------------------------------------------

async function tagPage() {
  const query = new URLSearchParams(window.location.search);
  const name = query.get("name") || "";
  const tag = query.get("tag") || "";
  const link = document.getElementById("repository-link");
  link.textContent = name;
  link.href = `repository.html?name=${encodeURIComponent(name)}`;
  document.getElementById("title").textContent = `${name}:${tag}`;
  document.title = `${name}:${tag} · cairn`;
  const base = `/repositories/${repositoryPath(name)}/-/tags/${encodeURIComponent(tag)}`;

  let history;
  try {
    history = await api(`${base}/history`, { n: 1000 });
  } catch (error) {
    showError(document.getElementById("current"), error);
    return;
  }
  const latest = history.history[0];
  document.getElementById("current").replaceChildren(
    card("Points to", latest && latest.to_position === null ? shortDigest(latest.digest) : "(not set)", "current-digest"),
    card("Changes", history.total, "change-count"),
    card("Last change", latest ? formatTime(latest.to_time || latest.from_time) : ""),
  );
  const table = document.getElementById("history");
  fillTable(table, [
    ["Digest", (h) => mono(shortDigest(h.digest))],
    ["From", (h) => formatTime(h.from_time)],
    ["To", (h) => (h.to_time ? formatTime(h.to_time) : "now")],
    ["Positions", (h) => `${h.from_position}–${h.to_position === null ? "" : h.to_position}`],
    ["Set by", (h) => actorText(h.actor)],
    ["Ended by", (h) => (h.ended_by ? `${h.ended_by.type} (${actorText(h.ended_by.actor)})` : "")],
  ], history.history);
  noteFirstPage(table, history, history.history, "changes", `${base}/history`,
    { newestFirst: true, total: history.total });
  // The timeline draws the same page as the table.
  const rows = [timelineRow(tag, history)];
  drawTimeline(rows);
  noteCutTimelineRows(rows);

  const form = document.getElementById("at-form");
  const input = document.getElementById("at");
  // The input has whole seconds; the next second includes every change so far.
  input.value = new Date(Date.now() + 1000).toISOString().slice(0, 19);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const result = document.getElementById("at-result");
    // A datetime-local value leaves out the seconds when they are zero,
    // and RFC 3339, which the API takes, requires them.
    const local = input.value.length === 16 ? `${input.value}:00` : input.value;
    try {
      const found = await api(base, { at: `${local}Z` });
      result.textContent = `At ${formatTime(local + "Z")} (position ${found.point.position}) ` +
        `${tag} pointed to ${found.tag.digest}`;
    } catch (error) {
      result.textContent = `Not set then: ${error.message}`;
    }
  });
}

const PAGES = { overview, repository: repositoryPage, tag: tagPage };

document.addEventListener("DOMContentLoaded", () => {
  const page = PAGES[document.body.dataset.page];
  page().then(() => {
    document.body.dataset.loaded = "true";
  }).catch((error) => {
    document.body.dataset.loaded = "error";
    showError(document.querySelector("main"), error);
  });
});
