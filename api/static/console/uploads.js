// Uploads: each file goes up resumably with tus-js-client (window.tus, the vendored UMD
// build) under an upload token minted for it with the key, then its conversion is followed
// live over Server-Sent Events on the record's signed events URL.
//
// Connections: over HTTP/1.1 a browser opens at most 6 to one origin, and an upload or an
// event stream holds one for as long as it lasts. So at most MAX_UPLOADS uploads and
// MAX_STREAMS event streams run at once (the rest wait in line), which leaves connections
// for the page's own calls and thumbnails.

import { Problem, api, signedRecord } from "./api.js";
import { announce, bytes, fill, h } from "./dom.js";

const MAX_UPLOADS = 2;
const MAX_STREAMS = 2;
// The server prefers few large PATCHes (each one ends with a tail write of up to a part);
// 64 MiB stays under the body limits proxies and CDNs commonly put in front.
const CHUNK_SIZE = 64 * 1024 * 1024;
// After a network drop tus-js-client retries after each of these (ms) in turn, starting over
// once bytes get through again; going back online retries at once (see `online` below).
const RETRY_DELAYS = [0, 1000, 2000, 4000, 8000, 15000, 30000, 30000, 60000, 60000];
// A token that expires sooner than this is replaced before the next request.
const TOKEN_MARGIN_MS = 5 * 60 * 1000;

const IMAGE_EXTENSIONS = /\.(jpe?g|png|gif|webp|avif|heic|heif|tiff?|bmp)$/i;

export function looksLikeImage(file) {
  return (file.type && file.type.startsWith("image/")) || IMAGE_EXTENSIONS.test(file.name);
}

// What a person reads about a state.
const LABELS = {
  queued: "waiting",
  starting: "starting",
  uploading: "uploading",
  paused: "paused",
  retrying: "connection lost, retrying",
  offline: "offline, resumes when the network is back",
  finishing: "storing",
  processing: "converting",
  ready: "ready",
  failed: "failed",
  cancelled: "cancelled",
};
const ACTIVE = new Set(["starting", "uploading", "retrying", "offline", "finishing"]);
const FINAL = new Set(["ready", "failed", "cancelled"]);

function problemOf(error) {
  const response = error && error.originalResponse;
  if (!response) return new Problem(0, null, error ? error.message : "the upload failed");
  let body = response.getBody();
  try {
    body = JSON.parse(body);
  } catch (_) {
    // not JSON: keep the text
  }
  return new Problem(response.getStatus(), body);
}

let counter = 0;

class Item {
  constructor(file) {
    counter += 1;
    this.key = `u${counter}`;
    this.file = file;
    this.state = "queued";
    this.sent = 0;
    this.total = file.size;
    this.speed = null;
    this.samples = [];
    this.error = null;
    this.imageId = null;
    this.record = null;
    this.variants = new Map(); // name -> {status, error}
    this.upload = null;
    this.token = null; // {token, expires} (ms)
    this.retries = 0;
    this.retryable = true;
    this.remints = 0;
    this.source = null;
    this.view = null;
  }
}

export class Uploads {
  // onRecord(record): a record of an upload became known or changed (the gallery shows it).
  constructor({ onRecord }) {
    this.onRecord = onRecord;
    this.items = [];
    this.watchQueue = [];
    this.streams = 0;
    this.list = h("ol", { class: "uploads", "aria-label": "Uploads" });
    this.summary = h("p", { class: "uploads-summary", hidden: true });
    this.clearButton = h(
      "button",
      { type: "button", class: "quiet", hidden: true, onclick: () => this.clearFinished() },
      "Clear finished",
    );
    this.element = h(
      "section",
      { class: "uploads-panel", "aria-label": "Uploads in progress" },
      h("div", { class: "uploads-bar" }, this.summary, this.clearButton),
      this.list,
    );
    window.addEventListener("offline", () => this.wentOffline());
    window.addEventListener("online", () => this.backOnline());
  }

  // Files from the picker, a drop or a paste. Returns how many were not images (skipped).
  add(files) {
    let skipped = 0;
    for (const file of files) {
      if (!looksLikeImage(file)) {
        skipped += 1;
        continue;
      }
      const item = new Item(file);
      this.items.push(item);
      this.list.append(this.render(item));
    }
    const added = files.length - skipped;
    if (added) announce(`${added} ${added === 1 ? "file" : "files"} added to the uploads`);
    this.pump();
    return skipped;
  }

  pump() {
    const running = this.items.filter((i) => ACTIVE.has(i.state)).length;
    let free = MAX_UPLOADS - running;
    for (const item of this.items) {
      if (free <= 0) break;
      if (item.state === "queued") {
        free -= 1;
        this.start(item);
      }
    }
    this.renderSummary();
  }

  // ----------------------------------------------------------------------- one upload

  async start(item) {
    this.set(item, "starting");
    try {
      await this.freshToken(item);
    } catch (error) {
      if (error.status === 0 && !navigator.onLine) this.set(item, "offline");
      else this.fail(item, error);
      return;
    }
    if (item.state !== "starting") return; // cancelled meanwhile
    const upload = new window.tus.Upload(item.file, {
      endpoint: "/v1/tus",
      chunkSize: CHUNK_SIZE,
      retryDelays: RETRY_DELAYS,
      metadata: { filename: item.file.name, filetype: item.file.type || "" },
      removeFingerprintOnSuccess: true,
      onBeforeRequest: async (req) => {
        if (!item.token || item.token.expires - Date.now() < TOKEN_MARGIN_MS) {
          await this.freshToken(item);
        }
        req.setHeader("Authorization", `Bearer ${item.token.token}`);
      },
      onAfterResponse: (req, res) => {
        const image = res.getHeader("Picstream-Image");
        if (image) item.imageId = decodeURIComponent(image.split("/").pop());
      },
      onShouldRetry: (error) => this.shouldRetry(item, error),
      onProgress: (sent, total) => this.progress(item, sent, total),
      onSuccess: () => this.uploaded(item),
      onError: (error) => this.uploadError(item, error),
    });
    item.upload = upload;
    // The same file dropped again after a reload goes on where it stopped (tus-js-client
    // keeps the upload's URL, and nothing secret, in localStorage until it succeeds).
    try {
      const previous = await upload.findPreviousUploads();
      if (previous.length) upload.resumeFromPreviousUpload(previous[0]);
    } catch (_) {
      // no storage: start afresh
    }
    this.set(item, "uploading");
    upload.start();
  }

  async freshToken(item) {
    const minted = await api.mintToken();
    item.token = { token: minted.token, expires: Date.parse(minted.expires_at) };
  }

  // tus-js-client's rule (4xx is final, but 409 and 423 are retried) without its
  // "offline means give up": a dropped network is waited out. An expired token is replaced.
  shouldRetry(item, error) {
    const problem = problemOf(error);
    const status = problem.status;
    // An expired token, or a used-up one (a creation whose answer was lost and that was
    // sent again): mint another and go on, a few times at most.
    if (status === 401 && ["token-expired", "token-used-up"].includes(problem.slug)) {
      item.remints += 1;
      item.token = null;
      return item.remints <= 3;
    }
    if (status >= 400 && status < 500 && status !== 409 && status !== 423) return false;
    item.retries += 1;
    this.set(item, navigator.onLine ? "retrying" : "offline");
    return true;
  }

  // The browser says the network is gone: stop the requests in flight now. A connection
  // whose network vanished often fails only after a long timeout, and some never fail (a
  // browser's own offline mode lets requests already sent run on). The server keeps what
  // arrived; going back online resumes from its offset.
  wentOffline() {
    for (const item of this.items) {
      if (!ACTIVE.has(item.state) || item.state === "offline") continue;
      if (item.upload) item.upload.abort(false);
      item.speed = null;
      this.set(item, "offline");
    }
  }

  // Back online: go on at once rather than at the end of the current back-off (abort also
  // cancels a pending retry; start asks the server for its offset and sends the rest).
  backOnline() {
    for (const item of this.items) {
      if (item.state !== "offline" && item.state !== "retrying") continue;
      if (!item.upload) {
        this.set(item, "queued"); // its token could not be minted while offline
        continue;
      }
      const upload = item.upload;
      item.samples = [];
      this.set(item, "uploading");
      upload.abort(false).then(() => {
        if (item.state === "uploading") upload.start();
      });
    }
    this.pump();
  }

  progress(item, sent, total) {
    const now = performance.now();
    item.samples.push([now, sent]);
    while (item.samples.length > 2 && now - item.samples[0][0] > 3000) item.samples.shift();
    const [t0, b0] = item.samples[0];
    item.speed = now - t0 > 250 ? ((sent - b0) * 1000) / (now - t0) : item.speed;
    item.sent = sent;
    item.total = total;
    if (item.state === "retrying" || item.state === "starting") {
      item.state = "uploading";
    }
    if (sent === total && item.state === "uploading") item.state = "finishing";
    this.renderItem(item);
  }

  uploaded(item) {
    item.sent = item.total;
    item.speed = null;
    this.set(item, "processing");
    announce(`${item.file.name} uploaded; converting`);
    this.pump();
    if (item.imageId) this.watch(item);
  }

  uploadError(item, error) {
    const problem = problemOf(error);
    if (problem.status === 0 && !navigator.onLine) {
      this.set(item, "offline"); // out of retries while offline: `online` starts it again
      return;
    }
    this.fail(item, problem);
  }

  fail(item, error) {
    item.error = error instanceof Error ? error.message : String(error);
    // A 4xx (not an image, too large, a refused token) will be refused again: no Retry.
    const status = error instanceof Problem ? error.status : 0;
    item.retryable = !(status >= 400 && status < 500);
    this.set(item, "failed");
    announce(`${item.file.name} failed: ${item.error}`);
    this.pump();
  }

  pause(item) {
    if (!item.upload || !ACTIVE.has(item.state)) return;
    item.upload.abort(false);
    item.speed = null;
    this.set(item, "paused");
    announce(`${item.file.name} paused`);
    this.pump();
  }

  resume(item) {
    if (item.state !== "paused" && item.state !== "failed") return;
    item.error = null;
    item.samples = [];
    if (!item.upload) {
      this.set(item, "queued");
      this.pump();
      return;
    }
    this.set(item, "uploading");
    announce(`${item.file.name} resumed`);
    item.upload.start();
  }

  async cancel(item) {
    const upload = item.upload;
    const was = item.state;
    this.set(item, "cancelled");
    announce(`${item.file.name} cancelled`);
    this.pump();
    if (upload && was !== "processing") {
      try {
        await upload.abort(true); // stop, then DELETE the upload on the server (termination)
      } catch (error) {
        item.error = `cancelled here, but the server could not be told: ${error.message}`;
        this.renderItem(item);
      }
    }
  }

  clearFinished() {
    this.items = this.items.filter((item) => {
      if (!FINAL.has(item.state)) return true;
      item.view.remove();
      return false;
    });
    this.renderSummary();
  }

  // ----------------------------------------------------------------------- live status

  watch(item) {
    this.watchQueue.push(item);
    this.pumpWatchers();
  }

  pumpWatchers() {
    while (this.streams < MAX_STREAMS && this.watchQueue.length) {
      this.streams += 1;
      this.follow(this.watchQueue.shift()).finally(() => {
        this.streams -= 1;
        this.pumpWatchers();
      });
    }
  }

  // Resolves when the conversion has ended (or the stream could not be followed).
  async follow(item) {
    let record;
    try {
      record = await signedRecord(item.imageId, { fresh: true });
    } catch (error) {
      item.error = `uploaded, but its record could not be read: ${error.message}`;
      this.renderItem(item);
      return;
    }
    this.took(item, record);
    if (record.status !== "processing") return;
    await new Promise((resolve) => {
      const source = new EventSource(record.events_signed_url);
      item.source = source;
      const done = () => {
        source.close(); // else it reconnects, and gets a 204
        item.source = null;
        resolve();
      };
      source.addEventListener("status", (message) => {
        const data = JSON.parse(message.data);
        if (data.record) this.took(item, data.record);
        if (data.status !== "processing") {
          done();
          // The final record with signed links, for the gallery's thumbnail.
          signedRecord(item.imageId, { fresh: true }).then(
            (signed) => this.onRecord(signed),
            () => {},
          );
        }
      });
      source.addEventListener("variant", (message) => {
        const data = JSON.parse(message.data);
        item.variants.set(data.name, { status: data.status, error: data.error || null });
        this.renderItem(item);
      });
      source.addEventListener("deleted", () => {
        item.error = "deleted";
        this.set(item, "cancelled");
        done();
      });
      source.onerror = () => {
        if (source.readyState === EventSource.CLOSED) {
          // Refused (expired link, too many streams): show where it stands now.
          done();
          signedRecord(item.imageId, { fresh: true }).then(
            (now) => this.took(item, now),
            () => {},
          );
        }
      };
    });
  }

  took(item, record) {
    item.record = record;
    item.variants = new Map(
      (record.variants || []).map((v) => [v.name, { status: v.status, error: v.error }]),
    );
    if (record.status === "ready" || record.status === "failed") {
      if (record.status === "failed") item.error = record.error || "the conversion failed";
      if (item.state !== record.status) {
        this.set(item, record.status);
        announce(`${item.file.name}: ${record.status}`);
      }
    } else {
      this.renderItem(item);
    }
    this.onRecord(record);
  }

  // ----------------------------------------------------------------------- the view

  set(item, state) {
    item.state = state;
    this.renderItem(item);
    this.renderSummary();
  }

  render(item) {
    const name = item.file.name;
    const fillBar = h("div", { class: "progress-fill" });
    const bar = h(
      "div",
      {
        class: "progress",
        role: "progressbar",
        "aria-label": `Upload of ${name}`,
        "aria-valuemin": "0",
        "aria-valuemax": "100",
        "aria-valuenow": "0",
      },
      fillBar,
    );
    const view = h("li", { class: "upload", dataset: { key: item.key } });
    const parts = {
      state: h("span", { class: "state" }),
      bar,
      fillBar,
      meta: h("p", { class: "upload-meta" }),
      variants: h("ul", { class: "chips", "aria-label": `Variants of ${name}` }),
      error: h("p", { class: "error", role: "alert" }),
      toggle: h("button", { type: "button", class: "small" }),
      cancel: h(
        "button",
        { type: "button", class: "small quiet", "aria-label": `Cancel ${name}` },
        "Cancel",
      ),
      open: h("a", { class: "small-link", hidden: true }, "Open"),
    };
    parts.toggle.addEventListener("click", () =>
      item.state === "paused" || item.state === "failed" ? this.resume(item) : this.pause(item),
    );
    parts.cancel.addEventListener("click", () => this.cancel(item));
    fill(
      view,
      h(
        "div",
        { class: "upload-head" },
        h("span", { class: "upload-name", title: name }, name),
        parts.state,
      ),
      bar,
      parts.meta,
      parts.variants,
      parts.error,
      h("div", { class: "upload-actions" }, parts.toggle, parts.cancel, parts.open),
    );
    item.view = view;
    item.parts = parts;
    this.renderItem(item);
    return view;
  }

  renderItem(item) {
    const p = item.parts;
    if (!p) return;
    const name = item.file.name;
    const percent = item.total ? Math.floor((item.sent / item.total) * 100) : 0;
    item.view.dataset.state = item.state;
    p.state.textContent = LABELS[item.state];
    p.fillBar.style.width = `${percent}%`;
    const speed = item.speed && item.state === "uploading" ? ` · ${bytes(item.speed)}/s` : "";
    const text = `${bytes(item.sent)} of ${bytes(item.total)}${speed}`;
    p.bar.setAttribute("aria-valuenow", String(percent));
    p.bar.setAttribute("aria-valuetext", `${percent}%: ${text}`);
    p.meta.textContent = `${percent}% · ${text}`;
    fill(
      p.variants,
      [...item.variants].map(([variant, v]) =>
        h(
          "li",
          { class: "chip", dataset: { status: v.status }, title: v.error || v.status },
          `${variant} `,
          h("span", { class: "chip-status" }, v.status),
        ),
      ),
    );
    p.error.textContent = item.error || "";
    p.error.hidden = !item.error;
    const canToggle = ACTIVE.has(item.state) || item.state === "paused";
    const canRetry = item.state === "failed" && item.retryable && !item.record;
    p.toggle.hidden = !(canToggle || canRetry);
    const toggleText = item.state === "paused" ? "Resume" : canRetry ? "Retry" : "Pause";
    p.toggle.textContent = toggleText;
    p.toggle.setAttribute("aria-label", `${toggleText} ${name}`);
    p.cancel.hidden = !(ACTIVE.has(item.state) || item.state === "paused" || item.state === "queued");
    if (item.imageId && item.state !== "cancelled") {
      p.open.hidden = false;
      p.open.href = `#/images/${encodeURIComponent(item.imageId)}`;
      p.open.setAttribute("aria-label", `Open ${name}`);
    }
  }

  renderSummary() {
    const count = (states) => this.items.filter((i) => states.includes(i.state)).length;
    const busy = count(["queued", "starting", "uploading", "retrying", "offline", "finishing"]);
    const converting = count(["processing"]);
    const done = count(["ready", "failed", "cancelled"]);
    const parts = [];
    if (busy) parts.push(`${busy} uploading`);
    if (converting) parts.push(`${converting} converting`);
    if (done) parts.push(`${done} done`);
    this.summary.textContent = parts.join(" · ");
    this.summary.hidden = this.items.length === 0;
    this.clearButton.hidden = done === 0;
  }
}
