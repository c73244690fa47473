// A ready-to-paste <picture> for a record: one <source> per modern format (type= so the
// browser skips what it cannot decode), each with a srcset of every width made, `sizes`, and
// an <img> fallback in the most widely decoded format, with width/height (no layout shift),
// the record's alt text and lazy loading.

const MEDIA_TYPES = {
  avif: "image/avif",
  webp: "image/webp",
  jpeg: "image/jpeg",
  png: "image/png",
  gif: "image/gif",
};
// <source> order: the browser takes the first type it supports, so the smallest first.
const SOURCE_ORDER = ["avif", "webp"];
// The <img> fallback: the first of these the record has.
const FALLBACK_ORDER = ["jpeg", "png", "gif", "webp", "avif"];
// The <img src> width when there is a choice: the widest at most this.
const DEFAULT_WIDTH = 1024;

// For a double-quoted attribute. An `&` is escaped only where it could start a character
// reference (`&name;`, `&#…`): the links' `&owner=…&sig=…` stay as they are, readable.
export function escapeAttribute(value) {
  return String(value)
    .replace(/&(?=#|[A-Za-z0-9]+;)/g, "&amp;")
    .replace(/"/g, "&quot;")
    .replace(/</g, "&lt;")
    .replace(/>/g, "&gt;");
}

// The ready variants by format, each list by width (one per width: a box variant of the
// same width as a `w` one adds nothing to a srcset).
function byFormat(record, urlOf) {
  const groups = new Map();
  for (const variant of record.variants || []) {
    const url = urlOf(variant);
    if (variant.status !== "ready" || !variant.width || !url) continue;
    const list = groups.get(variant.format) || [];
    if (!list.some((v) => v.width === variant.width)) list.push({ ...variant, url });
    groups.set(variant.format, list);
  }
  for (const list of groups.values()) list.sort((a, b) => a.width - b.width);
  return groups;
}

// One candidate a line, aligned under the first (whitespace separates candidates).
const srcset = (list, indent) =>
  list.map((v) => `${escapeAttribute(v.url)} ${v.width}w`).join(`,\n${indent}`);

// `links`: "signed" (each variant's `signed_url`: works anywhere until it expires) or
// "pinned" (each variant's `url`: needs the API key, for a backend or proxy that adds it).
// Returns "" when no variant is ready.
export function pictureSnippet(record, links = "signed") {
  const urlOf = (v) => (links === "pinned" ? v.url : v.signed_url);
  const groups = byFormat(record, urlOf);
  const fallbackFormat = FALLBACK_ORDER.find((format) => groups.has(format));
  if (!fallbackFormat) return "";
  const fallback = groups.get(fallbackFormat);
  const widest = fallback[fallback.length - 1].width;
  const sizes = `(max-width: ${widest}px) 100vw, ${widest}px`;
  const img =
    [...fallback].reverse().find((v) => v.width <= DEFAULT_WIDTH) || fallback[0];
  const lines = ["<picture>"];
  const others = [...groups.keys()].filter((f) => f !== fallbackFormat);
  others.sort((a, b) => rank(a) - rank(b));
  for (const format of others) {
    const type = MEDIA_TYPES[format] || `image/${format}`;
    lines.push(
      `  <source type="${type}"`,
      `          srcset="${srcset(groups.get(format), " ".repeat(18))}"`,
      `          sizes="${sizes}">`,
    );
  }
  lines.push(
    `  <img src="${escapeAttribute(img.url)}"`,
    `       srcset="${srcset(fallback, " ".repeat(15))}"`,
    `       sizes="${sizes}"`,
    `       width="${img.width}" height="${img.height}"`,
    `       alt="${escapeAttribute(record.alt || "")}"`,
    `       loading="lazy" decoding="async">`,
    "</picture>",
  );
  return lines.join("\n");
}

function rank(format) {
  const at = SOURCE_ORDER.indexOf(format);
  return at === -1 ? SOURCE_ORDER.length : at;
}
