// Small DOM helpers: elements without innerHTML (nothing from a record or a file name is
// ever parsed as markup), the screen-reader live region, and how numbers are shown.

// h("button", {class: "primary", onclick: fn}, "Save") -> <button class="primary">Save</button>
// Attributes: `class`, `for`, `on*` (listeners), `dataset`, booleans (true sets, false
// omits), anything else with setAttribute. Children: nodes, strings, arrays, null/false.
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on") && typeof value === "function") {
      el.addEventListener(name.slice(2), value);
    } else if (name === "dataset") {
      Object.assign(el.dataset, value);
    } else if (name === "value" && "value" in el) {
      el.value = value;
    } else {
      el.setAttribute(name, value === true ? "" : String(value));
    }
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    if (Array.isArray(child)) append(el, child);
    else el.append(child instanceof Node ? child : String(child));
  }
}

// Replace an element's children.
export function fill(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

// Status changes for screen readers: one polite live region for the whole page.
export function announce(text) {
  const region = document.getElementById("announcer");
  if (!region) return;
  region.textContent = "";
  // A new text node in a separate task is what screen readers reliably read out.
  setTimeout(() => {
    region.textContent = text;
  }, 50);
}

const UNITS = ["B", "KB", "MB", "GB", "TB"];

// 3419127 -> "3.4 MB" (decimal units, as file managers show sizes).
export function bytes(n) {
  if (n === null || n === undefined) return "—";
  let value = n;
  let unit = 0;
  while (value >= 1000 && unit < UNITS.length - 1) {
    value /= 1000;
    unit += 1;
  }
  const digits = unit === 0 || value >= 100 ? 0 : 1;
  return `${value.toFixed(digits)} ${UNITS[unit]}`;
}

export function exactBytes(n) {
  return n === null || n === undefined ? "—" : `${n.toLocaleString("en")} bytes`;
}

export function dimensions(width, height) {
  return width && height ? `${width} × ${height}` : "not known yet";
}

export function when(iso) {
  if (!iso) return "—";
  const date = new Date(iso);
  return Number.isNaN(date.getTime()) ? iso : date.toLocaleString();
}

// What an EXIF orientation tag means, for people.
const ORIENTATIONS = {
  1: "1 (upright)",
  2: "2 (mirrored)",
  3: "3 (rotated 180°)",
  4: "4 (mirrored, rotated 180°)",
  5: "5 (mirrored, rotated 90° counter-clockwise)",
  6: "6 (rotated 90° clockwise)",
  7: "7 (mirrored, rotated 90° clockwise)",
  8: "8 (rotated 90° counter-clockwise)",
};

export function orientation(tag) {
  return ORIENTATIONS[tag] || String(tag);
}

// A modal question (a <dialog>: focus stays inside, Escape cancels). Resolves true only
// when the person pressed the confirming button.
export function confirmDialog({ title, text, confirm, cancel = "Cancel", danger = false }) {
  return new Promise((resolve) => {
    const yes = h("button", { type: "button", class: danger ? "danger" : "primary" }, confirm);
    const no = h("button", { type: "button", class: "secondary" }, cancel);
    const dialog = h(
      "dialog",
      { class: "confirm", "aria-labelledby": "confirm-title", "aria-describedby": "confirm-text" },
      h("h2", { id: "confirm-title" }, title),
      h("p", { id: "confirm-text" }, text),
      h("div", { class: "dialog-actions" }, no, yes),
    );
    const close = (answer) => {
      dialog.close();
      dialog.remove();
      resolve(answer);
    };
    yes.addEventListener("click", () => close(true));
    no.addEventListener("click", () => close(false));
    dialog.addEventListener("cancel", (event) => {
      event.preventDefault();
      close(false);
    });
    document.body.append(dialog);
    dialog.showModal();
    no.focus(); // the safe answer is the default
  });
}
