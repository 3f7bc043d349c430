// The public HTTP API, with the project's key in the Authorization header (never in a URL).

const KEY = "safetrain.apiKey";
const listeners = new Set();

export class ApiError extends Error {
  constructor(status, body) {
    const error = (body && body.error) || {};
    super(error.message || `HTTP ${status}`);
    this.status = status;
    this.param = error.param || null;
    this.code = error.code || null;
  }
}

export function getKey() {
  return localStorage.getItem(KEY);
}

export function setKey(key) {
  localStorage.setItem(KEY, key);
}

export function forgetKey() {
  localStorage.removeItem(KEY);
  for (const listener of listeners) listener();
}

/** Called when the key is forgotten (sign-out, or a 401 from the API). */
export function onSignedOut(listener) {
  listeners.add(listener);
}

function headers(extra, key = getKey()) {
  return { Authorization: `Bearer ${key}`, ...extra };
}

async function parse(response, storedKey = true) {
  const text = await response.text();
  let body = null;
  try {
    body = text ? JSON.parse(text) : null;
  } catch {
    body = { error: { message: text.slice(0, 500) || `HTTP ${response.status}` } };
  }
  if (!response.ok) {
    if (response.status === 401 && storedKey) forgetKey();
    throw new ApiError(response.status, body);
  }
  return body;
}

/** GET or POST a JSON route: api("/v1/fine_tuning/jobs", {query: {limit: 20}}). */
export async function api(path, { method = "GET", body, query, signal, key } = {}) {
  const url = new URL(path, location.origin);
  for (const [name, value] of Object.entries(query || {})) {
    if (value !== undefined && value !== null && value !== "") url.searchParams.set(name, value);
  }
  const init = { method, signal, headers: headers(body === undefined ? {} : { "Content-Type": "application/json" }, key) };
  if (body !== undefined) init.body = JSON.stringify(body);
  return parse(await fetch(url, init), key === undefined);
}

/** Upload a dataset with progress: resolves to the FileObject, rejects with the server's error. */
export function uploadFile(file, purpose, onProgress) {
  return new Promise((resolve, reject) => {
    const request = new XMLHttpRequest();
    request.open("POST", "/v1/files");
    request.setRequestHeader("Authorization", `Bearer ${getKey()}`);
    request.upload.addEventListener("progress", (event) => {
      if (event.lengthComputable) onProgress(event.loaded / event.total);
    });
    request.addEventListener("load", () => {
      let body = null;
      try {
        body = JSON.parse(request.responseText);
      } catch {
        body = { error: { message: `HTTP ${request.status}` } };
      }
      if (request.status >= 200 && request.status < 300) resolve(body);
      else {
        if (request.status === 401) forgetKey();
        reject(new ApiError(request.status, body));
      }
    });
    request.addEventListener("error", () => reject(new ApiError(0, { error: { message: "The upload failed: network error." } })));
    const form = new FormData();
    form.append("purpose", purpose);
    form.append("file", file, file.name);
    request.send(form);
  });
}

/** Fetch a file's bytes with the key and hand them to the browser as a download. */
export async function downloadFile(fileId, filename) {
  const response = await fetch(`/v1/files/${encodeURIComponent(fileId)}/content`, { headers: headers() });
  if (!response.ok) await parse(response);
  const blob = await response.blob();
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = filename;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 10_000);
}

/**
 * A job's events as Server-Sent Events over fetch (EventSource cannot send an Authorization header): every
 * event from the first, then live ones until the job ends. Reconnects with Last-Event-ID after a network error.
 * Calls onEvents(batch) with the events of each chunk read, and onDone() once the server says the job ended.
 */
export function streamEvents(jobId, { onEvents, onDone, onError, signal }) {
  let lastId = "";
  const run = async () => {
    for (let attempt = 0; !signal.aborted; attempt += 1) {
      try {
        const response = await fetch(`/v1/fine_tuning/jobs/${encodeURIComponent(jobId)}/events?stream=true`, {
          headers: headers(lastId ? { Accept: "text/event-stream", "Last-Event-ID": lastId } : { Accept: "text/event-stream" }),
          signal,
        });
        if (!response.ok) {
          await parse(response);
          return;
        }
        attempt = 0;
        if (await readStream(response.body, signal, (id) => { lastId = id; }, onEvents)) {
          onDone?.();
          return;
        }
      } catch (error) {
        if (signal.aborted) return;
        if (error instanceof ApiError) {
          onError?.(error);
          return;
        }
      }
      await new Promise((done) => setTimeout(done, Math.min(10_000, 1000 * 2 ** attempt)));
    }
  };
  run();
}

async function readStream(body, signal, setLastId, onEvents) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return false;
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
    const blocks = buffer.split("\n\n");
    buffer = blocks.pop();
    const batch = [];
    for (const block of blocks) {
      let event = "message";
      let id = null;
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
        else if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("id:")) id = line.slice(3).trim();
      }
      if (event === "done") {
        if (batch.length) onEvents(batch);
        return true;
      }
      if (id) setLastId(id);
      if (event === "message" && data.length) {
        try {
          batch.push(JSON.parse(data.join("\n")));
        } catch {
          // a malformed event is skipped; the next ones still count
        }
      }
    }
    if (batch.length) onEvents(batch);
    if (signal.aborted) return false;
  }
}

/** Every page of a list route, following `after` cursors (at most `max` items). */
export async function listAll(path, { query = {}, signal, max = 100_000 } = {}) {
  const items = [];
  let after;
  for (;;) {
    const page = await api(path, { query: { ...query, after }, signal });
    items.push(...page.data);
    if (!page.has_more || items.length >= max) return items;
    after = page.last_id;
  }
}

/** A streamed chat completion: calls onText(piece) for each content delta until `data: [DONE]`. */
export async function streamCompletion(body, onText, signal) {
  const response = await fetch("/v1/chat/completions", {
    method: "POST", signal, headers: headers({ "Content-Type": "application/json", Accept: "text/event-stream" }), body: JSON.stringify(body),
  });
  if (!response.ok) await parse(response);
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
    const blocks = buffer.split("\n\n");
    buffer = blocks.pop();
    for (const block of blocks) {
      const data = block.split("\n").filter((line) => line.startsWith("data:")).map((line) => line.slice(5).trim()).join("");
      if (!data) continue;
      if (data === "[DONE]") return;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new ApiError(500, chunk);
      const piece = chunk.choices?.[0]?.delta?.content;
      if (piece) onText(piece);
    }
  }
}
