// Small DOM helpers shared by the pages.

import { ApiError } from "./api.js";

/** Creates an element: `attrs` are attributes (text, class, dataset-free), `children` nodes or strings. */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "text") node.textContent = value;
    else node.setAttribute(name, value === true ? "" : value);
  }
  node.append(...children.filter((child) => child !== null && child !== undefined));
  return node;
}

/** Shows an error (the service's detail for an ApiError) in an alert region; null clears it. */
export function showError(region, error) {
  if (error === null) {
    region.textContent = "";
    return;
  }
  region.textContent = error instanceof ApiError ? error.display : `the console failed: ${error.message}`;
  if (!(error instanceof ApiError)) console.warn(error);
}

/** A fraction in [0, 1] as a percentage with one decimal, or an en dash for none. */
export function percent(value) {
  return value === null || value === undefined || Number.isNaN(value) ? "–" : `${(100 * value).toFixed(1)} %`;
}

export function formatDate(iso) {
  if (!iso) return "–";
  return new Date(iso).toLocaleString(undefined, { dateStyle: "medium", timeStyle: "short" });
}

/** Lets a drop zone take a dropped file into its file input (and fire its change event). */
export function acceptDrops(zone, input) {
  const setActive = (active) => zone.classList.toggle("dragging", active);
  zone.addEventListener("dragover", (event) => {
    event.preventDefault();
    setActive(true);
  });
  zone.addEventListener("dragleave", () => setActive(false));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    setActive(false);
    if (!event.dataTransfer?.files.length) return;
    input.files = event.dataTransfer.files;
    input.dispatchEvent(new Event("change", { bubbles: true }));
  });
}

/** The Pascal VOC colour map the service paints masks with: index -> [r, g, b]. */
export const PALETTE = Array.from({ length: 256 }, (_, index) => {
  let value = index;
  let [r, g, b] = [0, 0, 0];
  for (let bit = 0; bit < 8; bit += 1) {
    r |= (value & 1) << (7 - bit);
    g |= ((value >> 1) & 1) << (7 - bit);
    b |= ((value >> 2) & 1) << (7 - bit);
    value >>= 3;
  }
  return [r, g, b];
});

export function cssColour([r, g, b]) {
  return `rgb(${r} ${g} ${b})`;
}
