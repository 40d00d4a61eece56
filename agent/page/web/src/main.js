// The household page: tabs, sign-in, and the refresh loop for the visible tab.
import { call, refreshSession, session } from "./api.js";
import { initChat, loadModels } from "./chat.js";
import { refreshHousehold } from "./household.js";
import { initModels, refreshCatalogue, refreshKeys } from "./models.js";

const $ = (id) => document.getElementById(id);
let tab = "chat";
let timer = null;

function needsAdmin(name) { return name !== "chat"; }

async function refresh() {
  clearTimeout(timer);
  let again = 10000;
  try {
    if (tab === "chat") await loadModels();
    if (tab === "household") { await refreshHousehold(); again = 3000; }
    if (tab === "models") { const pulling = await refreshCatalogue(); await refreshKeys(); again = pulling ? 500 : 10000; }
  } catch (e) {
    if (e.status === 401) { await gate(); return; }
    const errorId = tab === "chat" ? "chat-error" : tab === "models" ? "models-error" : null;
    if (errorId) $(errorId).textContent = e.message;
  }
  timer = setTimeout(() => { if (!document.hidden) refresh(); }, again);
}

function show(name) {
  tab = name;
  for (const b of document.querySelectorAll("#tabs button")) b.classList.toggle("on", b.dataset.tab === name);
  for (const m of document.querySelectorAll("main.tab")) m.hidden = true;
  gate();
}

// Show the tab, or the sign-in form when this browser may not see it.
async function gate() {
  await refreshSession();
  $("node-name").textContent = session.node || "";
  $("signout").hidden = !session.signedIn;
  const allowed = needsAdmin(tab) ? session.admin : session.chat;
  $("signin").hidden = allowed;
  $(tab).hidden = !allowed;
  if (!allowed) {
    $("signin-why").textContent = session.passwordSet === false
      ? "No admin password is set on this node: set one in the wizard, or open this page on the node itself."
      : "Sign in with the admin password set in the wizard.";
    $("password").focus();
    return;
  }
  refresh();
}

function init() {
  for (const b of document.querySelectorAll("#tabs button")) b.addEventListener("click", () => show(b.dataset.tab));
  $("signin-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    $("signin-error").textContent = "";
    try {
      await call("POST", "page/v1/login", { password: $("password").value });
      $("password").value = "";
      await gate();
    } catch (e) {
      $("signin-error").textContent = e.message;
    }
  });
  $("signout").addEventListener("click", async () => {
    try { await call("POST", "page/v1/logout"); } finally { gate(); }
  });
  document.addEventListener("visibilitychange", () => { if (!document.hidden) refresh(); });
  document.addEventListener("hearth-refresh", () => refresh());
  initChat();
  initModels();
  show("chat");
}

init();
