// The owner's images, newest first, a page at a time. Each card paints the record's
// placeholder (its average colour, then its decoded ThumbHash) at once and the thumbnail
// (the signed /best at the card's width) once it scrolls into view.

import { api, signedRecord } from "./api.js";
import { dimensions, h } from "./dom.js";
import { thumbHashToDataURL } from "./vendor/thumbhash.js";

const PAGE = 24;

// base64 ThumbHash -> data: URL of a tiny blurred image (null when it cannot be decoded).
export function placeholderURL(placeholder) {
  if (!placeholder || !placeholder.thumbhash) return null;
  try {
    const raw = atob(placeholder.thumbhash);
    return thumbHashToDataURL(Uint8Array.from(raw, (c) => c.charCodeAt(0)));
  } catch (_) {
    return null;
  }
}

// The placeholder layers of a thumbnail box: its colour as the box's background, the
// ThumbHash as an image above it (both hidden by the real image once it has loaded).
export function paintPlaceholder(box, record) {
  const placeholder = record.placeholder;
  box.style.backgroundColor = placeholder && placeholder.color ? placeholder.color : "";
  const url = placeholderURL(placeholder);
  return url ? h("img", { class: "thumbhash", src: url, alt: "", "aria-hidden": "true" }) : null;
}

function shownDifferently(a, b) {
  const face = (r) =>
    JSON.stringify([r.status, r.alt, r.filename, r.width, r.height, r.placeholder, r.vset]);
  return face(a) !== face(b);
}

export function displayName(record) {
  return record.filename || record.id;
}

export class Gallery {
  // onOwner(owner): the records tell whose images these are (the header shows it).
  constructor({ onOwner }) {
    this.onOwner = onOwner;
    this.records = new Map();
    this.order = [];
    this.cursor = null;
    this.loaded = false;
    this.loading = false;
    this.cards = new Map();
    this.observer = new IntersectionObserver((entries) => this.visible(entries), {
      rootMargin: "200px",
    });
    this.grid = h("ul", { class: "grid", "aria-label": "Images" });
    this.status = h("p", { class: "gallery-status", role: "status" });
    this.error = h("p", { class: "error", role: "alert", hidden: true });
    this.more = h(
      "button",
      { type: "button", class: "secondary", hidden: true, onclick: () => this.loadMore() },
      "Load more",
    );
    this.element = h(
      "section",
      { class: "gallery", "aria-labelledby": "gallery-title" },
      h(
        "div",
        { class: "section-head" },
        h("h2", { id: "gallery-title" }, "Images"),
        h(
          "button",
          { type: "button", class: "quiet small", onclick: () => this.reload() },
          "Refresh",
        ),
      ),
      this.error,
      this.grid,
      this.status,
      h("div", { class: "more" }, this.more),
    );
  }

  // The first page as signing in read it (no second request).
  seed(page) {
    this.reset();
    this.take(page);
  }

  reset() {
    this.records.clear();
    this.order = [];
    this.cards.clear();
    this.cursor = null;
    this.loaded = false;
    this.observer.disconnect();
    this.grid.replaceChildren();
  }

  async reload() {
    this.reset();
    await this.loadMore();
  }

  async ensureLoaded() {
    if (!this.loaded && !this.loading) await this.loadMore();
  }

  async loadMore() {
    if (this.loading) return;
    this.loading = true;
    this.more.disabled = true;
    this.status.textContent = "Loading…";
    this.error.hidden = true;
    try {
      this.take(await api.list(PAGE, this.cursor));
    } catch (error) {
      this.error.textContent = `The images could not be listed: ${error.message}`;
      this.error.hidden = false;
      this.status.textContent = "";
    } finally {
      this.loading = false;
      this.more.disabled = false;
    }
  }

  take(page) {
    for (const record of page.images) {
      if (this.records.has(record.id)) continue;
      this.records.set(record.id, record);
      this.order.push(record.id);
      this.grid.append(this.card(record));
    }
    if (page.images.length) this.onOwner(page.images[0].owner);
    this.cursor = page.next_cursor;
    this.loaded = true;
    this.more.hidden = !this.cursor;
    this.renderStatus();
  }

  renderStatus() {
    const n = this.order.length;
    this.status.textContent = n
      ? `${n} ${n === 1 ? "image" : "images"}${this.cursor ? " shown" : ""}`
      : "No images yet: upload some above.";
  }

  // A record from an upload or the image page: a new one goes first (newest first).
  upsert(record) {
    const known = this.records.has(record.id);
    const old = this.records.get(record.id);
    this.records.set(record.id, record);
    if (old && !shownDifferently(old, record)) return;
    const previous = this.cards.get(record.id);
    const card = this.card(record);
    if (previous) {
      this.observer.unobserve(previous);
      previous.replaceWith(card);
    } else if (!known) {
      this.order.unshift(record.id);
      this.grid.prepend(card);
    }
    this.onOwner(record.owner);
    this.renderStatus();
  }

  remove(id) {
    const card = this.cards.get(id);
    if (card) {
      this.observer.unobserve(card);
      card.remove();
    }
    this.cards.delete(id);
    this.records.delete(id);
    this.order = this.order.filter((other) => other !== id);
    this.renderStatus();
  }

  card(record) {
    const name = displayName(record);
    const box = h("div", { class: "thumb" });
    box.append(
      ...[paintPlaceholder(box, record)].filter(Boolean),
      h("span", { class: `badge badge-${record.status}` }, record.status),
    );
    const card = h(
      "li",
      { class: "card", dataset: { id: record.id, status: record.status } },
      h(
        "a",
        { href: `#/images/${encodeURIComponent(record.id)}`, class: "card-link" },
        box,
        h(
          "span",
          { class: "card-caption" },
          h("span", { class: "card-name" }, name),
          h(
            "span",
            { class: "card-meta" },
            `${record.format.toUpperCase()} · ${dimensions(record.width, record.height)}`,
          ),
        ),
      ),
    );
    this.cards.set(record.id, card);
    this.observer.observe(card);
    return card;
  }

  visible(entries) {
    for (const entry of entries) {
      if (!entry.isIntersecting) continue;
      this.observer.unobserve(entry.target);
      this.thumbnail(entry.target);
    }
  }

  async thumbnail(card) {
    const id = card.dataset.id;
    const record = this.records.get(id);
    if (!record || !record.variants.some((v) => v.status === "ready")) return;
    const box = card.querySelector(".thumb");
    let signed;
    try {
      signed = await signedRecord(id);
    } catch (_) {
      return; // the placeholder stays; the image page says why
    }
    const width = Math.ceil((box.clientWidth || 240) * (window.devicePixelRatio || 1));
    const img = h("img", {
      class: "thumb-image",
      src: `${signed.best_signed_url}&width=${width}`,
      alt: record.alt || "",
      decoding: "async",
    });
    img.addEventListener("load", () => box.classList.add("loaded"));
    box.prepend(img);
  }
}
