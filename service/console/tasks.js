// Tasks page: post a dataset archive, watch the tasks live, read a finished task's validation table.

import { api, apiJson } from "./api.js";
import { acceptDrops, el, formatDate, percent, showError } from "./ui.js";

const FINISHED = new Set(["done", "failed", "cancelled"]);
const POLL_MS = 1000;
const PAGE_SIZE = 20;

let selectedId = null;
let pollTimer = null;
let knownStates = new Map();

function progressCell(task) {
  if (FINISHED.has(task.state)) return el("td", { "data-label": "Progress", text: task.state === "done" ? "100 %" : "–" });
  const parts = [task.phase ?? "waiting for a worker"];
  if (task.epoch !== null) parts.push(`epoch ${task.epoch}`);
  if (task.loss !== null) parts.push(`loss ${task.loss.toFixed(3)}`);
  const bar = el("progress", { max: "1", value: String(task.fraction), "aria-label": `Task ${task.id} progress` });
  return el("td", { "data-label": "Progress" }, el("div", {}, el("span", { class: "phase", text: parts.join(" · ") }), bar));
}

function actionsCell(task, page) {
  const cell = el("td", { class: "actions-cell" });
  const details = el("button", {
    type: "button", class: "ghost small", text: "Details", "data-testid": `details-${task.id}`,
    "aria-expanded": String(selectedId === task.id), "aria-controls": "task-detail",
  });
  details.addEventListener("click", () => {
    selectedId = selectedId === task.id ? null : task.id;
    refresh(page);
  });
  cell.append(details);
  if (!FINISHED.has(task.state)) {
    const cancel = el("button", {
      type: "button", class: "danger small", text: task.cancel_requested ? "Cancelling…" : "Cancel",
      "data-testid": `cancel-${task.id}`, disabled: task.cancel_requested,
    });
    cancel.addEventListener("click", async () => {
      cancel.disabled = true;
      try {
        await api(`/tasks/${encodeURIComponent(task.id)}`, { method: "DELETE" });
        showError(page.querySelector('[data-testid="task-error"]'), null);
      } catch (failure) {
        showError(page.querySelector('[data-testid="task-error"]'), failure);
      }
      refresh(page);
    });
    cell.append(cancel);
  }
  return cell;
}

function taskRow(task, page) {
  return el(
    "tr",
    { "data-task-id": task.id, "data-state": task.state, class: selectedId === task.id ? "selected" : null },
    el("td", { "data-label": "Task" }, el("div", {}, el("code", { text: task.id.slice(0, 8), title: task.id }),
       el("span", { class: "muted", text: formatDate(task.created_at) }))),
    el("td", { "data-label": "State" }, el("span", { class: `state state-${task.state}`, text: task.state })),
    el("td", { "data-label": "Method", text: task.method }),
    el("td", { "data-label": "Classes added", text: task.classes.join(", ") || "–" }),
    progressCell(task),
    el("td", { "data-label": "Version", text: task.model_version ?? "–" }),
    actionsCell(task, page),
  );
}

function metricsTables(task) {
  const { metrics } = task;
  const summary = el(
    "table", { class: "metrics", "data-testid": "task-metrics" },
    el("caption", { text: "Validation mIoU" }),
    el("thead", {}, el("tr", {}, el("th", { scope: "col", text: "Classes" }), el("th", { scope: "col", text: "mIoU" }))),
    el("tbody", {}, ...[["old", metrics.miou_old], ["new", metrics.miou_new], ["all", metrics.miou_all]].map(
      ([group, value]) => el("tr", { "data-group": group }, el("th", { scope: "row", text: group }),
                             el("td", { text: percent(value) })),
    )),
  );
  const added = new Set(task.classes);
  const perClass = el(
    "table", { class: "metrics", "data-testid": "task-class-iou" },
    el("caption", { text: "IoU per class" }),
    el("thead", {}, el("tr", {}, el("th", { scope: "col", text: "Class" }), el("th", { scope: "col", text: "Group" }),
                       el("th", { scope: "col", text: "IoU" }))),
    el("tbody", {}, ...Object.entries(metrics.per_class_iou ?? {}).map(([name, value]) =>
      el("tr", { "data-class": name }, el("th", { scope: "row", text: name }),
         el("td", { text: added.has(name) ? "new" : "old" }), el("td", { text: percent(value) })))),
  );
  return el("div", { class: "metrics-pair" }, summary, perClass);
}

/** A weak step's pseudo-label statistics (its only figures when the validation split has no masks). */
function pseudoLabelFacts(stats) {
  return el("p", {
    "data-testid": "task-pseudo-labels",
    text: `Pseudo-labels: ${stats.images} images, labelled classes found ${percent(stats.labelled_classes_found)}, ` +
          `images kept ${percent(stats.complete_fraction)}.`,
  });
}

function renderDetail(section, task) {
  if (!task) {
    section.hidden = true;
    section.replaceChildren();
    return;
  }
  const parts = [el("h2", { text: `Task ${task.id.slice(0, 8)} · ${task.state}` })];
  const facts = [`method ${task.method}`, task.supervision === "weak" ? "image labels" : "masks",
                 `from ${task.base_version ?? "scratch"}`];
  if (task.model_version) facts.push(`made ${task.model_version}`);
  facts.push(`epochs ${task.options.epochs ?? "–"}`, `attempts ${task.attempts}`);
  parts.push(el("p", { class: "muted", text: facts.join(" · ") }));
  if (task.error) parts.push(el("p", { class: "task-error", "data-testid": "task-failure", text: task.error }));
  if (task.metrics?.pseudo_labels) parts.push(pseudoLabelFacts(task.metrics.pseudo_labels));
  if (task.metrics?.per_class_iou) parts.push(metricsTables(task));
  else if (!task.error) parts.push(el("p", { text: FINISHED.has(task.state) ? "No validation figures." : "The validation table appears when the task is done." }));
  section.replaceChildren(...parts);
  section.hidden = false;
}

/** Reloads the task list (and keeps polling while a task is unfinished and the page is shown). */
export async function refresh(page) {
  clearTimeout(pollTimer);
  pollTimer = null;
  const error = page.querySelector('[data-testid="task-error"]');
  let tasks;
  try {
    tasks = await apiJson(`/tasks?limit=${PAGE_SIZE}`);
  } catch (failure) {
    showError(error, failure);
    return;
  }
  const body = page.querySelector('[data-testid="tasks-table"] tbody');
  body.replaceChildren(...tasks.items.map((task) => taskRow(task, page)));
  page.querySelector("#tasks-empty").hidden = tasks.items.length > 0;
  renderDetail(page.querySelector("#task-detail"), tasks.items.find((task) => task.id === selectedId));
  const finishedNow = tasks.items.some((task) => task.state === "done" && knownStates.get(task.id) !== "done");
  if (finishedNow && knownStates.size) document.dispatchEvent(new CustomEvent("incseg:changed"));
  knownStates = new Map(tasks.items.map((task) => [task.id, task.state]));
  if (!page.hidden && tasks.items.some((task) => !FINISHED.has(task.state))) {
    clearTimeout(pollTimer);  // another refresh may have finished meanwhile: keep one poll loop
    pollTimer = setTimeout(() => refresh(page), POLL_MS);
  }
}

async function submit(form, page) {
  const error = page.querySelector('[data-testid="task-error"]');
  const notice = page.querySelector("#task-notice");
  const button = form.querySelector("#task-submit");
  const data = new FormData();
  const file = form.querySelector('[data-testid="task-input"]').files[0];
  data.append("dataset", file, file.name);
  for (const name of ["method", "epochs"]) {
    const value = form.elements[name].value.trim();
    if (value) data.append(name, value);
  }
  showError(error, null);
  notice.textContent = "";
  button.disabled = true;
  button.textContent = "Uploading…";
  try {
    const created = await apiJson("/tasks", { method: "POST", body: data });
    selectedId = created.task_id;
    const labels = created.supervision === "weak" ? " from image labels" : "";
    notice.textContent = `Task ${created.task_id.slice(0, 8)} queued: it adds ${created.classes.join(", ")}${labels}.`;
    form.querySelector('[data-testid="task-input"]').value = "";
    form.querySelector(".drop .chosen")?.remove();
  } catch (failure) {
    showError(error, failure);
  } finally {
    button.disabled = false;
    button.textContent = "Start task";
  }
  refresh(page);
}

export function setUpTasks(page) {
  const form = page.querySelector("#task-form");
  const input = form.querySelector('[data-testid="task-input"]');
  const zone = form.querySelector('[data-drop-for="task-input"]');
  acceptDrops(zone, input);
  input.addEventListener("change", () => {
    zone.querySelector(".chosen")?.remove();
    if (input.files.length) zone.append(el("span", { class: "chosen", text: input.files[0].name }));
  });
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    submit(form, page);
  });
}
