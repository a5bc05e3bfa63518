// The page's only script: upload one image to /api/predict and show what came back.
"use strict";

const $ = (id) => document.getElementById(id);
const pct = (p) => (100 * p).toFixed(1) + " %";

function setStatus(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

async function loadModelInfo() {
  $("model-info").textContent = "Loading model details\u2026";
  try {
    const r = await fetch("/api/model");
    const m = await r.json();
    const rule = m.threshold === null ? "highest probability wins"
      : `${m.positive_class} when p(${m.positive_class}) \u2265 ${m.threshold.toFixed(3)}`;
    $("model-info").textContent =
      `Model ${m.arch}, ${m.image_size} px, classes ${m.classes.join(" / ")}; decision: ${rule}. ` +
      `Uploads up to ${m.max_upload_mb} MB.`;
    if (m.trained_on && m.trained_on.sentence) $("trained-on").textContent = m.trained_on.sentence;
  } catch (e) {
    $("model-info").textContent = "Model details unavailable.";
  }
}

// One meaning of probability everywhere: p(positive class) against the threshold, said in words.
function reading(result) {
  if (result.threshold === null || !result.positive_class) {
    return `${result.label} is the most probable class (${pct(result.probabilities[result.label])})`;
  }
  const name = result.positive_class;
  const p = result.probabilities[name];
  const side = p >= result.threshold ? "at or above" : "below";
  return `${pct(p)} \u2013 ${side} the ${pct(result.threshold)} needed to call ${name}`;
}

function show(result) {
  $("label").textContent = result.in_scope === false ? "no reading: " + result.warning : result.label;
  const positive = result.threshold === null ? null : result.positive_class;
  $("probability-term").textContent = positive ? `p(${positive})` : "Probability";
  $("probability").textContent = result.in_scope === false ? "\u2014" : reading(result);
  $("threshold").textContent = result.threshold === null
    ? "none (highest probability wins)"
    : `${pct(result.threshold)} on p(${result.positive_class})`;
  const body = $("probabilities").querySelector("tbody");
  body.replaceChildren();
  for (const [name, p] of Object.entries(result.probabilities)) {
    const row = body.insertRow();
    row.insertCell().textContent = name;
    const bar = document.createElement("meter");
    bar.min = 0; bar.max = 1; bar.value = p;
    row.insertCell().appendChild(bar);
    row.insertCell().textContent = pct(p);
  }
  const fig = $("heatmap-figure");
  if (result.heatmap_png_base64) {
    $("heatmap").src = "data:image/png;base64," + result.heatmap_png_base64;
    $("heatmap-caption").textContent =
      `Grad-CAM for ${result.heatmap_class}: bright regions raised that class's score most. ` +
      `Original ${result.image.width} \u00d7 ${result.image.height} px.`;
    fig.hidden = false;
  } else {
    fig.hidden = true;
  }
  $("result").hidden = false;
  showFeedback(result);
}

async function upload(file) {
  if (!file) return;
  $("result").hidden = true;
  setStatus(`Reading ${file.name}\u2026`, false);
  const form = new FormData();
  form.append("file", file, file.name);
  const heatmap = $("want-heatmap").checked ? "true" : "false";
  try {
    const r = await fetch(`/api/predict?heatmap=${heatmap}`, { method: "POST", body: form });
    const body = await r.json().catch(() => ({}));
    if (!r.ok) {
      const detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail || body);
      setStatus(`Could not read ${file.name} (${r.status}): ${detail}`, true);
      return;
    }
    show(body);
    setStatus(`${file.name}: done in ${Math.round(body.elapsed_ms)} ms.`, false);
  } catch (e) {
    setStatus(`Upload failed: ${e}`, true);
  }
}

$("file").addEventListener("change", (e) => upload(e.target.files[0]));
const drop = $("drop");
for (const type of ["dragenter", "dragover"]) {
  drop.addEventListener(type, (e) => { e.preventDefault(); drop.classList.add("over"); });
}
for (const type of ["dragleave", "drop"]) {
  drop.addEventListener(type, (e) => { e.preventDefault(); drop.classList.remove("over"); });
}
drop.addEventListener("drop", (e) => upload(e.dataTransfer.files[0]));
drop.addEventListener("keydown", (e) => {
  if (e.key === "Enter" || e.key === " ") { e.preventDefault(); $("file").click(); }
});
$("drop").hidden = false;
loadModelInfo();

// ------------------------------------------------------------------ access token and readers' feedback
// With `pneumo serve --host ... --token` every /api/ call needs the token. It is kept for this tab only
// (sessionStorage) and added here to same-origin /api/ requests, so the reading code above stays as it is.
const nativeFetch = window.fetch.bind(window);
window.fetch = (resource, init = {}) => {
  const token = sessionStorage.getItem("pneumo-token");
  const url = new URL(typeof resource === "string" ? resource : resource.url, location.href);
  if (token && url.origin === location.origin && url.pathname.startsWith("/api/")) {
    const headers = new Headers(init.headers || {});
    headers.set("Authorization", `Bearer ${token}`);
    init = { ...init, headers };
  }
  return nativeFetch(resource, init).then((r) => {
    if (r.status === 401) $("access").hidden = false; // no token yet, or a wrong one
    return r;
  });
};

async function loadAccess() {
  try {
    const a = await (await nativeFetch("/api/access")).json();
    const haveToken = Boolean(sessionStorage.getItem("pneumo-token"));
    $("access").hidden = !a.token_required || haveToken;
    if (a.token_required && haveToken) loadModelInfo(); // the first call went out before the token was added
    const notes = [];
    if (a.audit) notes.push("Every reading is recorded in this server's audit trail (the image's hash and the result; no file name).");
    if (a.keep_images) {
      $("drop-help").textContent = "The image is sent only to this server, which keeps its pixels (no file name) for retraining.";
    }
    $("audit-note").textContent = notes.join(" ");
    $("audit-note").hidden = notes.length === 0;
  } catch (e) {
    $("audit-note").hidden = true;
  }
}

$("access-form").addEventListener("submit", (e) => {
  e.preventDefault();
  sessionStorage.setItem("pneumo-token", $("access-token").value.trim());
  $("access-token").value = "";
  $("access").hidden = true;
  loadModelInfo();
});

let feedbackFor = null; // the result the reader is judging

function setVerdict(agreed) {
  $("feedback-agree").setAttribute("aria-pressed", String(agreed));
  $("feedback-disagree").setAttribute("aria-pressed", String(!agreed));
  const labels = Object.keys(feedbackFor.probabilities);
  if (agreed) $("feedback-label").value = feedbackFor.label;
  else if (labels.length === 2) $("feedback-label").value = labels.find((c) => c !== feedbackFor.label);
  $("feedback-send").disabled = false;
}

function showFeedback(result) {
  feedbackFor = result;
  $("feedback").hidden = !result.reading_id;
  if (!result.reading_id) return;
  const select = $("feedback-label");
  select.replaceChildren(...Object.keys(result.probabilities).map((c) => new Option(c, c)));
  select.value = result.label;
  $("feedback-note").value = "";
  $("feedback-status").textContent = "";
  $("feedback-agree").setAttribute("aria-pressed", "false");
  $("feedback-disagree").setAttribute("aria-pressed", "false");
  $("feedback-send").disabled = true;
}

async function sendFeedback() {
  const agreed = $("feedback-agree").getAttribute("aria-pressed") === "true";
  const body = {
    reading_id: feedbackFor.reading_id,
    agreed: agreed,
    true_label: $("feedback-label").value,
    note: $("feedback-note").value.trim() || null,
  };
  try {
    const r = await fetch("/api/feedback", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
    });
    const answer = await r.json().catch(() => ({}));
    if (!r.ok) {
      const detail = typeof answer.detail === "string" ? answer.detail : JSON.stringify(answer.detail || answer);
      $("feedback-status").textContent = `Not recorded (${r.status}): ${detail}`;
      return;
    }
    $("feedback-status").textContent = `Recorded: ${agreed ? "agreed" : "disagreed"}, true label ${answer.true_label}.`;
    $("feedback-send").disabled = true;
  } catch (e) {
    $("feedback-status").textContent = `Not recorded: ${e}`;
  }
}

$("feedback-agree").addEventListener("click", () => setVerdict(true));
$("feedback-disagree").addEventListener("click", () => setVerdict(false));
$("feedback-label").addEventListener("change", () => {
  setVerdict($("feedback-label").value === feedbackFor.label);
});
$("feedback-send").addEventListener("click", sendFeedback);
loadAccess();
