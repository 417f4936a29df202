// The chat page qwen-run serves at `/`: a conversation sent to /v1/chat/completions and its
// answer read from the SSE stream as it comes. Text from the model or the server is only ever
// put into the page as text (textContent), never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const SETTINGS = ["system", "temperature", "top_p", "max_tokens", "seed", "tools", "api_key"];

const state = {
  messages: [], // the conversation as the API takes it (the system prompt is added on send)
  controller: null, // the AbortController of the answer being streamed
};

function loadSettings() {
  for (const id of SETTINGS) {
    const v = localStorage.getItem("qwen-run." + id);
    if (v !== null) $(id).value = v;
  }
}

function saveSetting(id) {
  localStorage.setItem("qwen-run." + id, $(id).value);
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api_key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function showError(text) {
  const e = $("error");
  e.textContent = text;
  e.hidden = !text;
}

// The message of an error answer (OpenAI's {"error": {"message"}}), else its text.
async function errorText(resp) {
  const text = await resp.text();
  try {
    const v = JSON.parse(text);
    if (v && v.error) return `${resp.status}: ${v.error.message || JSON.stringify(v.error)}`;
  } catch (_) {
    // not JSON: show it as it is
  }
  return `${resp.status}: ${text}`;
}

async function loadModels() {
  try {
    const resp = await fetch("/v1/models", { headers: headers() });
    if (!resp.ok) {
      showError("cannot list the models: " + (await errorText(resp)));
      return;
    }
    const models = (await resp.json()).data || [];
    const select = $("model");
    const kept = localStorage.getItem("qwen-run.model");
    select.replaceChildren();
    for (const m of models) {
      const o = document.createElement("option");
      o.value = m.id;
      o.textContent = m.id;
      select.append(o);
    }
    if (kept && models.some((m) => m.id === kept)) select.value = kept;
    $("model-picker").hidden = models.length < 2;
    $("model-name").textContent = models.length === 1 ? models[0].id : "";
    showError("");
  } catch (e) {
    showError("cannot list the models: " + e);
  }
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "message " + role;
  const who = document.createElement("div");
  who.className = "role";
  who.textContent = role;
  const body = document.createElement("div");
  body.className = "content";
  body.textContent = text;
  div.append(who, body);
  $("log").append(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

function showToolCall(bubble, call) {
  const box = document.createElement("div");
  box.className = "tool-call";
  const name = document.createElement("div");
  name.className = "tool-name";
  name.textContent = "tool call: " + call.function.name;
  const args = document.createElement("pre");
  args.className = "tool-arguments";
  let text = call.function.arguments;
  try {
    text = JSON.stringify(JSON.parse(text), null, 2);
  } catch (_) {
    // shown as sent
  }
  args.textContent = text;
  box.append(name, args);
  bubble.append(box);
}

// "12 tokens, 35.1 tok/s · prompt 40 tokens (32 cached), 250 tok/s · stop"
function statsText(usage, timings, finish) {
  const parts = [];
  if (timings) {
    parts.push(`${timings.predicted_n} tokens, ${timings.predicted_per_second.toFixed(1)} tok/s`);
    parts.push(
      `prompt ${timings.prompt_n + timings.cache_n} tokens (${timings.cache_n} cached), ` +
        `${timings.prompt_per_second.toFixed(1)} tok/s`
    );
    if (timings.draft_n) parts.push(`drafts ${timings.draft_n_accepted}/${timings.draft_n} kept`);
  } else if (usage) {
    const cached = (usage.prompt_tokens_details || {}).cached_tokens || 0;
    parts.push(`${usage.completion_tokens} tokens`);
    parts.push(`prompt ${usage.prompt_tokens} tokens (${cached} cached)`);
  }
  if (finish) parts.push(finish);
  return parts.join(" · ");
}

function setStreaming(on) {
  document.body.dataset.state = on ? "streaming" : "idle";
  $("send").disabled = on;
  $("stop").disabled = !on;
}

function numberSetting(id, integer) {
  const raw = $(id).value.trim();
  if (raw === "") return undefined;
  const n = integer ? parseInt(raw, 10) : parseFloat(raw);
  if (!Number.isFinite(n)) throw new Error(`${id} must be a number, got '${raw}'`);
  return n;
}

function requestBody() {
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...state.messages);
  const body = { messages, stream: true, stream_options: { include_usage: true } };
  if ($("model").value) body.model = $("model").value;
  const sampling = {
    temperature: numberSetting("temperature", false),
    top_p: numberSetting("top_p", false),
    max_tokens: numberSetting("max_tokens", true),
    seed: numberSetting("seed", true),
  };
  for (const [k, v] of Object.entries(sampling)) if (v !== undefined) body[k] = v;
  const tools = $("tools").value.trim();
  if (tools) {
    try {
      body.tools = JSON.parse(tools);
    } catch (e) {
      throw new Error("the tools are not valid JSON: " + e.message);
    }
  }
  return body;
}

// Calls `onEvent` with each `data:` payload of an SSE body as it arrives.
async function readEvents(resp, onEvent) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffered = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffered += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffered.indexOf("\n\n")) >= 0) {
      const event = buffered.slice(0, end);
      buffered = buffered.slice(end + 2);
      for (const line of event.split("\n")) {
        if (line.startsWith("data:")) onEvent(line.slice(5).trim());
      }
    }
  }
}

async function send(text) {
  showError("");
  let body;
  state.messages.push({ role: "user", content: text });
  addMessage("user", text);
  try {
    body = requestBody();
  } catch (e) {
    state.messages.pop();
    $("log").lastChild.remove();
    showError(e.message);
    return false;
  }
  const bubble = addMessage("assistant", "");
  const content = bubble.querySelector(".content");
  const stats = document.createElement("div");
  stats.className = "stats";
  bubble.append(stats);
  const answer = { role: "assistant", content: "" };
  const calls = [];
  let usage = null;
  let timings = null;
  let finish = null;
  state.controller = new AbortController();
  setStreaming(true);
  try {
    const resp = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: headers(),
      body: JSON.stringify(body),
      signal: state.controller.signal,
    });
    if (!resp.ok) throw new Error(await errorText(resp));
    await readEvents(resp, (data) => {
      if (data === "[DONE]") return;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message || JSON.stringify(chunk.error));
      if (chunk.usage) usage = chunk.usage;
      if (chunk.timings) timings = chunk.timings;
      const choice = (chunk.choices || [])[0];
      if (!choice) return;
      const delta = choice.delta || {};
      if (delta.content) {
        answer.content += delta.content;
        content.textContent = answer.content;
        bubble.scrollIntoView({ block: "end" });
      }
      for (const call of delta.tool_calls || []) {
        calls.push(call);
        showToolCall(bubble, call);
      }
      if (choice.finish_reason) finish = choice.finish_reason;
    });
    stats.textContent = statsText(usage, timings, finish);
  } catch (e) {
    if (e.name === "AbortError") {
      stats.textContent = "stopped";
      bubble.classList.add("stopped");
    } else {
      state.controller.abort(); // stop the generation if the stream is still open
      stats.textContent = "failed";
      showError(String(e.message || e));
    }
  } finally {
    state.controller = null;
    setStreaming(false);
  }
  if (calls.length) {
    answer.tool_calls = calls.map(({ id, type, function: f }) => ({ id, type, function: f }));
    if (!answer.content.trim()) answer.content = null;
  }
  state.messages.push(answer);
  return true;
}

function init() {
  loadSettings();
  setStreaming(false);
  for (const id of SETTINGS) $(id).addEventListener("change", () => saveSetting(id));
  $("api_key").addEventListener("change", loadModels);
  $("model").addEventListener("change", () => localStorage.setItem("qwen-run.model", $("model").value));
  $("settings-toggle").addEventListener("click", () => {
    const open = $("settings").hidden;
    $("settings").hidden = !open;
    $("settings-toggle").setAttribute("aria-expanded", String(open));
  });
  $("new-chat").addEventListener("click", () => {
    if (state.controller) state.controller.abort();
    state.messages = [];
    $("log").replaceChildren();
    showError("");
  });
  $("composer").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const text = $("input").value.trim();
    if (!text || state.controller) return;
    $("input").value = "";
    await send(text);
  });
  $("input").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey) {
      ev.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => {
    if (state.controller) state.controller.abort();
  });
  loadModels();
}

init();
