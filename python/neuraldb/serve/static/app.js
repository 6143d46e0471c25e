// The neuraldb serve page: plain DOM and fetch, no dependencies. The bearer token lives in the token field only
// (this page's memory): it is never written to storage or a cookie, and reloading the page forgets it.
"use strict";

const $ = (id) => document.getElementById(id);

function headers() {
  const h = { "Content-Type": "application/json" };
  const token = $("token").value.trim();
  if (token) h.Authorization = "Bearer " + token;
  return h;
}

async function api(method, url, body) {
  const init = { method, headers: headers() };
  if (body !== undefined) init.body = JSON.stringify(body);
  const r = await fetch(url, init);
  let data = null;
  try {
    data = await r.json();
  } catch (e) {
    data = null;
  }
  if (!r.ok) {
    const message = data && data.error ? data.error.message : r.status + " " + r.statusText;
    throw new Error(message);
  }
  return data;
}

function say(id, text, isError) {
  const el = $(id);
  el.textContent = text;
  el.classList.toggle("error", Boolean(isError));
}

async function refreshHealth() {
  try {
    const h = await api("GET", "/health");
    say("health", "Serving " + h.facts + " fact" + (h.facts === 1 ? "" : "s") + ".");
  } catch (e) {
    say("health", "Server unreachable: " + e.message, true);
  }
}

function cell(row, text) {
  const td = document.createElement("td");
  td.textContent = text === undefined || text === null ? "" : String(text);
  row.appendChild(td);
  return td;
}

async function loadFacts() {
  const q = $("search").value.trim();
  const url = "/v1/facts?limit=1000" + (q ? "&q=" + encodeURIComponent(q) : "");
  let data;
  try {
    data = await api("GET", url);
  } catch (e) {
    say("facts-status", "Could not list the facts: " + e.message, true);
    return;
  }
  const body = $("facts").tBodies[0];
  body.replaceChildren();
  for (const f of data.data) {
    const row = document.createElement("tr");
    row.dataset.id = f.id;
    cell(row, f.id);
    cell(row, f.subject);
    cell(row, f.prompt);
    cell(row, f.target_new);
    cell(row, f.status);
    const actions = cell(row, "");
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = "Delete";
    button.className = "delete";
    button.setAttribute("aria-label", "Delete fact " + f.id + (f.subject ? " (" + f.subject + ")" : ""));
    if (f.status === "pending") {
      button.disabled = true;
      button.title = "still being edited in";
    }
    button.addEventListener("click", () => deleteFact(f.id));
    actions.appendChild(button);
    body.appendChild(row);
  }
  const shown = data.data.length;
  let text = data.total + " fact" + (data.total === 1 ? "" : "s") + (q ? " matching \u201c" + q + "\u201d" : "") + ".";
  if (shown < data.total) text += " Showing the first " + shown + ".";
  say("facts-status", text);
}

async function deleteFact(id) {
  try {
    await api("DELETE", "/v1/facts/" + id);
    say("facts-status", "Deleted fact " + id + ".");
  } catch (e) {
    say("facts-status", "Could not delete fact " + id + ": " + e.message, true);
    return;
  }
  await loadFacts();
  await refreshHealth();
  // the status line says what happened last, after the refreshed count
  say("facts-status", "Deleted fact " + id + ". " + $("facts-status").textContent);
}

async function waitForJob(job) {
  while (job.status === "queued" || job.status === "running") {
    await new Promise((resolve) => setTimeout(resolve, 300));
    job = await api("GET", "/v1/jobs/" + job.id);
  }
  return job;
}

async function addFact(event) {
  event.preventDefault();
  const fact = { subject: $("subject").value, prompt: $("fact-prompt").value, target_new: $("target-new").value };
  const button = $("add");
  button.disabled = true;
  try {
    const r = await api("POST", "/v1/facts", fact);
    const ids = r.ids.join(", ");
    say("add-status", "Fact " + ids + " accepted: editing it in (job " + r.job.id + ")…");
    await loadFacts();
    const job = await waitForJob(r.job);
    if (job.status === "succeeded") {
      say("add-status", "Fact " + ids + " added.");
    } else {
      say("add-status", "Adding fact " + ids + " failed: " + job.error, true);
    }
  } catch (e) {
    say("add-status", "Could not add the fact: " + e.message, true);
  } finally {
    button.disabled = false;
  }
  await loadFacts();
  await refreshHealth();
}

async function complete(prompt, maxTokens, edits) {
  const body = { prompt, max_tokens: maxTokens, temperature: 0 };
  if (!edits) body.neuraldb = { edits: false };
  const r = await api("POST", "/v1/completions", body);
  return r.choices[0].text;
}

async function ask(event) {
  event.preventDefault();
  const prompt = $("prompt").value;
  const maxTokens = parseInt($("max-tokens").value, 10) || 16;
  const button = $("ask");
  button.disabled = true;
  say("ask-status", "Generating…");
  $("answer-edited").textContent = "";
  $("answer-plain").textContent = "";
  const [edited, plain] = await Promise.allSettled([
    complete(prompt, maxTokens, true),
    complete(prompt, maxTokens, false),
  ]);
  for (const [id, result] of [["answer-edited", edited], ["answer-plain", plain]]) {
    $(id).textContent = result.status === "fulfilled" ? result.value : "Error: " + result.reason.message;
    $(id).classList.toggle("error", result.status !== "fulfilled");
  }
  let status = "Done.";
  if (edited.status === "fulfilled" && plain.status === "fulfilled") {
    status = edited.value === plain.value ? "Done: the edits do not change this answer." : "Done: the edits change this answer.";
  }
  say("ask-status", status);
  button.disabled = false;
}

document.addEventListener("DOMContentLoaded", () => {
  $("ask-form").addEventListener("submit", ask);
  $("add-form").addEventListener("submit", addFact);
  $("search-form").addEventListener("submit", (event) => {
    event.preventDefault();
    loadFacts();
  });
  refreshHealth();
  loadFacts();
});
