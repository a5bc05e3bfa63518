// The page's only script: upload one image to /api/predict and show what came back.
"use strict";

const $ = (id) => document.getElementById(id);
const pct = (p) => (100 * p).toFixed(1) + " %";

function setStatus(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

async function loadModelInfo() {
  try {
    const r = await fetch("/api/model");
    const m = await r.json();
    const rule = m.threshold === null ? "highest probability wins"
      : `${m.positive_class} when p(${m.positive_class}) \u2265 ${m.threshold.toFixed(3)}`;
    $("model-info").textContent =
      `Model ${m.arch}, ${m.image_size} px, classes ${m.classes.join(" / ")}; decision: ${rule}. ` +
      `Uploads up to ${m.max_upload_mb} MB.`;
  } catch (e) {
    $("model-info").textContent = "Model details unavailable.";
  }
}

function show(result) {
  $("label").textContent = result.label;
  $("probability").textContent = pct(result.probability);
  $("threshold").textContent = result.threshold === null
    ? "none (highest probability wins)"
    : `${result.threshold.toFixed(3)} on p(${result.positive_class})`;
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
loadModelInfo();
