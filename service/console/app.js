// The console's shell: pages by URL hash (#segment, #tasks, #models), the serving badge, the API key button.

import { apiJson, askForKey, storedKey } from "./api.js";
import { refresh as refreshModels } from "./models.js";
import { setUpSegment } from "./segment.js";
import { refresh as refreshTasks, setUpTasks } from "./tasks.js";

const PAGES = ["segment", "tasks", "models"];
const TITLES = { segment: "Segment", tasks: "Tasks", models: "Models" };

function pageElement(name) {
  return document.querySelector(`[data-page="${name}"]`);
}

function currentPage() {
  const name = location.hash.slice(1);
  return PAGES.includes(name) ? name : "segment";
}

async function refreshBadge() {
  const badge = document.getElementById("serving-badge");
  try {
    const listing = await apiJson("/models");
    if (listing.serving) badge.textContent = `serving ${listing.serving}`;
    else if (listing.loading) badge.textContent = `loading ${listing.loading}`;
    else badge.textContent = listing.versions.length ? "no model loaded" : "no model yet";
    badge.dataset.serving = listing.serving ?? "";
  } catch (failure) {
    badge.textContent = failure.status === 401 ? "API key needed" : "service unreachable";
    badge.dataset.serving = "";
  }
}

function show(name, moveFocus) {
  for (const page of PAGES) pageElement(page).hidden = page !== name;
  for (const link of document.querySelectorAll("[data-page-link]")) {
    if (link.dataset.pageLink === name) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  document.title = `${TITLES[name]} · incseg console`;
  if (moveFocus) {
    const heading = pageElement(name).querySelector("h1");
    heading.tabIndex = -1;
    heading.focus();
  }
  if (name === "tasks") refreshTasks(pageElement("tasks"));
  if (name === "models") refreshModels(pageElement("models"));
}

function start() {
  setUpSegment(pageElement("segment"));
  setUpTasks(pageElement("tasks"));
  document.getElementById("api-key-button").addEventListener("click", async () => {
    const reason = storedKey()
      ? "A key is set for this tab. Save another one, or forget it."
      : "When the service runs with INCSEG_API_KEY, it asks for this key on its requests.";
    await askForKey(reason);
    refreshBadge();
  });
  document.addEventListener("incseg:changed", () => {
    refreshBadge();
    if (currentPage() === "models") refreshModels(pageElement("models"));
  });
  window.addEventListener("hashchange", () => show(currentPage(), true));
  show(currentPage(), false);
  refreshBadge();
}

start();
