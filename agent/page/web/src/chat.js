// The chat: any model the household serves, streamed answers, stop, regenerate, a system prompt per
// conversation; conversations are kept in this browser (localStorage), never on the node.
import { call, el, errorOf, session } from "./api.js";
import { render } from "./markdown.js";

const KEY = "hearth.chats";
const $ = (id) => document.getElementById(id);
let chats = load();
let current = null;
let running = null; // {controller, chat}

function load() {
  try { return JSON.parse(localStorage.getItem(KEY)) || []; } catch (_) { return []; }
}
function save() {
  try { localStorage.setItem(KEY, JSON.stringify(chats)); } catch (_) { /* full or private mode */ }
}
function newChat() {
  const chat = { id: Date.now().toString(36) + Math.random().toString(36).slice(2, 6), title: "New chat",
    model: $("model").value, system: "", messages: [], updated: Date.now() };
  chats.unshift(chat);
  return chat;
}

function showList() {
  const list = $("chat-list");
  list.replaceChildren(...chats.map((c) => el("li", { class: c === current ? "on" : null },
    el("button", { class: "open", title: c.title, onclick: () => { open(c); $("chats").classList.remove("open"); } }, c.title),
    el("button", { class: "del", title: "Delete this chat", "aria-label": "Delete", onclick: () => remove(c) }, "×"))));
}

function remove(chat) {
  chats = chats.filter((c) => c !== chat);
  save();
  open(chats[0] || newChat());
}

function bubble(msg) {
  const node = el("div", { class: `msg ${msg.role}` });
  if (msg.role === "assistant") node.innerHTML = render(msg.content); // render() is DOMPurify's output
  else node.textContent = msg.content;
  if (msg.meta) node.append(el("div", { class: "meta" }, msg.meta));
  return node;
}

function showMessages() {
  $("messages").replaceChildren(...current.messages.map(bubble));
  const last = current.messages[current.messages.length - 1];
  $("regenerate").hidden = running !== null || !last || last.role !== "assistant";
}

function open(chat) {
  current = chat;
  $("system").value = chat.system || "";
  $("system").hidden = !chat.system;
  if (chat.model && [...$("model").options].some((o) => o.value === chat.model)) $("model").value = chat.model;
  showList();
  showMessages();
}

export async function loadModels() {
  const select = $("model");
  const before = select.value || (current && current.model);
  try {
    const { models } = await call("GET", "page/v1/models");
    select.replaceChildren(...models.map((m) => el("option", { value: m.name },
      `${m.name} — ${m.nodes.length ? "on " + m.nodes.join(", ") : "not loaded"}${m.pool.length ? " (pooled)" : ""}`)));
    if (!models.length) select.append(el("option", { value: "" }, "no model is served yet"));
    if (before && models.some((m) => m.name === before)) select.value = before;
    $("chat-error").textContent = "";
  } catch (e) {
    $("chat-error").textContent = e.message;
  }
}

async function stream(chat) {
  const model = $("model").value;
  if (!model) { $("chat-error").textContent = "No model is served yet: pull one under Models & keys."; return; }
  chat.model = model;
  const messages = chat.system ? [{ role: "system", content: chat.system }] : [];
  messages.push(...chat.messages.map(({ role, content }) => ({ role, content })));
  const answer = { role: "assistant", content: "" };
  chat.messages.push(answer);
  const controller = new AbortController();
  running = { controller, chat };
  setBusy(true);
  showMessages();
  const node = $("messages").lastElementChild;
  let scheduled = false;
  const paint = () => {
    scheduled = false;
    if (current === chat) { node.innerHTML = render(answer.content); node.scrollIntoView({ block: "end" }); }
  };
  const started = performance.now();
  let tokens = 0;
  try {
    const headers = { "Content-Type": "application/json", Accept: "text/event-stream" };
    if (session.csrf) headers["X-Hearth-CSRF"] = session.csrf;
    const resp = await fetch("page/v1/chat", { method: "POST", headers, credentials: "same-origin",
      signal: controller.signal, body: JSON.stringify({ model, messages, stream: true }) });
    if (!resp.ok) throw await errorOf(resp);
    const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") continue;
          const chunk = JSON.parse(data);
          if (chunk.error) throw new Error(chunk.error.message || "the model failed");
          const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
          if (delta && delta.content) {
            answer.content += delta.content;
            tokens++;
            if (!scheduled) { scheduled = true; requestAnimationFrame(paint); }
          }
        }
      }
    }
    const secs = (performance.now() - started) / 1000;
    answer.meta = `${model} · ${tokens} chunks in ${secs.toFixed(1)} s`;
  } catch (e) {
    if (e.name === "AbortError") answer.meta = `${model} · stopped`;
    else { $("chat-error").textContent = e.message; answer.meta = `${model} · failed`; }
  } finally {
    running = null;
    if (!answer.content && !answer.meta) chat.messages.pop();
    chat.updated = Date.now();
    save();
    setBusy(false);
    if (current === chat) showMessages();
  }
}

function setBusy(busy) {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
  $("regenerate").hidden = true;
}

export function initChat() {
  open(chats[0] || newChat());
  $("new-chat").addEventListener("click", () => { open(newChat()); save(); $("chats").classList.remove("open"); });
  $("show-chats").addEventListener("click", () => $("chats").classList.toggle("open"));
  $("toggle-system").addEventListener("click", () => { $("system").hidden = !$("system").hidden; $("system").focus(); });
  $("system").addEventListener("change", () => { current.system = $("system").value.trim(); save(); });
  $("model").addEventListener("change", () => { current.model = $("model").value; save(); });
  $("composer").addEventListener("submit", (ev) => {
    ev.preventDefault();
    if (running) return;
    const text = $("prompt").value.trim();
    if (!text) return;
    $("chat-error").textContent = "";
    current.system = $("system").value.trim();
    current.messages.push({ role: "user", content: text });
    if (current.title === "New chat") current.title = text.slice(0, 40);
    if (!chats.includes(current)) chats.unshift(current);
    $("prompt").value = "";
    showList();
    stream(current);
  });
  $("prompt").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) { ev.preventDefault(); $("composer").requestSubmit(); }
  });
  $("stop").addEventListener("click", () => running && running.controller.abort());
  $("regenerate").addEventListener("click", () => {
    if (running) return;
    const last = current.messages[current.messages.length - 1];
    if (last && last.role === "assistant") current.messages.pop();
    $("chat-error").textContent = "";
    stream(current);
  });
}
