// fiore web page: pick an image and tasks, POST /v1/predict, draw the answers over the image.
"use strict";
const $ = (id) => document.getElementById(id);
const canvas = $("canvas");
const ctx = canvas.getContext("2d");
const PALETTE = ["#e69f00", "#56b4e9", "#009e73", "#f0e442", "#0072b2", "#d55e00", "#cc79a7", "#78c828", "#ff5050"];
let image = null;      // HTMLImageElement of the chosen file
let file = null;       // the File itself, uploaded as is
let scale = 1;         // canvas pixels per image pixel
let drag = null;       // region being drawn, image pixels
let lastAnswer = null;

function colour(label) {
  let h = 0;
  for (const ch of String(label)) h = (h * 31 + ch.codePointAt(0)) >>> 0;
  return PALETTE[h % PALETTE.length];
}

function setStatus(text, error = false) {
  $("status").textContent = text;
  $("status").className = error ? "error" : "";
}

function headers() {
  const key = $("apikey").value;
  return key ? { "X-API-Key": key } : {};
}

async function loadTasks() {
  const box = $("tasks");
  try {
    const res = await fetch("/v1/tasks", { headers: headers() });
    if (!res.ok) throw new Error((await res.json()).error || res.statusText);
    const tasks = await res.json();
    box.innerHTML = "<legend>Tasks</legend>";
    for (const t of tasks) {
      const label = document.createElement("label");
      const input = document.createElement("input");
      input.type = "checkbox";
      input.name = "task";
      input.value = t.name;
      input.id = "task-" + t.name;
      input.dataset.inputs = t.inputs;
      if (t.name === "od" || t.name === "caption") input.checked = true;
      label.append(input, " " + t.name + (t.inputs !== "none" ? " (" + t.inputs + ")" : ""));
      box.append(label);
    }
    box.dataset.loaded = "1";
  } catch (err) {
    box.innerHTML = "<legend>Tasks</legend>";
    setStatus("could not list tasks: " + err.message, true);
  }
}

// Every located instance in a task's JSON answer, whatever the result type.
function instancesOf(r) {
  const out = [];
  if (!r || typeof r !== "object") return out;
  if (r.boxes && !Array.isArray(r.boxes)) return [...instancesOf(r.boxes), ...instancesOf(r.polygons)]; // Mixed
  const scores = r.scores || [];
  if (Array.isArray(r.phrases)) {
    r.phrases.forEach((p, i) => (r.boxes?.[i] || []).forEach((b) => out.push({ kind: "box", c: b, label: p, score: scores[i] })));
    return out;
  }
  const labels = r.labels || [];
  (r.boxes || r.bboxes || []).forEach((b, i) =>
    out.push({ kind: "box", c: b, label: (r.box_labels || r.bboxes_labels || labels)[i] ?? "", score: (r.box_scores || scores)[i] }));
  (r.polygons || []).forEach((p, i) =>
    out.push({ kind: "polygon", c: p, label: (r.polygon_labels || r.polygons_labels || labels)[i] ?? "", score: (r.polygon_scores || scores)[i] }));
  (r.quads || r.quad_boxes || []).forEach((q, i) => out.push({ kind: "quad", c: [q], label: labels[i] ?? "", score: scores[i] }));
  return out;
}

function textOf(r) {
  if (typeof r === "string") return r;
  if (r && typeof r.text === "string") return r.text;
  if (r && typeof r.label === "string") return r.label;
  return null;
}

function fmt(score) {
  return typeof score === "number" ? score.toFixed(2) : "";
}

function redraw() {
  if (!image) return;
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  ctx.drawImage(image, 0, 0, canvas.width, canvas.height);
  let drawn = 0;
  ctx.lineWidth = 2;
  ctx.font = "13px system-ui, sans-serif";
  for (const [task, r] of Object.entries(lastAnswer || {})) {
    for (const inst of instancesOf(r)) {
      const col = colour(inst.label || task);
      ctx.strokeStyle = col;
      let x0, y0;
      if (inst.kind === "box") {
        const [x1, y1, x2, y2] = inst.c.map((v) => v * scale);
        ctx.strokeRect(x1, y1, x2 - x1, y2 - y1);
        [x0, y0] = [x1, y1];
      } else {
        for (const ring of inst.c) {
          if (!ring || ring.length < 4) continue;
          ctx.beginPath();
          ctx.moveTo(ring[0] * scale, ring[1] * scale);
          for (let k = 2; k + 1 < ring.length; k += 2) ctx.lineTo(ring[k] * scale, ring[k + 1] * scale);
          ctx.closePath();
          ctx.globalAlpha = 0.3; ctx.fillStyle = col; ctx.fill(); ctx.globalAlpha = 1;
          ctx.stroke();
          if (x0 === undefined) [x0, y0] = [ring[0] * scale, ring[1] * scale];
        }
      }
      const caption = (inst.label + " " + fmt(inst.score)).trim();
      if (caption && x0 !== undefined) {
        const w = ctx.measureText(caption).width + 6;
        const y = Math.max(0, y0 - 16);
        ctx.fillStyle = col; ctx.fillRect(x0, y, w, 16);
        ctx.fillStyle = "#000"; ctx.fillText(caption, x0 + 3, y + 12);
      }
      drawn += 1;
    }
  }
  const region = parseRegion();
  if (region) {
    ctx.setLineDash([6, 4]); ctx.strokeStyle = "#fff"; ctx.lineWidth = 2;
    ctx.strokeRect(region[0] * scale, region[1] * scale, (region[2] - region[0]) * scale, (region[3] - region[1]) * scale);
    ctx.setLineDash([]);
  }
  canvas.dataset.drawn = String(drawn);
}

function parseRegion() {
  const v = $("region").value.split(",").map(Number);
  return v.length === 4 && v.every(Number.isFinite) && v[2] > v[0] && v[3] > v[1] ? v : null;
}

function showAnswers(answer) {
  const list = $("answers");
  list.innerHTML = "";
  for (const [task, r] of Object.entries(answer)) {
    const li = document.createElement("li");
    li.dataset.task = task;
    const insts = instancesOf(r);
    const text = textOf(r);
    let body = text !== null ? JSON.stringify(text) : insts.length + " instance(s)";
    if (insts.length) body += ": " + insts.slice(0, 20).map((i) => (i.label + " " + fmt(i.score)).trim()).join(", ");
    const score = r && typeof r.score === "number" ? " (score " + fmt(r.score) + ")" : "";
    li.innerHTML = "<b></b> <span></span><span class=score></span>";
    li.children[0].textContent = task;
    li.children[1].textContent = body;
    li.children[2].textContent = score;
    list.append(li);
  }
}

$("image").addEventListener("change", () => {
  file = $("image").files[0] || null;
  if (!file) return;
  const img = new Image();
  img.onload = () => {
    image = img;
    scale = Math.min(1, 900 / img.naturalWidth);
    canvas.width = Math.round(img.naturalWidth * scale);
    canvas.height = Math.round(img.naturalHeight * scale);
    lastAnswer = null;
    $("json").textContent = "";
    $("answers").innerHTML = "";
    $("run").disabled = false;
    canvas.dataset.drawn = "0";
    redraw();
    setStatus(img.naturalWidth + "x" + img.naturalHeight + " image loaded");
  };
  img.onerror = () => setStatus("the browser cannot read this image", true);
  img.src = URL.createObjectURL(file);
});

function toImage(ev) {
  const rect = canvas.getBoundingClientRect();
  const x = ((ev.clientX - rect.left) * (canvas.width / rect.width)) / scale;
  const y = ((ev.clientY - rect.top) * (canvas.height / rect.height)) / scale;
  const W = image.naturalWidth, H = image.naturalHeight;
  return [Math.max(0, Math.min(W, x)), Math.max(0, Math.min(H, y))];
}

canvas.addEventListener("mousedown", (ev) => { if (image) drag = toImage(ev); });
canvas.addEventListener("mousemove", (ev) => {
  if (!drag) return;
  const [x, y] = toImage(ev);
  $("region").value = [Math.min(drag[0], x), Math.min(drag[1], y), Math.max(drag[0], x), Math.max(drag[1], y)]
    .map((v) => Math.round(v)).join(",");
  redraw();
});
window.addEventListener("mouseup", () => { drag = null; });
$("region").addEventListener("input", redraw);
$("apikey").addEventListener("change", loadTasks);

$("run").addEventListener("click", async () => {
  if (!file) return setStatus("choose an image first", true);
  const tasks = [...document.querySelectorAll("input[name=task]:checked")].map((i) => i.value);
  if (!tasks.length) return setStatus("pick at least one task", true);
  const form = new FormData();
  form.append("image", file);
  tasks.forEach((t) => form.append("task", t));
  if ($("text").value.trim()) form.append("text", $("text").value);
  if ($("region").value.trim()) form.append("region", $("region").value);
  $("run").disabled = true;
  setStatus("running " + tasks.join(", ") + "…");
  const t0 = performance.now();
  try {
    const res = await fetch("/v1/predict", { method: "POST", body: form, headers: headers() });
    const answer = await res.json();
    if (!res.ok) throw new Error(answer.error || res.statusText);
    lastAnswer = answer;
    $("json").textContent = JSON.stringify(answer, null, 2);
    showAnswers(answer);
    redraw();
    setStatus("done in " + Math.round(performance.now() - t0) + " ms");
  } catch (err) {
    setStatus(err.message, true);
  } finally {
    $("run").disabled = false;
  }
});

loadTasks();
