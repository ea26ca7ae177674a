// Charts drawn as inline SVG. Every label is set with textContent, so a
// repository name or tag can never become markup.
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";
const PALETTE = ["#2f6fd0", "#d07a2f", "#3c9d5d", "#9b4dca", "#c23b55", "#2a9d9d",
  "#8a6d3b", "#5566aa"];

function svgElement(name, attributes) {
  const node = document.createElementNS(SVG_NS, name);
  for (const [key, value] of Object.entries(attributes || {})) {
    node.setAttribute(key, String(value));
  }
  return node;
}

function svgText(x, y, text, attributes) {
  const node = svgElement("text", { x, y, ...attributes });
  node.textContent = text;
  return node;
}

function withTitle(node, text) {
  const title = svgElement("title");
  title.textContent = text;
  node.appendChild(title);
  return node;
}

function niceMaximum(value) {
  if (value <= 0) return 1;
  const magnitude = 10 ** Math.floor(Math.log10(value));
  for (const step of [1, 2, 5, 10]) {
    if (value <= step * magnitude) return step * magnitude;
  }
  return 10 * magnitude;
}

// The top of a byte axis with four grid steps: a nice number of the binary
// unit (B, KiB, MiB, ...) that the value has, so that formatBytes shows every
// step as a whole number of that unit.
function niceByteMaximum(value) {
  let unit = 1;
  while (value >= 1024 * unit && unit < 1024 ** 4) unit *= 1024;
  return Math.max(4, Math.ceil(niceMaximum(value / unit) / 4) * 4) * unit;
}

// Bars for the pushes and deletes of each bucket, a line for bytes pushed.
function activityChart(container, series, formatBytes, formatLabel) {
  container.replaceChildren();
  const width = 900;
  const height = 240;
  const margin = { left: 48, right: 70, top: 16, bottom: 34 };
  const plotWidth = width - margin.left - margin.right;
  const plotHeight = height - margin.top - margin.bottom;
  const buckets = series.buckets;
  const svg = svgElement("svg", {
    viewBox: `0 0 ${width} ${height}`,
    role: "img",
    "aria-label": "activity chart",
  });
  // A multiple of the four grid steps, so every count label is a whole number.
  const countMax = Math.max(4, Math.ceil(
    niceMaximum(Math.max(0, ...buckets.map((b) => b.pushes + b.deletes))) / 4) * 4);
  const byteMax = niceByteMaximum(Math.max(0, ...buckets.map((b) => b.bytes_pushed)));
  const slot = plotWidth / Math.max(1, buckets.length);

  for (let i = 0; i <= 4; i += 1) {
    const y = margin.top + plotHeight - (plotHeight * i) / 4;
    svg.appendChild(svgElement("line", {
      x1: margin.left, x2: margin.left + plotWidth, y1: y, y2: y,
      stroke: "#d9dee7", "stroke-width": 1,
    }));
    svg.appendChild(svgText(margin.left - 6, y + 4, String((countMax * i) / 4),
      { "text-anchor": "end", class: "legend" }));
    svg.appendChild(svgText(margin.left + plotWidth + 6, y + 4,
      formatBytes((byteMax * i) / 4), { class: "legend byte-tick" }));
  }

  const points = [];
  buckets.forEach((bucket, index) => {
    const x = margin.left + index * slot;
    const pushHeight = (plotHeight * bucket.pushes) / countMax;
    const deleteHeight = (plotHeight * bucket.deletes) / countMax;
    const barWidth = Math.max(1, slot * 0.7);
    const base = margin.top + plotHeight;
    const label = `${formatLabel(bucket.start)}: ${bucket.pushes} pushes, ` +
      `${bucket.deletes} deletes, ${formatBytes(bucket.bytes_pushed)} pushed`;
    const group = withTitle(svgElement("g", { class: "bucket" }), label);
    group.appendChild(svgElement("rect", {
      x: x + slot * 0.15, y: base - pushHeight, width: barWidth, height: pushHeight,
      fill: PALETTE[0], class: "push-bar", "data-pushes": bucket.pushes,
    }));
    group.appendChild(svgElement("rect", {
      x: x + slot * 0.15, y: base - pushHeight - deleteHeight, width: barWidth,
      height: deleteHeight, fill: PALETTE[4],
    }));
    svg.appendChild(group);
    points.push(`${x + slot / 2},${base - (plotHeight * bucket.bytes_pushed) / byteMax}`);
  });
  svg.appendChild(svgElement("polyline", {
    points: points.join(" "), fill: "none", stroke: PALETTE[1], "stroke-width": 2,
  }));

  const labelEvery = Math.max(1, Math.ceil(buckets.length / 8));
  buckets.forEach((bucket, index) => {
    if (index % labelEvery !== 0) return;
    const x = margin.left + index * slot + slot / 2;
    svg.appendChild(svgText(x, height - 14, formatLabel(bucket.start),
      { "text-anchor": "middle", class: "legend" }));
  });
  svg.appendChild(legend(margin.left, height - 2, [
    ["pushes", PALETTE[0]], ["deletes", PALETTE[4]], ["bytes pushed", PALETTE[1]],
  ]));
  container.appendChild(svg);
}

function legend(x, y, entries) {
  const group = svgElement("g");
  let offset = x;
  for (const [label, color] of entries) {
    group.appendChild(svgElement("rect", { x: offset, y: y - 9, width: 10, height: 10, fill: color }));
    group.appendChild(svgText(offset + 14, y, label, { class: "legend" }));
    offset += 24 + label.length * 7;
  }
  return group;
}

// One row per tag; each segment is the stretch of time a digest was tagged.
// rows: [{label, segments: [{start, end, digest, text}]}], times in ms.
function timelineChart(container, rows, start, end, formatLabel) {
  container.replaceChildren();
  if (rows.length === 0) {
    const empty = document.createElement("p");
    empty.className = "empty";
    empty.textContent = "No tag history.";
    container.appendChild(empty);
    return;
  }
  const width = 900;
  const rowHeight = 22;
  const margin = { left: 160, right: 16, top: 8, bottom: 26 };
  const height = margin.top + margin.bottom + rows.length * rowHeight;
  const plotWidth = width - margin.left - margin.right;
  const span = Math.max(1, end - start);
  const svg = svgElement("svg", {
    viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": "tag timeline",
  });
  const colors = new Map();
  rows.forEach((row, index) => {
    const y = margin.top + index * rowHeight;
    svg.appendChild(svgText(margin.left - 8, y + 15, row.label,
      { "text-anchor": "end", class: "legend" }));
    for (const segment of row.segments) {
      if (!colors.has(segment.digest)) {
        colors.set(segment.digest, PALETTE[colors.size % PALETTE.length]);
      }
      const x1 = margin.left + (plotWidth * (Math.max(segment.start, start) - start)) / span;
      const x2 = margin.left + (plotWidth * (Math.min(segment.end, end) - start)) / span;
      const bar = svgElement("rect", {
        x: x1, y: y + 3, width: Math.max(2, x2 - x1), height: rowHeight - 6,
        rx: 3, fill: colors.get(segment.digest), class: "segment",
      });
      svg.appendChild(withTitle(bar, segment.text));
    }
  });
  for (const [fraction, anchor] of [[0, "start"], [0.5, "middle"], [1, "end"]]) {
    svg.appendChild(svgText(margin.left + plotWidth * fraction, height - 8,
      formatLabel(new Date(start + span * fraction).toISOString()),
      { "text-anchor": anchor, class: "legend" }));
  }
  container.appendChild(svg);
}

window.cairnCharts = { activityChart, timelineChart };
