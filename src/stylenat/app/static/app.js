// The explorer page: plain DOM code against the JSON API of stylenat.app.server (no framework,
// nothing loaded from elsewhere). Latents travel as {seed: N} or {ws: base64 float32}.
// Images are the model's W x H (info.width, info.height) and are shown with that aspect; pixels are [y, x].
"use strict";

const $ = (id) => document.getElementById(id);
const state = { info: null, projected: null, pickers: {} };

// ---- talking to the server ----

async function answer(res) {
  let data = null;
  try { data = await res.json(); } catch (e) { /* not JSON: a server error page */ }
  if (!res.ok) throw new Error((data && data.error) || `${res.status} ${res.statusText}`);
  return data;
}

async function api(path, body) {
  const res = await fetch(path, {
    method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body),
  });
  return answer(res);
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

// Runs fn with "label…" shown; shows the time taken, or the server's message when it fails.
async function task(label, fn) {
  setStatus(`${label}…`);
  const start = performance.now();
  try {
    await fn();
    setStatus(`${label}: ${((performance.now() - start) / 1000).toFixed(2)} s`);
  } catch (e) {
    setStatus(e.message, true);
  }
}

// Sliders fire faster than the model answers: run fn once at a time, then once more if asked meanwhile.
function latestOnly(fn) {
  let running = false, again = false;
  return async function run() {
    if (running) { again = true; return; }
    running = true;
    do { again = false; await fn(); } while (again);
    running = false;
  };
}

// Truncation and class apply to every tab.
function common() {
  const out = { psi: Number($("psi").value) };
  if (state.info.classes.length) out.class = Number($("class").value);
  return out;
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  node.append(...children);
  return node;
}

// Small models are blown up with crisp pixels.
function isSmall(info) { return Math.max(info.width, info.height) < 128; }

function image(src, alt) {
  const img = el("img", { src, alt });
  if (isSmall(state.info)) img.classList.add("pixelated");
  return img;
}

// A size as the page writes it: "32×32", "32×16" (width × height).
function sizeText(width, height) { return `${width}×${height}`; }

// A stage's (width, height): a square stage has its edge as resolution, a rectangle's names both.
function stageSize(s) { return s.width === undefined ? [s.resolution, s.resolution] : [s.width, s.height]; }

// ---- latent pickers: a seed, or the projected image once there is one ----

function makePicker(span) {
  const kind = el("select", {}, el("option", { value: "seed" }, "seed"),
                  el("option", { value: "projected", disabled: "" }, "projected image"));
  const seed = el("input", { type: "number", min: "0", value: span.dataset.seed });
  kind.addEventListener("change", () => { seed.hidden = kind.value !== "seed"; });
  span.append(el("label", {}, `${span.dataset.label} `, kind), " ", seed);
  return {
    kind, seed,
    value: () => (kind.value === "seed" ? { seed: Number(seed.value) } : { ws: state.projected }),
  };
}

// ---- sample, grid, attention ----

const updateImage = latestOnly(() => task("image", async () => {
  const seed = Number($("seed").value);
  const r = await api("/api/image", { latent: { seed }, ...common() });
  $("image").src = r.image;
  $("image").dataset.seed = seed;
}));

function setSeed(seed) {
  $("seed").value = Math.max(0, seed);
  updateImage();
}

function kernelText(pair) { return pair[0] === pair[1] ? `${pair[0]}` : `${pair[0]}×${pair[1]}`; }

function showAttention(ev) {
  // x over the image's width, y over its height: each axis on its own (the image need not be square).
  const img = ev.currentTarget, box = img.getBoundingClientRect(), { width, height } = state.info;
  const x = Math.min(width - 1, Math.max(0, Math.floor(((ev.clientX - box.left) / box.width) * width)));
  const y = Math.min(height - 1, Math.max(0, Math.floor(((ev.clientY - box.top) / box.height) * height)));
  const resolutions = [...document.querySelectorAll("#stages input:checked")].map((c) => Number(c.value));
  task(`attention at (${y}, ${x})`, async () => {
    const r = await api("/api/attention", { seed: Number(img.dataset.seed), pixel: [y, x], resolutions, ...common() });
    const rows = r.rows.map((row) => el("div", { class: "attn-row" },
      el("h3", {}, `${sizeText(row.width, row.height)} block ${row.block}: query (${row.query.join(", ")})`),
      el("div", { class: "cells" },
        el("figure", {}, image(row.image, "query"), el("figcaption", {}, "query pixel")),
        ...row.groups.map((g) => el("figure", {}, image(g.image, `group ${g.group}`),
          el("figcaption", {}, `group ${g.group}, ${g.heads} head${g.heads > 1 ? "s" : ""}`, el("br"),
            `kernel ${kernelText(g.kernel)}`, el("br"), `dilation ${kernelText(g.dilation)}`))))));
    $("attention").replaceChildren(...rows);
  });
}

function showGrid() {
  const rows = Number($("grid-rows").value), cols = Number($("grid-cols").value);
  task("grid", async () => {
    const r = await api("/api/grid", { seed: Number($("seed").value), count: rows * cols, ...common() });
    $("grid").style.setProperty("--cols", cols);
    $("grid").replaceChildren(...r.images.map((src, i) => {
      const cell = el("button", { title: `seed ${r.seeds[i]}` }, image(src, `seed ${r.seeds[i]}`));
      cell.addEventListener("click", () => setSeed(r.seeds[i]));
      return cell;
    }));
  });
}

// ---- mixing ----

function checkGroup(indices) {
  for (const box of document.querySelectorAll("#mix-layers input")) box.checked = indices.includes(Number(box.value));
}

function runMix() {
  const layers = [...document.querySelectorAll("#mix-layers input:checked")].map((c) => Number(c.value));
  task("mix", async () => {
    const r = await api("/api/mix", { a: state.pickers.mixA.value(), b: state.pickers.mixB.value(), layers, ...common() });
    [$("mix-a-image").src, $("mix-b-image").src, $("mix-image").src] = r.images;
  });
}

// ---- interpolation, played in the page ----

const player = { frames: [], timer: null };

function showFrame(i) {
  $("interp-frame").src = player.frames[i];
  $("interp-pos").value = i;
  $("interp-label").textContent = `frame ${i + 1} of ${player.frames.length}`;
}

function pause() {
  clearInterval(player.timer);
  player.timer = null;
  $("interp-play").textContent = "Play";
}

function play() {
  pause();
  const fps = Math.min(60, Math.max(1, Number($("interp-fps").value) || 12));
  player.timer = setInterval(() => showFrame((Number($("interp-pos").value) + 1) % player.frames.length), 1000 / fps);
  $("interp-play").textContent = "Pause";
}

function runInterpolation() {
  pause();
  task("interpolation", async () => {
    const r = await api("/api/interpolate", {
      a: state.pickers.interpA.value(), b: state.pickers.interpB.value(), frames: Number($("interp-frames").value), ...common(),
    });
    player.frames = r.frames;
    $("interp-pos").max = r.frames.length - 1;
    $("interp-pos").disabled = $("interp-play").disabled = false;
    showFrame(0);
    play();
  });
}

// ---- editing ----

const updateEdit = latestOnly(() => task("edit", async () => {
  const strengths = [...document.querySelectorAll("#edit-sliders input")].map((s) => Number(s.value));
  const r = await api("/api/edit", { latent: state.pickers.edit.value(), strengths, group: $("edit-group").value, ...common() });
  $("edit-image").src = r.image;
}));

function buildSliders(count) {
  for (let i = 0; i < count; i++) {
    const slider = el("input", { type: "range", min: "-10", max: "10", step: "0.5", value: "0", "aria-label": `direction ${i}` });
    const value = el("output", {}, "0");
    slider.addEventListener("input", () => { value.textContent = slider.value; updateEdit(); });
    $("edit-sliders").append(el("span", {}, `direction ${i}`), slider, value);
  }
}

// ---- projection ----

const sleep = (ms) => new Promise((done) => setTimeout(done, ms));

// A number from the server; those JSON cannot hold arrive as "inf", "-inf" or "nan".
function num(x, digits) {
  if (typeof x === "number") return x.toFixed(digits);
  return x === "inf" ? "∞" : x === "-inf" ? "−∞" : String(x);
}

async function pollProjection(id) {
  for (;;) {
    const s = await answer(await fetch(`/api/project/${id}`));
    $("project-progress").value = s.step / s.steps;
    $("project-text").textContent = `${s.state}: step ${s.step} of ${s.steps}` + (s.loss === null ? "" : `, loss ${num(s.loss, 4)}`);
    if (s.state === "done") return finishProjection(s);
    if (s.state === "failed" || s.state === "stopped") throw new Error(`projection ${s.state}${s.error ? ": " + s.error : ""}`);
    await sleep(500);
  }
}

function finishProjection(s) {
  $("project-target").src = s.target;
  $("project-image").src = s.image;
  $("project-caption").textContent = `projection: PSNR ${num(s.psnr, 2)} dB (${s.distance})`;
  state.projected = s.latent;
  for (const p of Object.values(state.pickers)) p.kind.options[1].disabled = false;
}

function startProjection() {
  const file = $("project-file").files[0];
  task("projection", async () => {
    if (!file) throw new Error("choose an image file first");
    const query = new URLSearchParams({ steps: Number($("project-steps").value) });
    if (state.info.classes.length) query.set("class", Number($("class").value));  // the class chosen in the header
    const res = await fetch(`/api/project?${query}`, {
      method: "POST", body: file, headers: { "content-type": file.type || "application/octet-stream" },
    });
    const job = await answer(res);
    $("project-stop").disabled = false;
    $("project-stop").onclick = () => fetch(`/api/project/${job.job}/stop`, { method: "POST" });
    try { await pollProjection(job.job); } finally { $("project-stop").disabled = true; }
  });
}

// ---- set-up from /api/info ----

// A stage as the page names it: its edge (16) for a square, "16×8" for a rectangle.
function stageText(s) { return s.width === undefined ? `${s.resolution}` : sizeText(...stageSize(s)); }

function describe(info) {
  const stages = info.stages.map(stageText);
  $("model-info").textContent = `${sizeText(info.width, info.height)}, ${info.num_ws} latents, stages ${stages.join("/")}, ${info.device}`;
  for (const s of info.stages) {
    const groups = s.kernels.map((k, i) => `k${kernelText(k)} d${kernelText(s.dilations[i])}`).join(", ");
    // The attention API names a stage by its longer side (a square stage's edge).
    const box = el("input", { type: "checkbox", value: Math.max(...stageSize(s)) });
    box.checked = true;
    $("stages").append(el("label", { title: groups }, box, ` ${stageText(s)}`));
  }
}

// Pictures keep the model's aspect: the longer side gets the size CSS gives a square, the shorter its share.
function setAspect(info) {
  const longer = Math.max(info.width, info.height);
  document.documentElement.style.setProperty("--fit-w", info.width / longer);
  document.documentElement.style.setProperty("--fit-h", info.height / longer);
}

function buildLayerControls(info) {
  for (let i = 0; i < info.num_ws; i++) {
    const s = info.stages[Math.floor(i / 2)];
    const where = s.width === undefined ? `${s.resolution}²` : sizeText(s.width, s.height);
    $("mix-layers").append(el("label", {}, el("input", { type: "checkbox", value: i }), ` ${i} (${where})`));
  }
  for (const [name, indices] of Object.entries(info.layer_groups)) {
    const button = el("button", { title: `ws ${indices.join(", ")}` }, name);
    button.addEventListener("click", () => checkGroup(indices));
    $("mix-groups").append(button);
    $("edit-group").append(el("option", { value: name }, name));
  }
  checkGroup(Object.values(info.layer_groups)[0]);
}

function showTab(name) {
  for (const b of document.querySelectorAll("#tabs button")) b.classList.toggle("active", b.dataset.tab === name);
  for (const t of document.querySelectorAll(".tab")) t.hidden = t.id !== `tab-${name}`;
  if (name === "edit" && !$("edit-image").getAttribute("src")) updateEdit();
}

function wire() {
  for (const b of document.querySelectorAll("#tabs button")) b.addEventListener("click", () => showTab(b.dataset.tab));
  $("psi").addEventListener("input", () => { $("psi-value").textContent = Number($("psi").value).toFixed(2); updateImage(); });
  $("class").addEventListener("change", updateImage);
  $("seed").addEventListener("input", updateImage);
  $("seed-prev").addEventListener("click", () => setSeed(Number($("seed").value) - 1));
  $("seed-next").addEventListener("click", () => setSeed(Number($("seed").value) + 1));
  $("seed-random").addEventListener("click", () => setSeed(Math.floor(Math.random() * 100000)));
  $("image").addEventListener("click", showAttention);
  $("grid-show").addEventListener("click", showGrid);
  $("mix-run").addEventListener("click", runMix);
  $("interp-run").addEventListener("click", runInterpolation);
  $("interp-play").addEventListener("click", () => (player.timer ? pause() : play()));
  $("interp-pos").addEventListener("input", () => { pause(); showFrame(Number($("interp-pos").value)); });
  $("edit-group").addEventListener("change", updateEdit);
  $("edit-reset").addEventListener("click", () => {
    for (const s of document.querySelectorAll("#edit-sliders input")) { s.value = 0; s.nextSibling.textContent = "0"; }
    updateEdit();
  });
  $("project-start").addEventListener("click", startProjection);
}

async function start() {
  try {
    state.info = await answer(await fetch("/api/info"));
  } catch (e) {
    setStatus(`cannot reach the model: ${e.message}`, true);
    return;
  }
  const info = state.info;
  setAspect(info);
  describe(info);
  buildLayerControls(info);
  buildSliders(info.limits.max_directions);
  $("class-label").hidden = info.classes.length === 0;
  $("class").append(...info.classes.map((name, i) => el("option", { value: i }, name)));
  const pictures = ["image", "mix-a-image", "mix-b-image", "mix-image", "interp-frame", "edit-image", "project-target", "project-image"];
  if (isSmall(info)) for (const id of pictures) $(id).classList.add("pixelated");
  state.pickers = {
    mixA: makePicker($("mix-a")), mixB: makePicker($("mix-b")),
    interpA: makePicker($("interp-a")), interpB: makePicker($("interp-b")), edit: makePicker($("edit-latent")),
  };
  for (const p of [state.pickers.edit.kind, state.pickers.edit.seed]) p.addEventListener("change", updateEdit);
  wire();
  document.body.dataset.ready = "true";
  updateImage();
}

start();
