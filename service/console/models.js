// Models page: the registry's versions, a chart of their mIoU, and activation behind a confirmation.

import { api, apiJson } from "./api.js";
import { el, formatDate, percent, showError } from "./ui.js";

const SVG = "http://www.w3.org/2000/svg";
const SWAP_POLL_MS = 500;
const SWAP_WAIT_MS = 120000;
const SERIES = [
  { key: "miou_all", label: "all", className: "line-all" },
  { key: "miou_old", label: "old", className: "line-old" },
  { key: "miou_new", label: "new", className: "line-new" },
];

function svg(tag, attrs = {}, ...children) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
  node.append(...children);
  return node;
}

function lastStep(version) {
  return version.history.at(-1) ?? {};
}

/** A line chart of all / old / new mIoU per version (versions without validation figures are skipped). */
function renderChart(container, versions) {
  const scored = versions.filter((version) => version.metrics);
  if (!scored.length) {
    container.replaceChildren(el("p", { class: "muted", text: "No validation figures yet: they come with the versions tasks make." }));
    return;
  }
  const [width, height, left, right, top, bottom] = [640, 220, 44, 16, 12, 28];
  const x = (index) => (scored.length === 1 ? (left + width - right) / 2 : left + (index * (width - left - right)) / (scored.length - 1));
  const y = (value) => top + (1 - value) * (height - top - bottom);
  const grid = [0, 0.25, 0.5, 0.75, 1].map((tick) => svg("g", { class: "grid" },
    svg("line", { x1: left, x2: width - right, y1: y(tick), y2: y(tick) }),
    Object.assign(svg("text", { x: left - 6, y: y(tick) + 4, "text-anchor": "end" }), { textContent: `${tick * 100}` })));
  const labels = scored.map((version, index) =>
    Object.assign(svg("text", { x: x(index), y: height - 8, "text-anchor": "middle", class: "tick" }), { textContent: version.name }));
  const lines = SERIES.map(({ key, label, className }) => {
    const points = scored.map((version, index) => [index, version.metrics[key]]).filter(([, value]) => value !== null && value !== undefined);
    return svg("g", { class: className },
      svg("polyline", { points: points.map(([index, value]) => `${x(index)},${y(value)}`).join(" ") }),
      ...points.map(([index, value]) => svg("circle", { cx: x(index), cy: y(value), r: 4 },
        Object.assign(svg("title"), { textContent: `${scored[index].name} ${label}: ${percent(value)}` }))));
  });
  const summary = scored.map((version) => `${version.name}: all ${percent(version.metrics.miou_all)}, old ${percent(version.metrics.miou_old)}, new ${percent(version.metrics.miou_new)}`).join("; ");
  const chart = svg("svg", { viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": `mIoU in percent per version. ${summary}` },
    ...grid, ...labels, ...lines);
  const key = el("ul", { class: "chart-key" }, ...SERIES.map(({ label, className }) =>
    el("li", { class: className }, el("span", { class: "key-line", "aria-hidden": "true" }), `${label} classes`)));
  container.replaceChildren(chart, key);
}

function stateCell(version, listing) {
  const badges = [];
  if (version.active) badges.push(el("span", { class: "state state-done", text: "active" }));
  if (version.serving) badges.push(el("span", { class: "state state-running", text: "serving" }));
  if (listing.loading === version.name) badges.push(el("span", { class: "state state-queued", text: "loading" }));
  if (!version.parity_passed) badges.push(el("span", { class: "state state-failed", text: "parity failed" }));
  if (version.load_failure) badges.push(el("span", { class: "state state-failed", text: "load failed", title: version.load_failure }));
  return el("td", { "data-label": "State" }, el("div", {}, ...badges));
}

function versionRow(version, listing, page) {
  const step = lastStep(version);
  const metrics = version.metrics ?? {};
  const button = el("button", {
    type: "button", class: "small", text: version.active ? "Active" : "Activate",
    "data-testid": `activate-${version.name}`, disabled: version.active,
    "aria-label": version.active ? `${version.name} is active` : `Activate ${version.name}`,
  });
  button.addEventListener("click", () => confirmActivation(version, page));
  return el(
    "tr", { "data-version": version.name },
    el("td", { "data-label": "Version" }, el("strong", { text: version.name })),
    el("td", { "data-label": "Classes", class: "classes", title: version.classes.join(", "),
               text: `${version.classes.length}: ${version.classes.join(", ")}` }),
    el("td", { "data-label": "Method", text: step.method ?? "–" }),
    el("td", { "data-label": "Supervision", text: version.supervision === "weak" ? "image labels" : "masks" }),
    el("td", { "data-label": "mIoU all", class: "num", text: percent(metrics.miou_all) }),
    el("td", { "data-label": "mIoU old", class: "num", text: percent(metrics.miou_old) }),
    el("td", { "data-label": "mIoU new", class: "num", text: percent(metrics.miou_new) }),
    el("td", { "data-label": "Created", text: formatDate(version.created_at) }),
    stateCell(version, listing),
    el("td", { class: "actions-cell" }, button),
  );
}

async function waitForServing(name, page) {
  const notice = page.querySelector('[data-testid="models-notice"]');
  const deadline = Date.now() + SWAP_WAIT_MS;
  while (Date.now() < deadline) {
    const listing = await refresh(page);
    if (!listing) return;
    if (listing.serving === name) {
      notice.textContent = `${name} is serving: /segment answers with it.`;
      return;
    }
    const failure = listing.versions.find((version) => version.name === name)?.load_failure;
    if (failure) {
      showError(page.querySelector('[data-testid="models-error"]'), new Error(`${name} could not be loaded: ${failure}`));
      return;
    }
    await new Promise((resolve) => setTimeout(resolve, SWAP_POLL_MS));
  }
  notice.textContent = `${name} is active but not serving yet; the Models page shows when it is.`;
}

function confirmActivation(version, page) {
  const dialog = document.getElementById("confirm-dialog");
  document.getElementById("confirm-title").textContent = `Activate ${version.name}?`;
  document.getElementById("confirm-text").textContent =
    `/segment will answer with ${version.name} (${version.classes.length} classes: ${version.classes.join(", ")}) ` +
    "once every API process has loaded it. Tasks posted after this continue from it.";
  dialog.addEventListener("close", async () => {
    if (dialog.returnValue !== "confirm") return;
    const error = page.querySelector('[data-testid="models-error"]');
    const notice = page.querySelector('[data-testid="models-notice"]');
    showError(error, null);
    try {
      await api(`/models/${encodeURIComponent(version.name)}/activate`, { method: "POST" });
      notice.textContent = `${version.name} activated; loading it…`;
      await waitForServing(version.name, page);
      document.dispatchEvent(new CustomEvent("incseg:changed"));
    } catch (failure) {
      showError(error, failure);
    }
  }, { once: true });
  dialog.returnValue = "";
  dialog.showModal();
}

/** Reloads the version table and the chart; returns the listing (null when the call failed). */
export async function refresh(page) {
  const error = page.querySelector('[data-testid="models-error"]');
  let listing;
  try {
    listing = await apiJson("/models");
  } catch (failure) {
    showError(error, failure);
    return null;
  }
  const body = page.querySelector('[data-testid="models-table"] tbody');
  body.replaceChildren(...listing.versions.map((version) => versionRow(version, listing, page)));
  page.querySelector("#models-empty").hidden = listing.versions.length > 0;
  renderChart(page.querySelector("#chart-body"), listing.versions);
  return listing;
}
