// Segment page: POST /segment for the mask, then the overlay and the legend drawn here from it.

import { api, apiJson } from "./api.js";
import { PALETTE, acceptDrops, cssColour, el, showError } from "./ui.js";

const OVERLAY_ALPHA = 0.5;  // as the service's own overlay (export/processing.py)
const INDEX_OF_COLOUR = new Map(PALETTE.map(([r, g, b], index) => [(r << 16) | (g << 8) | b, index]));

const views = { overlay: null, mask: null };

function pixels(bitmap, width, height) {
  const canvas = new OffscreenCanvas(width, height);
  const context = canvas.getContext("2d", { willReadFrequently: true });
  context.drawImage(bitmap, 0, 0, width, height);
  return context.getImageData(0, 0, width, height);
}

/** Class index per pixel of the service's palette mask, and the pixel count per index. */
function labelsOf(maskData) {
  const { data } = maskData;
  const labels = new Uint8Array(data.length / 4);
  const counts = new Map();
  for (let i = 0; i < labels.length; i += 1) {
    const index = INDEX_OF_COLOUR.get((data[4 * i] << 16) | (data[4 * i + 1] << 8) | data[4 * i + 2]) ?? 0;
    labels[i] = index;
    counts.set(index, (counts.get(index) ?? 0) + 1);
  }
  return { labels, counts };
}

/** Rounds to the nearest integer, halves to even, as numpy does (so the overlay matches the service's). */
function roundHalfEven(value) {
  const floor = Math.floor(value);
  const rest = value - floor;
  if (rest !== 0.5) return Math.round(value);
  return floor % 2 === 0 ? floor : floor + 1;
}

/** The class colours blended over the image where the label is not background. */
async function overlayUrl(imageData, labels) {
  const { data, width, height } = imageData;
  for (let i = 0; i < labels.length; i += 1) {
    if (labels[i] === 0) continue;
    const colour = PALETTE[labels[i]];
    for (let channel = 0; channel < 3; channel += 1) {
      const blended = data[4 * i + channel] * (1 - OVERLAY_ALPHA) + colour[channel] * OVERLAY_ALPHA;
      data[4 * i + channel] = roundHalfEven(blended);
    }
  }
  const canvas = new OffscreenCanvas(width, height);
  canvas.getContext("2d").putImageData(imageData, 0, 0);
  return URL.createObjectURL(await canvas.convertToBlob({ type: "image/png" }));
}

function renderLegend(list, counts, classes, total) {
  const rows = [...counts.entries()].sort((a, b) => b[1] - a[1]);
  list.replaceChildren(
    ...rows.map(([index, count]) => {
      const name = classes[index] ?? `class ${index}`;
      const swatch = el("span", { class: "swatch", "aria-hidden": "true" });
      swatch.style.background = cssColour(PALETTE[index]);
      return el(
        "li",
        { "data-class": name },
        swatch,
        el("span", { class: "name", text: name }),
        el("span", { class: "share", text: `${((100 * count) / total).toFixed(1)} %` }),
      );
    }),
  );
}

function showView(result) {
  const view = document.querySelector('input[name="segment-view"]:checked').value;
  if (!views[view]) return;
  result.src = views[view].url;
  result.alt = views[view].alt;
  result.dataset.view = view;
}

async function segment(file, page) {
  const error = page.querySelector('[data-testid="segment-error"]');
  const output = page.querySelector("#segment-output");
  const result = page.querySelector("#segment-result");
  showError(error, null);
  page.setAttribute("aria-busy", "true");
  try {
    const response = await api("/segment?format=png", {
      method: "POST",
      body: file,
      headers: { "Content-Type": file.type || "application/octet-stream" },
    });
    const version = response.headers.get("X-Model-Version");
    const mask = await response.blob();
    const [maskBitmap, imageBitmap, model] = await Promise.all([
      createImageBitmap(mask, { colorSpaceConversion: "none", premultiplyAlpha: "none" }),
      createImageBitmap(file, { imageOrientation: "none" }),  // the service reads pixels as stored (no EXIF turn)
      apiJson(`/models/${encodeURIComponent(version)}`),
    ]);
    const { width, height } = maskBitmap;
    const { labels, counts } = labelsOf(pixels(maskBitmap, width, height));
    for (const view of Object.values(views)) if (view?.url.startsWith("blob:")) URL.revokeObjectURL(view.url);
    views.overlay = { url: await overlayUrl(pixels(imageBitmap, width, height), labels),
                      alt: `Class colours over ${file.name}` };
    views.mask = { url: URL.createObjectURL(mask), alt: `Class mask of ${file.name}` };
    renderLegend(page.querySelector('[data-testid="segment-legend"]'), counts, model.classes, labels.length);
    result.dataset.version = version;
    page.querySelector("#segment-caption").textContent =
      `Answered by ${version} · ${width} × ${height} px · ${file.name}`;
    showView(result);
    output.hidden = false;
    document.dispatchEvent(new CustomEvent("incseg:changed"));
  } catch (failure) {
    showError(error, failure);
  } finally {
    page.removeAttribute("aria-busy");
  }
}

export function setUpSegment(page) {
  const input = page.querySelector('[data-testid="segment-input"]');
  acceptDrops(page.querySelector('[data-drop-for="segment-input"]'), input);
  input.addEventListener("change", () => {
    if (input.files.length) segment(input.files[0], page);
  });
  const result = page.querySelector("#segment-result");
  for (const radio of page.querySelectorAll('input[name="segment-view"]')) {
    radio.addEventListener("change", () => showView(result));
  }
}
