// Models and keys: the catalogue with what fits this node and why, pull with progress, remove; API keys
// (created keys are shown once); the lines to paste into an app.
import { bytes, call, el } from "./api.js";
import { downloadRow } from "./household.js";

const $ = (id) => document.getElementById(id);
let lastKey = null;

function envLines() {
  const base = `${location.origin}/v1`;
  $("env-lines").textContent = `OPENAI_BASE_URL=${base}\nOPENAI_API_KEY=${lastKey || "<a key from the list above>"}`;
}

async function act(fn, errorId) {
  $(errorId).textContent = "";
  try { await fn(); } catch (e) { $(errorId).textContent = e.message; }
}

export async function refreshCatalogue() {
  const c = await call("GET", "page/v1/catalogue");
  $("pick").textContent = c.pick ? (c.pick.model ? `This node's profile picks ${c.pick.model}: ${c.pick.reason}` : c.pick.reason) : "";
  const pulling = new Set(c.downloads.filter((d) => d.state === "running").map((d) => d.model));
  $("model-downloads").replaceChildren(...c.downloads.map(downloadRow));
  const rows = c.models.map((m) => el("tr", { "data-model": m.name },
    el("td", {}, el("strong", {}, m.name), c.pick && c.pick.model === m.name ? el("span", { class: "yes" }, " ★ profile's pick") : null,
      el("br"), el("span", { class: "muted" }, `${m.display_name} · ${m.quantization} · ${m.licence || ""}`)),
    el("td", {}, bytes(m.size)),
    el("td", { class: "why" }, m.fits === null ? "" : el("span", { class: m.fits ? "yes" : "no" }, m.fits ? "✓ " : "✗ "), m.reason),
    el("td", {}, m.loaded ? "serving" : m.stored ? "stored" : ""),
    el("td", {}, m.stored
      ? el("button", { class: "ghost", disabled: m.loaded, onclick: () => act(async () => {
          if (!confirm(`Remove ${m.name} from this node?`)) return;
          await call("DELETE", `page/v1/models/${encodeURIComponent(m.name)}`);
          await refreshCatalogue();
        }, "models-error") }, "Remove")
      : el("button", { disabled: pulling.has(m.name), onclick: () => act(async () => {
          await call("POST", "page/v1/pull", { model: m.name });
          document.dispatchEvent(new Event("hearth-refresh")); // poll faster while it comes
        }, "models-error") }, pulling.has(m.name) ? "Pulling…" : "Pull"))));
  for (const m of c.other_stored) {
    rows.push(el("tr", { "data-model": m.name }, el("td", {}, el("strong", {}, m.name), el("br"), el("span", { class: "muted" }, m.file)),
      el("td", {}, bytes(m.size)), el("td", { class: "why" }, "not in the catalogue"), el("td", {}, m.loaded ? "serving" : "stored"),
      el("td", {}, el("button", { class: "ghost", disabled: m.loaded, onclick: () => act(async () => {
        if (!confirm(`Remove ${m.name} from this node?`)) return;
        await call("DELETE", `page/v1/models/${encodeURIComponent(m.name)}`);
        await refreshCatalogue();
      }, "models-error") }, "Remove"))));
  }
  $("catalogue").tBodies[0].replaceChildren(...rows);
  return pulling.size > 0;
}

export async function refreshKeys() {
  const { keys } = await call("GET", "page/v1/keys");
  $("keys").replaceChildren(...keys.map((k) => el("li", { "data-key": k.name },
    el("strong", {}, k.name), el("code", {}, k.shown),
    el("button", { class: "ghost", onclick: () => act(async () => {
      if (!confirm(`Revoke the key ${k.name}? Apps using it stop working.`)) return;
      await call("DELETE", `page/v1/keys/${encodeURIComponent(k.name)}`);
      await refreshKeys();
    }, "keys-error") }, "Revoke"))));
  envLines();
}

export function initModels() {
  envLines();
  $("key-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    act(async () => {
      const made = await call("POST", "page/v1/keys", { name: $("key-name").value.trim() });
      lastKey = made.key;
      envLines(); // the lines to paste name the new key the moment it is shown, not after the list reloads
      const box = $("new-key");
      box.replaceChildren(el("p", {}, el("strong", {}, "Copy this key now: it is shown only once.")),
        el("pre", { class: "code", id: "new-key-value" }, made.key));
      box.hidden = false;
      $("key-name").value = "";
      await refreshKeys();
    }, "keys-error");
  });
}
