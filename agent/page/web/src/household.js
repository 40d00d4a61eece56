// The household: every node with its hardware, loaded models, load, tokens/s and last seen; downloads in
// progress; the join code as text and as a QR code.
import QRCode from "qrcode";
import { ago, bytes, call, el } from "./api.js";

const $ = (id) => document.getElementById(id);
let shownCode = null;

function hardware(hw) {
  if (!hw) return [el("dt", {}, "hardware"), el("dd", { class: "muted" }, "not reported")];
  const gpus = hw.gpus.length ? hw.gpus.map((g) => `${g.name}${g.vram ? " (" + bytes(g.vram) + ")" : ""}`
    + (g.usable ? "" : " — not used")).join(", ") : "none: runs on the CPU";
  return [
    el("dt", {}, "CPU"), el("dd", {}, `${hw.cpu || "?"} (${hw.cores || "?"} cores${hw.cpu_variant ? ", " + hw.cpu_variant : ""})`),
    el("dt", {}, "memory"), el("dd", {}, `${bytes(hw.memory)} (${bytes(hw.memory_available)} free)`),
    el("dt", {}, "GPU"), el("dd", {}, gpus),
    hw.npus.length ? [el("dt", {}, "NPU"), el("dd", {}, hw.npus.join(", "))] : [],
  ];
}

export function downloadRow(d) {
  const pct = d.total ? Math.min(100, (100 * d.completed) / d.total) : null;
  const label = `${d.model}: ${d.status || d.state}${d.total ? ` — ${bytes(d.completed)} of ${bytes(d.total)} (${pct.toFixed(0)}%)` : ""}`;
  return el("div", { class: "download", "data-model": d.model, "data-state": d.state },
    el("div", {}, label),
    d.state === "running" || d.state === "downloading" ? el("progress", { max: 100, value: pct === null ? null : pct.toFixed(1) }) : null);
}

export async function refreshHousehold() {
  const h = await call("GET", "page/v1/household");
  $("nodes").replaceChildren(...h.nodes.map((n) => el("div", { class: `card node${n.alive ? "" : " dead"}`, "data-node": n.name },
    el("h3", {}, n.name, n.self ? " (this node)" : "", n.host ? el("small", { class: "muted" }, ` ${n.host}`) : null),
    el("dl", {},
      hardware(n.hardware),
      el("dt", {}, "models"),
      el("dd", {}, n.models.length ? n.models.map((m) => `${m.name}${m.state && m.state !== "ready" ? " (" + m.state + ")" : ""}`).join(", ") : "none loaded"),
      el("dt", {}, "load"), el("dd", {}, `${n.queued} of ${n.capacity} slots busy`),
      el("dt", {}, "tokens/s"), el("dd", {}, n.tokens_per_second ? String(n.tokens_per_second) : "idle"),
      el("dt", {}, "last seen"), el("dd", {}, n.self ? "now" : ago(n.last_seen))))));
  $("downloads").replaceChildren(...(h.downloads.length ? h.downloads.map(downloadRow)
    : [el("p", { class: "muted" }, "None in progress.")]));
  const code = h.join_code || null;
  if (code !== shownCode) {
    shownCode = code;
    $("join-code").textContent = code || "This node has no household yet: hearth household create";
    const canvas = $("join-qr");
    canvas.hidden = !code;
    if (code) await QRCode.toCanvas(canvas, code, { width: 180, margin: 1, errorCorrectionLevel: "M" });
  }
}
