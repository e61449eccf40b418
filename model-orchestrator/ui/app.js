// The orchestrator's dashboard. It polls GET /status, reads GET /v1/models for types and aliases,
// follows GET /logs/{model}?follow=true and posts /admin/models/{model}/{action}, all with the key
// typed in (sessionStorage only). Every text shown is set with textContent: model names, errors and
// log lines come from outside and must never become markup.
"use strict";

const POLL_MS = 1500;
const LOG_LINES = 200;           // history asked for when a log is opened
const LOG_KEEP_CHARS = 200000;   // the log view keeps this much text; older lines are dropped
const KEY_STORE = "aio-admin-key";
const GPU_STATES = new Set(["starting", "ready", "stopping", "parking", "restoring"]);  // may hold GPU memory

const $ = (id) => document.getElementById(id);
const ui = {
  rows: new Map(),        // model name -> its <tr>
  info: new Map(),        // model name -> {type, aliases} from /v1/models
  pollTimer: null,
  needKey: false,
  log: null,              // {model, controller} of the followed log
  errors: new Map(),      // source ("key", "status", "action", "log") -> message shown
};

// --- requests --------------------------------------------------------------------------------

function authHeaders() {
  const key = sessionStorage.getItem(KEY_STORE);
  return key ? { Authorization: `Bearer ${key}` } : {};
}

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function errorOf(response) {
  // Errors are OpenAI envelopes: {"error": {"message": ...}}; anything else is shown as text.
  let message = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) message = `${response.status}: ${body.error.message}`;
  } catch (_) { /* not JSON: keep the status line */ }
  return new ApiError(response.status, message);
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: { ...authHeaders(), ...(options.headers || {}) } });
  if (response.ok) return response;
  const error = await errorOf(response);
  if (response.status === 401) askForKey(error.message);
  throw error;
}

function modelPath(name) {
  return name.split("/").map(encodeURIComponent).join("/");  // names may hold "/" (org/model)
}

// --- key and messages ----------------------------------------------------------------------

function askForKey(message) {
  ui.needKey = true;
  $("key-form").classList.add("needed");
  showError("key", `An admin key is needed (${message}). Type it above.`);
  if (document.activeElement !== $("key-input")) $("key-input").focus();
}

function useKey(event) {
  event.preventDefault();
  const key = $("key-input").value.trim();
  if (key) sessionStorage.setItem(KEY_STORE, key); else sessionStorage.removeItem(KEY_STORE);
  $("key-input").value = "";
  ui.needKey = false;
  ui.info.clear();
  $("key-form").classList.remove("needed");
  showError("key", "");
  schedule(0);
}

function forgetKey() {
  sessionStorage.removeItem(KEY_STORE);
  stopLog();
  for (const row of ui.rows.values()) row.remove();  // what the key showed goes with it
  ui.rows.clear();
  ui.info.clear();
  schedule(0);
}

// Errors by source, so that a successful poll clears only its own ("status"), not an action's.
function showError(source, text) {
  if (text) ui.errors.set(source, text); else ui.errors.delete(source);
  $("error-text").textContent = [...ui.errors.values()].join("\n");
  $("error").hidden = ui.errors.size === 0;
}

function notice(text) {
  $("notice").textContent = text;
}

// --- polling -------------------------------------------------------------------------------

function schedule(delay) {
  clearTimeout(ui.pollTimer);
  ui.pollTimer = setTimeout(poll, delay);
}

async function poll() {
  try {
    const status = await (await api("/status")).json();
    if (ui.info.size === 0 || Object.keys(status.models).some((name) => !ui.info.has(name))) await loadModelInfo();
    render(status);
    showError("status", "");
    $("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
  } catch (error) {
    if (!(error instanceof ApiError && error.status === 401)) showError("status", `Cannot read /status: ${error.message}`);
    $("updated").textContent = "not updating";
  }
  if (!ui.needKey) schedule(POLL_MS);  // after a 401, wait for a key rather than asking again and again
}

async function loadModelInfo() {
  const listing = await (await api("/v1/models")).json();
  ui.info.clear();
  for (const model of listing.data) ui.info.set(model.id, { type: model.type, aliases: model.aliases || [] });
}

// --- rendering -----------------------------------------------------------------------------

function gb(value) {
  return value === null || value === undefined ? "—" : `${Number(value).toFixed(value < 10 ? 2 : 1)} GB`;
}

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "—";
  const s = Math.round(seconds);
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${s % 60}s`;
  return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`;
}

function setText(element, text) {
  if (element.textContent !== text) element.textContent = text;  // untouched nodes keep focus and selection
}

function setBar(bar, parts, label) {
  // parts: {selector: gigabytes}; widths are shares of the budget (none without a budget).
  for (const [selector, [value, budget]] of Object.entries(parts)) {
    const share = budget > 0 && value > 0 ? Math.min(100, (100 * value) / budget) : 0;
    bar.querySelector(selector).style.width = `${share}%`;
  }
  bar.setAttribute("aria-label", label);
}

function render(status) {
  const names = Object.keys(status.models);
  for (const name of names) updateRow(rowOf(name), name, status.models[name], status.gpu_budget_gb);
  for (const [name, row] of ui.rows) {
    if (!names.includes(name)) { row.remove(); ui.rows.delete(name); }
  }
  $("empty").hidden = names.length > 0;
  renderBudget(status);
  renderConfig(status);
}

function renderDevices(status) {
  // One line per GPU the orchestrator places on: what the models placed there declare, what NVML
  // says is in use, of its budget, and which models hold it. Without GPUs (CPU, no NVML) the one
  // "GPU" line below stands for the whole budget.
  const gpus = status.gpus || [];
  const box = $("gpu-devices");
  $("gpu-line").hidden = gpus.length > 0;
  while (box.children.length > gpus.length) box.lastElementChild.remove();
  gpus.forEach((gpu, i) => {
    const line = box.children[i] || box.appendChild($("gpu-template").content.firstElementChild.cloneNode(true));
    line.dataset.gpu = String(gpu.index);
    const placed = Object.values(status.models).filter((m) => GPU_STATES.has(m.state) && (m.devices || []).includes(gpu.index));
    const declared = placed.reduce((sum, m) => sum + (m.vram_gb || 0), 0);
    const budget = gpu.budget_gb ?? gpu.total_gb;
    const others = gpu.others_gb ? ` (others ${gb(gpu.others_gb)})` : "";
    const text = `declared ${gb(declared)}` + (gpu.used_gb === null ? "" : `, in use ${gb(gpu.used_gb)}${others}`)
      + ` of ${gb(budget)}` + (gpu.budget_gb === null ? " (not used)" : "")
      + ` · ${gpu.models.length ? gpu.models.join(", ") : "no models"}`;
    setText(line.querySelector('[data-field="gpu-name"]'), `GPU ${gpu.index}`);
    line.querySelector('[data-field="gpu-name"]').title = `${gpu.name} (${gpu.pci_bus_id}, ${gpu.uuid})`;
    setText(line.querySelector('[data-field="gpu-text"]'), text);
    setBar(line.querySelector(".bar"), { ".declared": [declared, budget], ".measured": [gpu.used_gb, budget] },
      `GPU ${gpu.index}, ${gpu.name}: ${text}`);
  });
}

function renderConfig(status) {
  const config = status.config || {};
  setText($("config-hash"), config.hash || "?");
  const at = config.loaded_at ? new Date(config.loaded_at * 1000).toLocaleTimeString() : "?";
  setText($("config-loaded"), `loaded ${at} (${config.cause || "?"})`);  // no path: screenshots leave the machine
}

function renderBudget(status) {
  renderDevices(status);
  const models = Object.values(status.models);
  const declared = models.filter((m) => GPU_STATES.has(m.state)).reduce((sum, m) => sum + (m.vram_gb || 0), 0);
  const measuredOnes = models.filter((m) => m.vram_used_gb !== null && m.vram_used_gb !== undefined);
  const measured = measuredOnes.reduce((sum, m) => sum + m.vram_used_gb, 0);
  const hostHeld = models.reduce((sum, m) => sum + ((m.park && m.park.host_gb) || 0), 0);
  const gpuBudget = status.gpu_budget_gb;
  const hostBudget = status.host_budget_gb;
  const gpuText = `declared ${gb(declared)}` + (measuredOnes.length ? `, measured ${gb(measured)}` : "")
    + ` of ${gpuBudget === null ? "no set budget" : gb(gpuBudget)}`;
  setText($("gpu-text"), gpuText);
  setBar($("gpu-bar"), { ".declared": [declared, gpuBudget], ".measured": [measured, gpuBudget] }, `GPU: ${gpuText}`);
  const hostText = `${gb(hostHeld)} held of ${hostBudget === null ? "no limit" : gb(hostBudget)}`;
  setText($("host-text"), hostText);
  setBar($("host-bar"), { ".host": [hostHeld, hostBudget] }, `Host: ${hostText}`);
}

function rowOf(name) {
  let row = ui.rows.get(name);
  if (row) return row;
  row = $("row-template").content.firstElementChild.cloneNode(true);
  row.dataset.model = name;
  row.querySelector('[data-field="name"]').textContent = name;
  for (const button of row.querySelectorAll("button[data-action]")) {
    button.setAttribute("aria-label", `${button.textContent} ${name}`);
    button.addEventListener("click", () => onAction(name, button));
  }
  ui.rows.set(name, row);
  const rows = [...ui.rows.keys()].sort();
  const next = ui.rows.get(rows[rows.indexOf(name) + 1]);
  $("models").insertBefore(row, next || null);  // kept in name order
  return row;
}

function updateRow(row, name, model, budget) {
  const field = (key) => row.querySelector(`[data-field="${key}"]`);
  const info = ui.info.get(name) || { type: "?", aliases: [] };
  setText(field("type"), info.type);
  setText(field("aliases"), info.aliases.join(", ") || "—");
  const state = field("state");
  setText(state, model.state);
  state.className = `state state-${model.state}`;
  row.dataset.state = model.state;
  const devices = model.devices || [];
  const gpuText = `${gb(model.vram_gb)} / ${gb(model.vram_used_gb)}`
    + (devices.length ? ` on GPU ${devices.join(", ")}` : "");
  setText(field("gpu"), gpuText);
  const holds = GPU_STATES.has(model.state);
  setBar(field("gpu-bar"), { ".declared": [holds ? model.vram_gb : 0, budget],
    ".measured": [model.vram_used_gb, budget] }, `GPU memory of ${name}: ${gpuText}`);
  const park = model.park || {};
  setText(field("host"), model.state === "parked" ? `${gb(park.host_gb)} (level ${park.level ?? "?"})` : "—");
  setText(field("in_flight"), String(model.in_flight));
  setText(field("waiting"), String(model.waiting));
  setText(field("idle"), ["ready", "parked"].includes(model.state) ? duration(model.idle_seconds) : "—");
  setText(field("restarts"), String(model.restarts) + (model.failures ? ` (${model.failures} failed)` : ""));
  setText(field("last_error"), model.last_error || park.last_error || "");
}

// --- actions -------------------------------------------------------------------------------

async function onAction(name, button) {
  const action = button.dataset.action;
  if (action === "logs") { followLog(name); return; }
  button.disabled = true;
  notice(`${action} ${name}…`);
  try {
    const result = await (await api(`/admin/models/${modelPath(name)}/${action}`, { method: "POST" })).json();
    notice(`${action} ${name}: now ${result.state}`);
    showError("action", "");
  } catch (error) {
    notice("");
    showError("action", `${action} ${name} failed: ${error.message}`);
  } finally {
    button.disabled = false;
    schedule(0);
  }
}

// --- log tail ------------------------------------------------------------------------------

function stopLog() {
  if (ui.log) ui.log.controller.abort();
  ui.log = null;
  for (const button of document.querySelectorAll('button[data-action="logs"]')) button.setAttribute("aria-pressed", "false");
  setText($("log-state"), "stopped");
}

function appendLog(text) {
  const out = $("log-output");
  const autoscroll = $("log-autoscroll").checked;
  let all = out.textContent + text;
  if (all.length > LOG_KEEP_CHARS) all = all.slice(all.indexOf("\n", all.length - LOG_KEEP_CHARS) + 1);
  out.textContent = all;
  if (autoscroll) out.scrollTop = out.scrollHeight;
}

async function followLog(name) {
  stopLog();  // one stream at a time: the server allows only a few followers per model
  const controller = new AbortController();
  const log = { model: name, controller };
  ui.log = log;
  $("log-output").textContent = "";
  $("log-output").dataset.logModel = name;
  setText($("log-model"), name);
  ui.rows.get(name)?.querySelector('button[data-action="logs"]').setAttribute("aria-pressed", "true");
  setText($("log-state"), "connecting…");
  showError("log", "");
  try {
    // EventSource cannot send an Authorization header, so read the text stream with fetch.
    const response = await api(`/logs/${modelPath(name)}?lines=${LOG_LINES}&follow=true`, { signal: controller.signal });
    setText($("log-state"), "following");
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      if (ui.log === log) appendLog(value);
    }
    if (ui.log === log) setText($("log-state"), "the stream ended (choose Log again to reconnect)");
  } catch (error) {
    if (controller.signal.aborted) return;
    setText($("log-state"), "");
    showError("log", `Log of ${name}: ${error.message}`);
  }
}

// --- start ---------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  $("key-form").addEventListener("submit", useKey);
  $("key-forget").addEventListener("click", forgetKey);
  $("log-clear").addEventListener("click", () => { $("log-output").textContent = ""; });
  $("log-stop").addEventListener("click", stopLog);
  $("error-dismiss").addEventListener("click", () => { for (const source of [...ui.errors.keys()]) showError(source, ""); });
  schedule(0);
});
