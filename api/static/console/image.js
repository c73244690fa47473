// One image (#/images/{id}): what the original is, every variant, a <picture> snippet to
// copy, alt text and metadata (PATCH, JSON merge patch), reconversion and deletion. While the
// image converts, its status follows the signed events URL live.

import { Problem, api, forgetSigned, signedRecord } from "./api.js";
import {
  announce,
  bytes,
  confirmDialog,
  dimensions,
  exactBytes,
  fill,
  h,
  orientation,
  when,
} from "./dom.js";
import { displayName, paintPlaceholder } from "./gallery.js";
import { pictureSnippet } from "./snippet.js";

// How long the snippet's signed links work (seconds), or "pinned" (need the key).
const LINK_CHOICES = [
  ["86400", "Signed links, valid for 1 day"],
  ["604800", "Signed links, valid for 7 days (the longest)"],
  ["pinned", "Plain links (need the API key: for a backend or proxy)"],
];

const isObject = (v) => v !== null && typeof v === "object" && !Array.isArray(v);

// RFC 7396: the merge patch that turns `before` into `after` (keys gone become null).
export function mergePatch(before, after) {
  if (!isObject(before) || !isObject(after)) return after;
  const patch = {};
  for (const key of Object.keys(before)) if (!(key in after)) patch[key] = null;
  for (const [key, value] of Object.entries(after)) {
    if (key in before && JSON.stringify(before[key]) === JSON.stringify(value)) continue;
    patch[key] = key in before ? mergePatch(before[key], value) : value;
  }
  return patch;
}

function containsNull(value) {
  if (value === null) return true;
  if (Array.isArray(value)) return false; // arrays are replaced whole: nulls in them are kept
  return isObject(value) && Object.values(value).some(containsNull);
}

// "unknown profile 'x' (profiles: default, thumbs)" -> ["default", "thumbs"]
export function profilesFromDetail(detail) {
  const match = /\(profiles: ([^)]*)\)/.exec(detail || "");
  return match ? match[1].split(",").map((p) => p.trim()).filter(Boolean) : [];
}

export class ImagePage {
  // ctx: {gallery, profiles (a Set of names seen), onGone(id)}
  constructor(id, ctx) {
    this.id = id;
    this.ctx = ctx;
    this.record = null;
    this.source = null;
    this.links = LINK_CHOICES[0][0];
    this.snippetRecord = null;
    this.element = h("article", { class: "image-page", "aria-labelledby": "image-title" });
  }

  // Stop following events (the router calls it when another view replaces this one).
  close() {
    if (this.source) this.source.close();
    this.source = null;
  }

  async load() {
    fill(this.element, h("p", { class: "loading", role: "status" }, "Loading…"));
    try {
      this.record = await this.read();
    } catch (error) {
      const gone = error instanceof Problem && error.status === 404;
      fill(
        this.element,
        h("p", {}, h("a", { href: "#/" }, "← All images")),
        h("h1", { id: "image-title", tabindex: "-1" }, gone ? "No such image" : "Could not load"),
        h("p", { class: "error", role: "alert" }, error.message),
      );
      return;
    }
    this.render();
    this.follow();
  }

  // The record with signed links; without them (no PICSTREAM_SIGNING_KEY on the server)
  // the plain record: facts and editing work, previews and live status do not.
  async read() {
    try {
      return await signedRecord(this.id, { fresh: true });
    } catch (error) {
      if (!(error instanceof Problem && error.status === 400)) throw error;
      this.unsigned = error.message;
      return api.record(this.id);
    }
  }

  // ------------------------------------------------------------------- layout

  render() {
    const r = this.record;
    this.ctx.profiles.add(r.profile);
    this.title = h("h1", { id: "image-title", tabindex: "-1" }, displayName(r));
    this.badge = h("span", { class: `badge badge-${r.status}` }, r.status);
    this.preview = h("figure", { class: "preview" });
    this.facts = h("dl", { class: "facts" });
    this.variants = h("div", { class: "variants" });
    this.embed = this.embedSection();
    fill(
      this.element,
      h("p", { class: "crumbs" }, h("a", { href: "#/" }, "← All images")),
      h("div", { class: "title-row" }, this.title, this.badge),
      h("div", { class: "image-top" }, this.preview, h("section", { "aria-label": "Original" }, this.facts)),
      h("section", { "aria-labelledby": "variants-title" }, h("h2", { id: "variants-title" }, "Variants"), this.variants),
      this.embed,
      this.editSection(),
      this.reconvertSection(),
      this.deleteSection(),
    );
    this.refresh();
  }

  // Everything that changes with the record (not the forms being edited).
  refresh() {
    const r = this.record;
    this.title.textContent = displayName(r);
    this.badge.className = `badge badge-${r.status}`;
    this.badge.textContent = r.pending ? `${r.status}, reconverting` : r.status;
    this.renderPreview();
    this.renderFacts();
    this.renderVariants();
    this.renderSnippet();
  }

  renderPreview() {
    const r = this.record;
    const box = h("div", { class: "thumb large" });
    const layers = [paintPlaceholder(box, r)];
    if (r.variants.some((v) => v.status === "ready") && r.best_signed_url) {
      const width = Math.min(2048, Math.ceil(640 * (window.devicePixelRatio || 1)));
      const img = h("img", {
        class: "thumb-image",
        src: `${r.best_signed_url}&width=${width}`,
        alt: r.alt || "",
      });
      img.addEventListener("load", () => box.classList.add("loaded"));
      layers.unshift(img);
    }
    box.append(...layers.filter(Boolean));
    if (r.width && r.height) box.style.aspectRatio = `${r.width} / ${r.height}`;
    const caption =
      r.status === "processing"
        ? "Converting… the preview appears when a variant is ready."
        : r.status === "failed"
          ? `The conversion failed: ${r.error || "no reason given"}`
          : r.alt
            ? `Alt text: ${r.alt}`
            : "No alt text yet (edit it below).";
    const unsigned = this.unsigned ? `No previews: ${this.unsigned}` : null;
    fill(this.preview, box, h("figcaption", {}, unsigned || caption));
  }

  renderFacts() {
    const r = this.record;
    const row = (term, ...value) => [h("dt", {}, term), h("dd", {}, ...value)];
    fill(
      this.facts,
      row("Format", `${r.format.toUpperCase()} (${r.content_type})`),
      row("Displayed size", dimensions(r.width, r.height)),
      row("Orientation", orientation(r.orientation)),
      row("Bytes", `${bytes(r.size)} (${exactBytes(r.size)})`),
      row("BLAKE3", h("code", { class: "hash" }, r.blake3)),
      row("Filename", r.filename || "—"),
      row("Created", h("time", { datetime: r.created_at }, when(r.created_at))),
      row("Id", h("code", {}, r.id)),
      row("Profile", r.profile),
      row(
        "Original",
        r.original_signed_url
          ? h("a", { href: r.original_signed_url, download: r.filename || r.id }, "Download")
          : "—",
      ),
    );
  }

  renderVariants() {
    const r = this.record;
    if (!r.variants.length) {
      fill(this.variants, h("p", {}, "None yet: the worker plans them when it starts."));
      return;
    }
    const rows = r.variants.map((v) =>
      h(
        "tr",
        { dataset: { variant: v.name, status: v.status } },
        h(
          "td",
          { class: "variant-preview" },
          v.status === "ready" && v.signed_url
            ? h("img", { src: v.signed_url, alt: "", loading: "lazy", width: 96 })
            : null,
        ),
        h(
          "th",
          { scope: "row" },
          v.status === "ready" && v.signed_url ? h("a", { href: v.signed_url }, v.name) : v.name,
        ),
        h("td", {}, v.format ? v.format.toUpperCase() : "—"),
        h("td", {}, dimensions(v.width, v.height)),
        h("td", { class: "num" }, v.size === null || v.size === undefined ? "—" : bytes(v.size)),
        h("td", {}, h("span", { class: `badge badge-${v.status}` }, v.status), v.error ? ` ${v.error}` : ""),
      ),
    );
    fill(
      this.variants,
      h(
        "div",
        { class: "table-scroll" },
        h(
          "table",
          {},
          h(
            "thead",
            {},
            h(
              "tr",
              {},
              ["Preview", "Name", "Format", "Size", "Bytes", "Status"].map((t) =>
                h("th", { scope: "col" }, t),
              ),
            ),
          ),
          h("tbody", {}, rows),
        ),
      ),
    );
  }

  // ------------------------------------------------------------------- embed snippet

  embedSection() {
    this.snippet = h("textarea", {
      id: "snippet",
      class: "code",
      readonly: true,
      rows: "10",
      spellcheck: "false",
      "aria-describedby": "snippet-note",
    });
    this.snippetNote = h("p", { id: "snippet-note", class: "note" });
    this.copyStatus = h("span", { class: "copy-status", role: "status" });
    const select = h(
      "select",
      { id: "snippet-links" },
      LINK_CHOICES.map(([value, label]) => h("option", { value }, label)),
    );
    select.addEventListener("change", () => {
      this.links = select.value;
      this.snippetRecord = null;
      this.renderSnippet();
    });
    const copy = h("button", { type: "button", class: "primary" }, "Copy");
    copy.addEventListener("click", () => this.copy());
    return h(
      "section",
      { class: "embed", "aria-labelledby": "embed-title" },
      h("h2", { id: "embed-title" }, "Embed"),
      h(
        "div",
        { class: "field-row" },
        h("label", { for: "snippet-links" }, "Links"),
        select,
      ),
      h("label", { for: "snippet", class: "visually-hidden" }, "<picture> snippet"),
      this.snippet,
      h("div", { class: "button-row" }, copy, this.copyStatus),
      this.snippetNote,
    );
  }

  // Signed links for the chosen lifetime come from a record fetched for it (the page's own
  // record is signed for an hour).
  async renderSnippet() {
    const r = this.record;
    if (!r.variants.some((v) => v.status === "ready")) {
      this.snippet.value = "";
      this.snippetNote.textContent = "The snippet appears once variants are ready.";
      return;
    }
    let source = r;
    if (this.links !== "pinned") {
      const fresh =
        this.snippetRecord &&
        this.snippetRecord.vset === r.vset &&
        this.snippetRecord.alt === r.alt &&
        this.snippetRecord.links === this.links;
      if (!fresh) {
        try {
          const signed = await api.signed(this.id, Number(this.links));
          this.snippetRecord = { ...signed, links: this.links };
        } catch (error) {
          this.snippetNote.textContent = `Signed links could not be made: ${error.message}`;
          return;
        }
      }
      source = { ...this.snippetRecord, alt: r.alt };
    }
    this.snippet.value = pictureSnippet(source, this.links === "pinned" ? "pinned" : "signed");
    this.snippet.rows = Math.min(26, this.snippet.value.split("\n").length + 1);
    if (this.links === "pinned") {
      this.snippetNote.textContent =
        "Plain links answer only requests with the API key: use them from your backend, " +
        "or behind a proxy that adds the key.";
    } else {
      const until = new Date(Date.now() + Number(this.links) * 1000);
      this.snippetNote.textContent =
        `These links stop working on ${until.toLocaleString()}. A page that lives longer ` +
        "should get fresh ones from its backend (GET /v1/images/{id}?signed=SECONDS).";
    }
  }

  async copy() {
    const text = this.snippet.value;
    if (!text) return;
    try {
      await navigator.clipboard.writeText(text);
    } catch (_) {
      // No clipboard API (a page over plain http on another host): select it for Ctrl+C.
      this.snippet.focus();
      this.snippet.select();
      this.copyStatus.textContent = "Selected: press Ctrl+C (⌘C) to copy.";
      return;
    }
    this.copyStatus.textContent = "Copied.";
    announce("Snippet copied");
  }

  // ------------------------------------------------------------------- alt and metadata

  editSection() {
    const r = this.record;
    const alt = h("textarea", { id: "edit-alt", rows: "2", maxlength: "1000" });
    alt.value = r.alt || "";
    const metadata = h("textarea", {
      id: "edit-metadata",
      class: "code",
      rows: "5",
      spellcheck: "false",
      "aria-describedby": "metadata-help",
    });
    metadata.value = JSON.stringify(r.metadata || {}, null, 2);
    const status = h("p", { class: "form-status", role: "status" });
    const error = h("p", { class: "error", role: "alert", hidden: true });
    const save = h("button", { type: "submit", class: "primary" }, "Save");
    const form = h(
      "form",
      { class: "edit", novalidate: true },
      h("label", { for: "edit-alt" }, "Alt text"),
      h("p", { class: "note", id: "alt-help" }, "Describes the image for people who cannot see it."),
      alt,
      h("label", { for: "edit-metadata" }, "Metadata (a JSON object)"),
      h(
        "p",
        { class: "note", id: "metadata-help" },
        "Your own data about the image. Keys you remove are removed (JSON merge patch).",
      ),
      metadata,
      h("div", { class: "button-row" }, save, status),
      error,
    );
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      error.hidden = true;
      status.textContent = "";
      let after;
      try {
        after = JSON.parse(metadata.value || "{}");
      } catch (e) {
        return this.formError(error, `Metadata is not valid JSON: ${e.message}`);
      }
      if (!isObject(after)) return this.formError(error, "Metadata must be a JSON object {…}.");
      if (containsNull(after)) {
        return this.formError(error, "null cannot be stored: in a merge patch it removes a key.");
      }
      const patch = {};
      const newAlt = alt.value.trim() === "" ? null : alt.value;
      if (newAlt !== (this.record.alt ?? null)) patch.alt = newAlt;
      const metaPatch = mergePatch(this.record.metadata || {}, after);
      if (Object.keys(metaPatch).length) patch.metadata = metaPatch;
      if (!Object.keys(patch).length) {
        status.textContent = "Nothing changed.";
        return;
      }
      save.disabled = true;
      status.textContent = "Saving…";
      try {
        await api.edit(this.id, patch);
        forgetSigned(this.id);
        this.record = await this.read();
        alt.value = this.record.alt || "";
        metadata.value = JSON.stringify(this.record.metadata || {}, null, 2);
        this.ctx.gallery.upsert(this.record);
        this.refresh();
        status.textContent = "Saved.";
        announce("Alt text and metadata saved");
      } catch (e) {
        status.textContent = "";
        this.formError(error, e.message);
      } finally {
        save.disabled = false;
      }
    });
    return h(
      "section",
      { class: "panel", "aria-labelledby": "edit-title" },
      h("h2", { id: "edit-title" }, "Alt text and metadata"),
      form,
    );
  }

  formError(el, text) {
    el.textContent = text;
    el.hidden = false;
  }

  // ------------------------------------------------------------------- reconvert

  reconvertSection() {
    // No endpoint lists the profiles: offer the ones seen on records, and learn the rest
    // from the server's answer to an unknown name (it lists them).
    const datalist = h("datalist", { id: "profile-list" });
    const fillList = () =>
      fill(datalist, [...this.ctx.profiles].sort().map((p) => h("option", { value: p })));
    fillList();
    const input = h("input", {
      id: "reconvert-profile",
      type: "text",
      list: "profile-list",
      value: this.record.profile,
      autocomplete: "off",
      spellcheck: "false",
      "aria-describedby": "reconvert-help",
    });
    const status = h("p", { class: "form-status", role: "status" });
    const error = h("p", { class: "error", role: "alert", hidden: true });
    const go = h("button", { type: "submit", class: "secondary" }, "Reconvert");
    const form = h(
      "form",
      { class: "reconvert", novalidate: true },
      h("label", { for: "reconvert-profile" }, "Profile"),
      h(
        "p",
        { class: "note", id: "reconvert-help" },
        "The profiles are the server's (PICSTREAM_PROFILES). This image has “",
        this.record.profile,
        "”; a name the server does not know is refused, and its answer lists the ones it has.",
      ),
      h("div", { class: "field-row" }, input, datalist, go),
      status,
      error,
    );
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      error.hidden = true;
      go.disabled = true;
      status.textContent = "Asking…";
      try {
        await api.reconvert(this.id, input.value.trim() || null);
        status.textContent = "Queued: the variants are made again, the current ones stay until then.";
        announce("Reconversion queued");
        forgetSigned(this.id);
        this.record = await this.read();
        this.refresh();
        this.follow();
      } catch (e) {
        status.textContent = "";
        for (const p of profilesFromDetail(e.message)) this.ctx.profiles.add(p);
        fillList();
        this.formError(error, e.message);
      } finally {
        go.disabled = false;
      }
    });
    return h(
      "section",
      { class: "panel", "aria-labelledby": "reconvert-title" },
      h("h2", { id: "reconvert-title" }, "Reconvert"),
      form,
    );
  }

  // ------------------------------------------------------------------- delete

  deleteSection() {
    const error = h("p", { class: "error", role: "alert", hidden: true });
    const button = h("button", { type: "button", class: "danger" }, "Delete image…");
    button.addEventListener("click", async () => {
      const name = displayName(this.record);
      const sure = await confirmDialog({
        title: `Delete ${name}?`,
        text: "The original, every variant and the record are deleted. This cannot be undone.",
        confirm: "Delete",
        danger: true,
      });
      if (!sure) {
        button.focus();
        return;
      }
      button.disabled = true;
      try {
        await api.remove(this.id);
      } catch (e) {
        button.disabled = false;
        if (!(e instanceof Problem && e.status === 404)) return this.formError(error, e.message);
      }
      this.close();
      announce(`${name} deleted`);
      this.ctx.onGone(this.id);
    });
    return h(
      "section",
      { class: "panel danger-zone", "aria-labelledby": "delete-title" },
      h("h2", { id: "delete-title" }, "Delete"),
      h("p", { class: "note" }, "Removes the original and every variant from the store."),
      button,
      error,
    );
  }

  // ------------------------------------------------------------------- live status

  follow() {
    const r = this.record;
    if (this.source || r.status !== "processing" || !r.events_signed_url) return;
    const source = new EventSource(r.events_signed_url);
    this.source = source;
    const update = async (final) => {
      try {
        this.record = await signedRecord(this.id, { fresh: true });
      } catch (_) {
        return;
      }
      this.refresh();
      this.ctx.gallery.upsert(this.record);
      if (final) announce(`${displayName(this.record)}: ${this.record.status}`);
    };
    source.addEventListener("status", (message) => {
      const data = JSON.parse(message.data);
      const final = data.status !== "processing"; // a reconvert is `processing` too
      if (final) this.close();
      update(final);
    });
    source.addEventListener("variant", (message) => {
      const data = JSON.parse(message.data);
      const variant = this.record.variants.find((v) => v.name === data.name);
      if (variant && variant.status !== data.status) {
        if (data.status === "ready") {
          update(false); // its links and size come with the record
        } else {
          variant.status = data.status;
          variant.error = data.error || null;
          this.renderVariants();
        }
      }
    });
    source.addEventListener("deleted", () => {
      this.close();
      this.ctx.onGone(this.id);
    });
    source.onerror = () => {
      if (source.readyState === EventSource.CLOSED) this.close();
    };
  }
}
