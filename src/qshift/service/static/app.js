// qshift search page: state lives in the URL (?q=…&index=…&k=…&off=adapt,refine) so a search can be shared.
const $ = (id) => document.getElementById(id);
let indexes = [];
let blobs = [];

function headers(extra = {}) {
  const token = sessionStorage.getItem("qshift-token");
  return token ? { ...extra, Authorization: `Bearer ${token}` } : extra;
}

async function api(path, options = {}) {
  const r = await fetch(path, { ...options, headers: headers(options.headers || {}) });
  const body = r.headers.get("content-type")?.includes("json") ? await r.json() : await r.text();
  if (!r.ok) throw new Error(typeof body === "object" ? (typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail)) : body);
  return body;
}

function readState() {
  const p = new URLSearchParams(location.search);
  return { q: p.get("q") || "", index: p.get("index") || "", k: p.get("k") || "12",
           off: (p.get("off") || "").split(",").filter(Boolean) };
}

function writeState(state) {
  const p = new URLSearchParams();
  if (state.q) p.set("q", state.q);
  if (state.index) p.set("index", state.index);
  p.set("k", state.k);
  if (state.off.length) p.set("off", state.off.join(","));
  history.replaceState(null, "", `?${p}`);
}

function currentIndex() { return indexes.find((g) => g.name === $("index").value) || indexes[0]; }

function renderStages(off) {
  const box = $("stages");
  box.innerHTML = "";
  const g = currentIndex();
  for (const s of g.stages.filter((s) => ["refine", "adapt", "transform"].includes(s.kind))) {
    const label = document.createElement("label");
    label.innerHTML = `<input type="checkbox" data-kind="${s.kind}" ${off.includes(s.kind) ? "" : "checked"}> ${s.kind}: ${s.name}`;
    label.querySelector("input").addEventListener("change", () => search());
    box.appendChild(label);
  }
}

function stagesState() {
  const stages = {};
  const off = [];
  for (const box of $("stages").querySelectorAll("input[data-kind]")) {
    stages[box.dataset.kind] = box.checked;
    if (!box.checked) off.push(box.dataset.kind);
  }
  return { stages, off };
}

async function thumb(index, id) {
  const r = await fetch(`/items/${encodeURIComponent(id)}/thumbnail?index=${encodeURIComponent(index)}`, { headers: headers() });
  if (!r.ok) return null;
  const url = URL.createObjectURL(await r.blob());
  blobs.push(url);
  return url;
}

async function renderHits(el, index, hits, withImages) {
  el.innerHTML = "";
  for (const h of hits) {
    const card = document.createElement("div");
    card.className = "hit";
    card.dataset.id = h.id;
    const caption = (h.metadata.captions || [h.metadata.text || ""])[0] || "";
    card.innerHTML = `<div class="img"></div><div><span class="rank">#${h.rank}</span> <span class="score">${h.score.toFixed(3)}</span></div>` +
      `<div class="id">${h.id}</div><div class="cap"></div>`;
    card.querySelector(".cap").textContent = caption;
    el.appendChild(card);
    if (withImages) thumb(index, h.id).then((url) => { if (url) card.querySelector(".img").innerHTML = `<img alt="${h.id}" src="${url}">`; });
  }
}

async function show(res) {
  blobs.forEach((u) => URL.revokeObjectURL(u));
  blobs = [];
  const g = currentIndex();
  const rep = res.changed && res.changed.repaired;
  $("repaired").hidden = !rep;
  if (rep) $("repaired").textContent = `repaired query: “${rep}” (fusion weight ${(res.changed.fusion_weight ?? 0).toFixed(2)})`;
  await renderHits($("results"), g.name, res.results, g.thumbnails);
  $("without").hidden = !res.baseline;
  if (res.baseline) await renderHits($("baseline"), g.name, res.baseline, g.thumbnails);
  const ms = Object.entries(res.timings).map(([k, v]) => `${k} ${(1000 * v).toFixed(1)} ms`).join(" · ");
  $("status").className = "";
  $("status").textContent = `${res.results.length} results · stages: ${res.stages.join(" → ")} · ${ms}`;
}

function fail(err) { $("status").className = "error"; $("status").textContent = `error: ${err.message}`; }

async function search(file = null) {
  const q = $("q").value.trim();
  const { stages, off } = stagesState();
  const k = parseInt($("k").value || "12", 10);
  const anyOn = Object.values(stages).some(Boolean);
  writeState({ q, index: $("index").value, k: String(k), off });
  try {
    if (file) {
      const form = new FormData();
      form.append("image", file);
      form.append("k", k);
      form.append("index", $("index").value);
      form.append("stages", JSON.stringify(stages));
      form.append("compare", anyOn);
      await show(await api("/search/upload", { method: "POST", body: form }));
    } else if (q) {
      await show(await api("/search", { method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ text: q, k, index: $("index").value, stages, compare: anyOn }) }));
    }
  } catch (err) { fail(err); }
}

async function main() {
  const state = readState();
  $("token").value = sessionStorage.getItem("qshift-token") || "";
  $("token").addEventListener("change", () => { sessionStorage.setItem("qshift-token", $("token").value); init(state); });
  $("search").addEventListener("submit", (e) => { e.preventDefault(); search(); });
  const drop = $("drop");
  drop.addEventListener("click", () => $("file").click());
  $("file").addEventListener("change", () => $("file").files[0] && search($("file").files[0]));
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); if (e.dataTransfer.files[0]) search(e.dataTransfer.files[0]); });
  await init(state);
}

async function init(state) {
  try { indexes = await api("/indexes"); } catch (err) { fail(err); return; }
  $("index").innerHTML = indexes.map((g) => `<option value="${g.name}">${g.name} (${g.items} ${g.modality}s)</option>`).join("");
  if (state.index) $("index").value = state.index;
  $("index").addEventListener("change", () => { renderStages([]); search(); });
  $("q").value = state.q;
  $("k").value = state.k;
  renderStages(state.off);
  if (state.q) search();
}

main();
