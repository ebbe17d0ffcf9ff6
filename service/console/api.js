// Calls to the incseg API: the X-API-Key header when the user gave a key, the service's `detail` on errors.

const KEY_STORAGE = "incseg.apiKey";

/** An answer outside 2xx, or no answer: `detail` is the service's own message. */
export class ApiError extends Error {
  constructor(status, detail, retryAfter = null) {
    super(detail);
    this.status = status;
    this.detail = detail;
    this.retryAfter = retryAfter;
  }

  /** The message to show: the service's detail, with the wait it asks for when it gives one. */
  get display() {
    const prefix = this.status ? `${this.status}: ` : "";
    const wait = this.retryAfter ? ` (the service asks to try again in ${this.retryAfter} s)` : "";
    return `${prefix}${this.detail}${wait}`;
  }
}

export function storedKey() {
  return sessionStorage.getItem(KEY_STORAGE);
}

export function storeKey(key) {
  if (key) sessionStorage.setItem(KEY_STORAGE, key);
  else sessionStorage.removeItem(KEY_STORAGE);
}

let keyPrompt = null;  // one dialog for every request that needs the key at the same time

/** Opens the key dialog with `reason`; resolves true when the user saved a key. */
export function askForKey(reason) {
  if (keyPrompt) return keyPrompt;
  const dialog = document.getElementById("key-dialog");
  const input = document.getElementById("key-input");
  document.getElementById("key-dialog-reason").textContent = reason;
  input.value = storedKey() ?? "";
  keyPrompt = new Promise((resolve) => {
    dialog.addEventListener(
      "close",
      () => {
        keyPrompt = null;
        if (dialog.returnValue === "save" && input.value.trim()) {
          storeKey(input.value.trim());
          resolve(true);
        } else {
          if (dialog.returnValue === "forget") storeKey(null);
          resolve(false);
        }
      },
      { once: true },
    );
  });
  dialog.showModal();
  input.focus();
  return keyPrompt;
}

async function errorDetail(response) {
  const text = await response.text();
  try {
    const body = JSON.parse(text);
    if (typeof body.detail === "string") return body.detail;
    if (body.detail !== undefined) return JSON.stringify(body.detail);
  } catch {
    // not JSON: a proxy's page or plain text
  }
  return text.trim().slice(0, 300) || response.statusText || "no message";
}

/**
 * fetch() against the service: adds X-API-Key when a key is stored, asks for the key once on a 401 and
 * retries with it, and throws ApiError with the service's detail for any status outside 2xx.
 */
export async function api(path, { method = "GET", body = undefined, headers = {} } = {}, askedForKey = false) {
  const key = storedKey();
  const sent = key ? { ...headers, "X-API-Key": key } : headers;
  let response;
  try {
    response = await fetch(path, { method, body, headers: sent });
  } catch (error) {
    throw new ApiError(0, `the service did not answer (${error.message}); check that it is running`);
  }
  if (response.ok) return response;
  const detail = await errorDetail(response);
  if (response.status === 401) {
    if (key) storeKey(null);  // a wrong key is not sent again
    if (!askedForKey && (await askForKey(detail))) {
      return api(path, { method, body, headers }, true);
    }
  }
  throw new ApiError(response.status, detail, response.headers.get("Retry-After"));
}

export async function apiJson(path, options = {}) {
  return (await api(path, options)).json();
}
