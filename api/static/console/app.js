// The picstream console: sign in with an API key, upload (drop, pick, paste), watch the
// conversions live, browse the gallery, open an image (#/images/{id}).

import { api, session } from "./api.js";
import { announce, confirmDialog, fill, h } from "./dom.js";
import { Gallery } from "./gallery.js";
import { ImagePage } from "./image.js";
import { Uploads } from "./uploads.js";

const main = document.getElementById("main");
const who = document.getElementById("who");
const signOutButton = document.getElementById("sign-out");

const profiles = new Set(); // profile names seen on records (no endpoint lists them)
const gallery = new Gallery({
  onOwner: (owner) => {
    who.textContent = `Signed in as ${owner}`;
  },
});
const uploads = new Uploads({
  onRecord: (record) => {
    profiles.add(record.profile);
    gallery.upsert(record);
  },
});
let page = null; // the ImagePage shown, if any

// ------------------------------------------------------------------------- signing in

function signInView() {
  const input = h("input", {
    id: "api-key",
    type: "password",
    autocomplete: "off",
    spellcheck: "false",
    required: true,
    "aria-describedby": "key-help",
  });
  const error = h("p", { class: "error", role: "alert", hidden: true });
  const button = h("button", { type: "submit", class: "primary" }, "Sign in");
  const form = h(
    "form",
    { class: "signin-form", novalidate: true },
    h("label", { for: "api-key" }, "API key"),
    input,
    button,
    error,
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const key = input.value.trim();
    error.hidden = true;
    if (!key) {
      error.textContent = "Paste an API key first.";
      error.hidden = false;
      return input.focus();
    }
    button.disabled = true;
    try {
      // Checking the key is reading the first page of the gallery.
      const first = await api.list(24, null, key);
      session.signIn(key);
      gallery.seed(first);
      announce("Signed in");
      route();
    } catch (e) {
      error.textContent = e.message;
      error.hidden = false;
      input.focus();
      input.select();
    } finally {
      button.disabled = false;
    }
  });
  return h(
    "section",
    { class: "signin", "aria-labelledby": "signin-title" },
    h("h1", { id: "signin-title", tabindex: "-1" }, "Sign in"),
    h(
      "p",
      { id: "key-help" },
      "Paste an API key (under make run: the one it prints, also in var/dev-api-key). " +
        "It stays in this tab only (sessionStorage) and is sent to this server alone; " +
        "uploads use short-lived upload tokens minted with it.",
    ),
    form,
  );
}

// ------------------------------------------------------------------------- uploading

async function entriesToFiles(entry, out) {
  if (entry.isFile) {
    out.push(await new Promise((resolve, reject) => entry.file(resolve, reject)));
  } else if (entry.isDirectory) {
    const reader = entry.createReader();
    // readEntries answers in batches (100 in Chromium) until it answers an empty one.
    for (;;) {
      const batch = await new Promise((resolve, reject) => reader.readEntries(resolve, reject));
      if (!batch.length) break;
      for (const child of batch) await entriesToFiles(child, out);
    }
  }
}

// Files of a drop, folders walked. Entries must be taken while the event is dispatched.
async function droppedFiles(dataTransfer) {
  const items = [...(dataTransfer.items || [])].filter((item) => item.kind === "file");
  const entries = items.map((item) => (item.webkitGetAsEntry ? item.webkitGetAsEntry() : null));
  const loose = items.map((item) => item.getAsFile());
  if (!entries.some(Boolean)) return [...dataTransfer.files];
  const files = [];
  for (const [i, entry] of entries.entries()) {
    if (entry) await entriesToFiles(entry, files);
    else if (loose[i]) files.push(loose[i]);
  }
  return files;
}

function pastedName(file) {
  const stamp = new Date().toISOString().replace(/[-:]/g, "").replace("T", "-").slice(0, 15);
  const ext = (file.type.split("/")[1] || "png").replace("jpeg", "jpg");
  return `pasted-${stamp}.${ext}`;
}

function uploadZone() {
  const note = h("p", { class: "note", role: "status" });
  const take = (files) => {
    const skipped = uploads.add(files);
    note.textContent = skipped
      ? `Skipped ${skipped} ${skipped === 1 ? "file that is" : "files that are"} not an image.`
      : "";
  };
  const picker = h("input", {
    type: "file",
    id: "file-input",
    multiple: true,
    accept: "image/*,.heic,.heif",
    class: "visually-hidden",
    tabindex: "-1",
    "aria-hidden": "true",
  });
  const folder = h("input", {
    type: "file",
    id: "folder-input",
    multiple: true,
    webkitdirectory: true,
    class: "visually-hidden",
    tabindex: "-1",
    "aria-hidden": "true",
  });
  for (const input of [picker, folder]) {
    input.addEventListener("change", () => {
      take([...input.files]);
      input.value = "";
    });
  }
  const zone = h(
    "section",
    { class: "dropzone", id: "dropzone", "aria-labelledby": "upload-title" },
    h("h2", { id: "upload-title" }, "Upload"),
    h(
      "p",
      {},
      "Drop images or whole folders here, paste an image (Ctrl+V), or choose them. " +
        "Uploads resume after a dropped connection.",
    ),
    h(
      "div",
      { class: "button-row" },
      h("button", { type: "button", class: "primary", onclick: () => picker.click() }, "Choose files"),
      h("button", { type: "button", class: "secondary", onclick: () => folder.click() }, "Choose a folder"),
    ),
    picker,
    folder,
    note,
  );
  zone.take = take;
  return zone;
}

const zone = uploadZone();

// Drops anywhere on the page while signed in (a drop outside the zone must not make the
// browser navigate to the file).
let dragDepth = 0;
document.addEventListener("dragenter", (event) => {
  if (!session.key || !event.dataTransfer.types.includes("Files")) return;
  dragDepth += 1;
  zone.classList.add("dragging");
});
document.addEventListener("dragleave", () => {
  dragDepth = Math.max(0, dragDepth - 1);
  if (!dragDepth) zone.classList.remove("dragging");
});
document.addEventListener("dragover", (event) => {
  if (!event.dataTransfer.types.includes("Files")) return;
  event.preventDefault();
  event.dataTransfer.dropEffect = session.key ? "copy" : "none";
});
document.addEventListener("drop", async (event) => {
  if (!event.dataTransfer.types.includes("Files")) return;
  event.preventDefault();
  dragDepth = 0;
  zone.classList.remove("dragging");
  if (!session.key) return;
  const files = await droppedFiles(event.dataTransfer);
  if (!isGallery()) location.hash = "#/";
  zone.take(files);
});
document.addEventListener("paste", (event) => {
  if (!session.key || !event.clipboardData) return;
  const files = [...event.clipboardData.files];
  if (!files.length) return; // text pasted into a field stays text
  event.preventDefault();
  const named = files.map((file) =>
    file.name && file.name !== "image.png" ? file : new File([file], pastedName(file), { type: file.type }),
  );
  if (!isGallery()) location.hash = "#/";
  zone.take(named);
});

// ------------------------------------------------------------------------- routing

const isGallery = () => !/^#\/images\//.test(location.hash);

function show(...children) {
  if (page) page.close();
  page = null;
  fill(main, ...children);
}

function focusHeading() {
  const heading = main.querySelector("h1");
  if (heading) heading.focus({ preventScroll: false });
}

async function route() {
  const signedIn = Boolean(session.key);
  signOutButton.hidden = !signedIn;
  who.hidden = !signedIn;
  if (!signedIn) {
    show(signInView());
    focusHeading();
    return;
  }
  const match = /^#\/images\/([^/?#]+)$/.exec(location.hash);
  if (match) {
    const current = new ImagePage(decodeURIComponent(match[1]), {
      gallery,
      profiles,
      onGone: (id) => {
        gallery.remove(id);
        location.hash = "#/";
      },
    });
    show(current.element);
    page = current;
    await current.load();
    document.title = `${current.record ? current.title.textContent : "Image"} · picstream`;
    focusHeading();
    return;
  }
  document.title = "picstream console";
  show(
    h("h1", { class: "visually-hidden", tabindex: "-1" }, "Your images"),
    zone,
    uploads.element,
    gallery.element,
  );
  await gallery.ensureLoaded();
  for (const record of gallery.records.values()) profiles.add(record.profile);
}

signOutButton.addEventListener("click", async () => {
  const busy = uploads.items.some((i) =>
    ["queued", "starting", "uploading", "retrying", "offline", "finishing"].includes(i.state),
  );
  if (
    busy &&
    !(await confirmDialog({
      title: "Sign out?",
      text: "Uploads still running stop here; dropping the same files again later resumes them.",
      confirm: "Sign out",
    }))
  ) {
    return;
  }
  session.signOut();
  // A fresh page: nothing of this session's state (records, signed links) stays in memory.
  location.replace(location.pathname);
});

window.addEventListener("hashchange", () => {
  if (location.hash === "" || location.hash.startsWith("#/")) route();
});
route();
