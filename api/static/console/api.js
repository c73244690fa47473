// The API, same origin, with the key the person pasted. The key lives in sessionStorage
// only (gone with the tab; never in localStorage, a cookie or a URL) and is sent as
// `Authorization: Bearer` on reads and management calls. Uploads use upload tokens minted
// with it (uploads.js), so the long-running upload requests never carry the key.

const KEY = "picstream.apiKey";

// An RFC 9457 problem the API answered (or a network failure, status 0), as an Error whose
// message is what a person should read: the problem's `detail`, else its title.
export class Problem extends Error {
  constructor(status, body, fallback) {
    const detail = body && typeof body === "object" ? body.detail || body.title : null;
    super(detail || fallback || `the server answered ${status}`);
    this.name = "Problem";
    this.status = status;
    this.type = body && typeof body === "object" && body.type ? body.type : null;
    this.body = body;
  }

  // "urn:picstream:problem:token-expired" -> "token-expired"
  get slug() {
    return this.type ? this.type.replace(/^urn:picstream:problem:/, "") : null;
  }
}

export const session = {
  get key() {
    return sessionStorage.getItem(KEY);
  },
  signIn(key) {
    sessionStorage.setItem(KEY, key);
  },
  signOut() {
    sessionStorage.removeItem(KEY);
  },
};

// Parse a response body: JSON when it says so, else the text (or null when empty).
async function bodyOf(response) {
  const text = await response.text();
  if (!text) return null;
  const type = response.headers.get("Content-Type") || "";
  if (type.includes("json")) {
    try {
      return JSON.parse(text);
    } catch (_) {
      return text;
    }
  }
  return text;
}

// One call with the key: resolves to the parsed body (null for 202/204 without one),
// rejects with a Problem. `key` overrides the stored key (signing in checks a new one).
export async function call(method, path, { json, patch, key } = {}) {
  const headers = { Accept: "application/json" };
  const bearer = key ?? session.key;
  if (bearer) headers.Authorization = `Bearer ${bearer}`;
  let body;
  if (patch !== undefined) {
    headers["Content-Type"] = "application/merge-patch+json";
    body = JSON.stringify(patch);
  } else if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  }
  let response;
  try {
    response = await fetch(path, { method, headers, body, cache: "no-store" });
  } catch (error) {
    throw new Problem(0, null, `could not reach the server (${error.message})`);
  }
  const parsed = await bodyOf(response);
  if (!response.ok) throw new Problem(response.status, parsed, response.statusText);
  return parsed;
}

export const api = {
  // A page of the owner's images; `key` checks a key not yet kept (signing in).
  list: (limit, cursor, key) =>
    call(
      "GET",
      `/v1/images?limit=${limit}${cursor ? `&cursor=${encodeURIComponent(cursor)}` : ""}`,
      { key },
    ),
  // The record with signed links (`best_signed_url`, `events_signed_url`, `signed_url`s)
  // valid for `seconds`: what <img> and EventSource use, since they cannot send the key.
  signed: (id, seconds = 3600) =>
    call("GET", `/v1/images/${encodeURIComponent(id)}?signed=${seconds}`),
  record: (id) => call("GET", `/v1/images/${encodeURIComponent(id)}`),
  remove: (id) => call("DELETE", `/v1/images/${encodeURIComponent(id)}`),
  reconvert: (id, profile) =>
    call(
      "POST",
      `/v1/images/${encodeURIComponent(id)}/reconvert${
        profile ? `?profile=${encodeURIComponent(profile)}` : ""
      }`,
    ),
  edit: (id, patch) => call("PATCH", `/v1/images/${encodeURIComponent(id)}`, { patch }),
  // An upload token for one upload, with the deployment's default lifetime (its answer
  // says until when: uploads.js mints a fresh one before a long upload outlives it).
  mintToken: () => call("POST", "/v1/upload-tokens", { json: { uploads: 1 } }),
};

// Signed records, kept until ten minutes before their links expire: the gallery and the
// image page ask again when they show the same image again.
const signedCache = new Map();
const SIGNED_FOR = 3600;

export async function signedRecord(id, { fresh = false } = {}) {
  const cached = signedCache.get(id);
  if (!fresh && cached && cached.until > Date.now()) return cached.record;
  const record = await api.signed(id, SIGNED_FOR);
  signedCache.set(id, { record, until: Date.now() + (SIGNED_FOR - 600) * 1000 });
  return record;
}

export function forgetSigned(id) {
  signedCache.delete(id);
}
