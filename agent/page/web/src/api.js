// Talking to the node: JSON over fetch, the CSRF token on every change, one clear error message per failure.
export const session = { csrf: null, admin: false, chat: false, signedIn: false };

export class HttpError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

export async function errorOf(resp) {
  let message = `${resp.status} ${resp.statusText}`;
  try {
    const body = await resp.json();
    message = (body.error && (body.error.message || body.error)) || message;
  } catch (_) { /* not JSON */ }
  return new HttpError(resp.status, message);
}

export async function call(method, path, body, extra = {}) {
  const headers = { Accept: "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (method !== "GET" && session.csrf) headers["X-Hearth-CSRF"] = session.csrf;
  const resp = await fetch(path, {
    method, headers, credentials: "same-origin",
    body: body === undefined ? undefined : JSON.stringify(body), ...extra,
  });
  if (!resp.ok) throw await errorOf(resp);
  return extra.raw ? resp : resp.json();
}

export async function refreshSession() {
  const s = await call("GET", "page/v1/session");
  Object.assign(session, { csrf: s.csrf, admin: s.admin, chat: s.chat, signedIn: s.signed_in,
    loopback: s.loopback, node: s.node, passwordSet: s.password_set });
  return session;
}

export function bytes(n) {
  if (n === null || n === undefined) return "?";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i && n < 10 ? 1 : 0)} ${units[i]}`;
}

export function ago(ts) {
  if (!ts) return "never";
  const s = Math.max(0, Math.round(Date.now() / 1000 - ts));
  if (s < 3) return "just now";
  if (s < 120) return `${s} s ago`;
  if (s < 7200) return `${Math.round(s / 60)} min ago`;
  return `${Math.round(s / 3600)} h ago`;
}

// Build an element: el("td", {class: "why"}, "text", child...). Text is always text, never HTML.
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}
