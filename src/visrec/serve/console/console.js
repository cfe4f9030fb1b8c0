// visrec console: plain script, no build step, no external assets; talks to the service's /v1 API only.
// The API key lives in this tab's sessionStorage and travels in the X-API-Key header, never in a URL, so
// images behind the API (thumbnails, catalogue images) are fetched with the header and shown as blob: URLs.
"use strict";

const $ = (id) => document.getElementById(id);
const SVG = "http://www.w3.org/2000/svg";
const KEY_STORE = "visrec-api-key";
const PAGE = 25;
let serves = [];

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children) if (c != null) node.append(c);
  return node;
}

function svgEl(tag, attrs = {}) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  return node;
}

function headers() {
  const key = sessionStorage.getItem(KEY_STORE);
  return key ? { "X-API-Key": key } : {};
}

// Every call: the API's own error message on failure ({"error": ...}), never swallowed.
async function api(path, { method = "GET", form = null, json = null } = {}) {
  const opts = { method, headers: headers() };
  if (form) opts.body = form;
  if (json) { opts.body = JSON.stringify(json); opts.headers["Content-Type"] = "application/json"; }
  const r = await fetch(path, opts);
  const type = r.headers.get("content-type") || "";
  if (!r.ok) {
    let msg = "HTTP " + r.status;
    if (type.includes("json")) { const j = await r.json(); msg = j.error || (j.detail && JSON.stringify(j.detail)) || msg; }
    const e = new Error(msg); e.status = r.status; throw e;
  }
  return type.includes("json") ? r.json() : r.blob();
}

async function blobUrl(path) { return URL.createObjectURL(await api(path)); }

// Object URLs of the photos a view shows, released when the view shows others (a long session keeps no stale copies).
const viewUrls = {};
function localUrl(view, blob) {
  const u = URL.createObjectURL(blob);
  (viewUrls[view] = viewUrls[view] || []).push(u);
  return u;
}
function releaseUrls(view) { for (const u of viewUrls[view] || []) URL.revokeObjectURL(u); viewUrls[view] = []; }

function showError(id, e) { $(id).textContent = e ? (e.message || String(e)) : ""; }

function galleryBase() {
  const g = $("gallery").value;
  return g ? "/v1/galleries/" + encodeURIComponent(g) + "/faces" : "/v1/faces";
}

function formWith(fields, files) {
  const fd = new FormData();
  for (const [k, v] of Object.entries(fields)) fd.append(k, v);
  for (const [k, f] of files) fd.append(k, f);
  return fd;
}

function file(id) {
  const f = $(id).files[0];
  if (!f) throw new Error("choose a photo first");
  return f;
}

// A photo with an SVG layer in the image's own pixel coordinates (viewBox = the decoded size the API reports,
// EXIF orientation applied by both the server and the browser), so boxes and points scale with the display.
function photoView(src, size, alt) {
  const img = el("img", { src, alt });
  const svg = svgEl("svg", { viewBox: `0 0 ${size.width} ${size.height}`, preserveAspectRatio: "none",
                             "aria-hidden": "true" });
  const fig = el("figure", { class: "photo" }, img);
  fig.append(svg);
  return { fig, svg, size };
}

function drawBox(view, box, cls, label) {
  const [x1, y1, x2, y2] = box;
  const rect = svgEl("rect", { x: x1, y: y1, width: x2 - x1, height: y2 - y1, class: cls });
  view.svg.append(rect);
  if (label) {
    const fs = Math.max(12, view.size.width / 40);
    const t = svgEl("text", { x: x1, y: Math.max(fs, y1 - fs / 4), "font-size": fs });
    t.textContent = label;
    view.svg.append(t);
  }
  return rect;
}

// -- tabs ----------------------------------------------------------------------------------------------------
function tabs() { return [...document.querySelectorAll("[role=tab]")].filter((t) => !t.hidden); }

function selectTab(tab, focus = false) {
  for (const t of document.querySelectorAll("[role=tab]")) {
    const on = t === tab;
    t.setAttribute("aria-selected", on ? "true" : "false");
    t.tabIndex = on ? 0 : -1;
    $(t.getAttribute("aria-controls")).hidden = !on;
  }
  if (focus) tab.focus();
  if (tab.id === "tab-gallery") loadPeople();
  if (tab.id === "tab-status") loadStatus();
}

for (const t of document.querySelectorAll("[role=tab]")) {
  t.addEventListener("click", () => selectTab(t));
  t.addEventListener("keydown", (ev) => {
    const all = tabs(), i = all.indexOf(t);
    let next = null;
    if (ev.key === "ArrowRight") next = all[(i + 1) % all.length];
    if (ev.key === "ArrowLeft") next = all[(i - 1 + all.length) % all.length];
    if (ev.key === "Home") next = all[0];
    if (ev.key === "End") next = all[all.length - 1];
    if (next) { ev.preventDefault(); selectTab(next, true); }
  });
}

// -- settings: key and gallery ---------------------------------------------------------------------------------
$("key").value = sessionStorage.getItem(KEY_STORE) || "";
$("key").addEventListener("change", () => {
  const v = $("key").value;
  if (v) sessionStorage.setItem(KEY_STORE, v); else sessionStorage.removeItem(KEY_STORE);
  start();
});
$("gallery").addEventListener("change", () => { people.offset = 0; loadPeople(); });

async function loadGalleries() {
  const sel = $("gallery"), keep = sel.value;
  const j = await api("/v1/galleries");
  sel.replaceChildren();
  for (const g of j.galleries) {
    sel.append(el("option", { value: g.name, text: `${g.name}${g.default ? " (default)" : ""}: ${g.identities} identities` }));
  }
  const names = j.galleries.map((g) => g.name), dflt = j.galleries.find((g) => g.default);
  sel.value = names.includes(keep) ? keep : (dflt ? dflt.name : (names[0] || ""));
}

async function start() {
  showError("global-error", null);
  try {
    const s = await api("/v1/status");
    serves = s.serves;
  } catch (e) { showError("global-error", e); serves = []; }
  for (const t of document.querySelectorAll("[role=tab]")) {
    const need = t.dataset.needs;
    t.hidden = Boolean(need) && !serves.includes(need);
  }
  if (serves.includes("faces")) {
    try { await loadGalleries(); } catch (e) { showError("global-error", e); }
  }
  $("gallery").closest("p").hidden = !serves.includes("faces");
  const current = tabs().find((t) => t.getAttribute("aria-selected") === "true");
  selectTab(current || tabs()[0]);
}

// -- gallery view ----------------------------------------------------------------------------------------------
const people = { offset: 0, total: 0, q: "" };
let shownThumbs = [];

async function loadPeople() {
  if (!serves.includes("faces")) return;
  showError("gallery-error", null);
  const params = new URLSearchParams({ offset: people.offset, limit: PAGE });
  if (people.q) params.set("q", people.q);
  let j;
  try { j = await api(galleryBase() + "?" + params); } catch (e) { showError("gallery-error", e); return; }
  people.total = j.total;
  for (const u of shownThumbs) URL.revokeObjectURL(u);
  shownThumbs = [];
  const body = $("people").querySelector("tbody");
  body.replaceChildren();
  for (const row of j.identities) {
    const photo = el("td");
    if (row.thumbnail) {
      const img = el("img", { class: "thumb", alt: "aligned face of " + row.identity });
      photo.append(img);
      blobUrl(galleryBase() + "/thumbnail?identity=" + encodeURIComponent(row.identity))
        .then((u) => { shownThumbs.push(u); img.src = u; }).catch(() => img.remove());
    } else {
      photo.append(el("span", { class: "nothumb", role: "img", "aria-label": "no thumbnail kept" }));
    }
    const actions = el("td", {}, el("div", { class: "actions" },
      el("button", { type: "button", text: "Add photos", "aria-label": "Add photos to " + row.identity,
                     onclick: () => { $("enroll-name").value = row.identity; selectTab($("tab-enroll"), true); } }),
      el("button", { type: "button", text: "Rename", "aria-label": "Rename " + row.identity,
                     onclick: () => askRename(row.identity) }),
      el("button", { type: "button", class: "danger", text: "Delete", "aria-label": "Delete " + row.identity,
                     onclick: () => askDelete(row.identity) })));
    body.append(el("tr", { "data-identity": row.identity }, photo, el("td", { class: "name", text: row.identity }),
                   el("td", { text: String(row.templates) }), actions));
  }
  if (!j.identities.length) {
    body.append(el("tr", {}, el("td", { colspan: "4", text: people.q ? "No name matches." : "Nobody is enrolled." })));
  }
  const last = Math.min(people.offset + j.identities.length, j.total);
  $("page-info").textContent = j.total ? `${people.offset + 1}-${last} of ${j.total}` : "0 of 0";
  $("people-caption").textContent = `Identities in gallery ${$("gallery").value || "(default)"}`;
  $("page-prev").disabled = people.offset === 0;
  $("page-next").disabled = last >= j.total;
}

$("gallery-search").addEventListener("submit", (ev) => {
  ev.preventDefault(); people.q = $("gallery-q").value.trim(); people.offset = 0; loadPeople();
});
$("page-prev").onclick = () => { people.offset = Math.max(0, people.offset - PAGE); loadPeople(); };
$("page-next").onclick = () => { people.offset += PAGE; loadPeople(); };

function askDelete(identity) {
  const d = $("delete-dialog");
  $("delete-text").textContent = `Delete ${identity} and every photo template and thumbnail kept of them? ` +
    "This cannot be undone.";
  d.returnValue = "";
  d.onclose = async () => {
    if (d.returnValue !== "delete") return;
    try {
      await api(galleryBase() + "?identity=" + encodeURIComponent(identity), { method: "DELETE" });
      await loadGalleries();
    } catch (e) { showError("gallery-error", e); }
    loadPeople();
  };
  d.showModal();
}

function askRename(identity) {
  const d = $("rename-dialog");
  $("rename-title").textContent = "Rename " + identity;
  $("rename-to").value = identity;
  d.returnValue = "";
  d.onclose = async () => {
    if (d.returnValue !== "save") return;
    try {
      await api(galleryBase() + "/rename", { method: "POST", json: { identity, to: $("rename-to").value.trim() } });
    } catch (e) { showError("gallery-error", e); }
    loadPeople();
  };
  d.showModal();
}

// -- enroll ------------------------------------------------------------------------------------------------------
const drop = $("drop");
let dropped = null;
drop.addEventListener("dragover", (ev) => { ev.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (ev) => {
  ev.preventDefault(); drop.classList.remove("over");
  dropped = [...ev.dataTransfer.files].filter((f) => f.type.startsWith("image/"));
  $("enroll-files").value = "";
  $("drop").querySelector("label").textContent = `${dropped.length} photo(s) dropped; drop others to replace them`;
});
$("enroll-files").addEventListener("change", () => { dropped = null; });

async function enrollOne(f, box) {
  const fields = { identity: $("enroll-name").value.trim() };
  if (box) fields.box = box.join(",");
  return api(galleryBase() + "/enroll", { method: "POST", form: formWith(fields, [["image", f]]) });
}

function enrolledText(j) { return `enrolled as ${j.identity} (${j.templates} template(s))`; }

$("enroll-go").onclick = async () => {
  showError("enroll-error", null);
  const files = dropped || [...$("enroll-files").files];
  const list = $("enroll-results");
  try {
    if (!$("enroll-name").value.trim()) throw new Error("type the person's name first");
    if (!files.length) throw new Error("drop or choose one or more photos first");
  } catch (e) { showError("enroll-error", e); return; }
  list.replaceChildren();
  releaseUrls("enroll");
  for (const f of files) {
    const status = el("p", { class: "status", text: "detecting faces..." });
    const card = el("li", { "data-file": f.name }, el("p", { class: "file", text: f.name }), status);
    list.append(card);
    const setStatus = (text, kind) => { status.textContent = text; card.dataset.result = kind; };
    try {
      const found = await api("/v1/faces/detect", { method: "POST", form: formWith({}, [["image", f]]) });
      const view = photoView(localUrl("enroll", f), found.image, "photo " + f.name);
      card.insertBefore(view.fig, status);
      if (!found.faces.length) { setStatus("no face found: not enrolled", "no-face"); continue; }
      if (found.faces.length === 1) {
        drawBox(view, found.faces[0].box, "face");
        setStatus(enrolledText(await enrollOne(f, null)), "enrolled");
        continue;
      }
      setStatus(`several faces (${found.faces.length}): pick the one to enroll`, "several-faces");
      const picks = el("div", { class: "row picks" });
      found.faces.forEach((face, i) => {
        const choose = async () => {
          try {
            setStatus(enrolledText(await enrollOne(f, face.box)), "enrolled");
            picks.remove();
          } catch (e) { setStatus("error: " + e.message, "error"); }
        };
        const rect = drawBox(view, face.box, "face pick", String(i + 1));
        rect.addEventListener("click", choose);
        picks.append(el("button", { type: "button", text: `Enroll face ${i + 1}`, onclick: choose }));
      });
      card.append(picks);
    } catch (e) { setStatus("error: " + e.message, "error"); }
  }
  try { await loadGalleries(); } catch (e) { /* the list is refreshed on the next visit */ }
};

// -- identify ----------------------------------------------------------------------------------------------------
function thresholdText(t, origin) {
  return t === null || t === undefined ? `No threshold: ${origin}` : `Threshold ${t}: ${origin}`;
}

$("identify-go").onclick = async () => {
  showError("identify-error", null);
  $("identify-photo").replaceChildren(); $("identify-faces").replaceChildren(); $("identify-threshold").textContent = "";
  releaseUrls("identify");
  try {
    const f = file("identify-file");
    const j = await api(galleryBase() + "/identify", { method: "POST", form: formWith({ all_faces: "true", top_k: "3" }, [["image", f]]) });
    $("identify-threshold").textContent = thresholdText(j.threshold, j.threshold_origin);
    const view = photoView(localUrl("identify", f), j.image, "photo searched");
    $("identify-photo").append(view.fig);
    j.faces.forEach((face, i) => {
      const m = face.matches[0];
      const verdict = !m ? "nobody enrolled" : (m.accepted ? "accepted" : "rejected");
      drawBox(view, face.box, "face " + (m && m.accepted ? "accepted" : "rejected"),
              `${i + 1}${m ? ": " + m.identity + " " + m.score.toFixed(3) : ""}`);
      const text = m ? `Face ${i + 1}: ${m.identity}, score ${m.score.toFixed(4)}, ${verdict}` : `Face ${i + 1}: ${verdict}`;
      $("identify-faces").append(el("li", { class: m && m.accepted ? "ok" : "bad", "data-identity": m ? m.identity : "",
                                           "data-verdict": verdict, text }));
    });
  } catch (e) { showError("identify-error", e); }
};

// -- verify ------------------------------------------------------------------------------------------------------
$("verify-go").onclick = async () => {
  showError("verify-error", null);
  $("verify-pair").replaceChildren(); $("verify-verdict").textContent = ""; $("verify-threshold").textContent = "";
  releaseUrls("verify");
  try {
    const a = file("verify-a"), b = file("verify-b");
    const fields = { crops: "true" };
    if ($("gallery").value) fields.gallery = $("gallery").value;
    const j = await api("/v1/faces/verify", { method: "POST", form: formWith(fields, [["image_a", a], ["image_b", b]]) });
    const verdict = j.same === null ? "no decision (no threshold)" : (j.same ? "Same person" : "Different people");
    $("verify-verdict").textContent = `${verdict}: score ${j.score.toFixed(4)}`;
    $("verify-verdict").className = "verdict " + (j.same ? "ok" : "bad");
    $("verify-verdict").dataset.same = String(j.same);
    $("verify-threshold").textContent = thresholdText(j.threshold, j.threshold_origin);
    [[a, j.faces[0], "first"], [b, j.faces[1], "second"]].forEach(([f, face, which]) => {
      $("verify-pair").append(el("figure", {},
        el("img", { src: localUrl("verify", f), alt: which + " photo", style: "max-width:100%;max-height:220px" }),
        el("img", { class: "crop-img", src: face.crop, alt: "aligned face of the " + which + " photo" }),
        el("figcaption", { text: `${which} photo, face at ${face.box.join(", ")}` })));
    });
  } catch (e) { showError("verify-error", e); }
};

// -- landmarks ---------------------------------------------------------------------------------------------------
let lastPoints = null;
$("lm-go").onclick = async () => {
  showError("lm-error", null);
  $("lm-photo").replaceChildren(); $("lm-info").textContent = ""; $("lm-download").disabled = true;
  releaseUrls("landmarks");
  try {
    const f = file("lm-file");
    const fields = serves.includes("faces") ? { detect: "true" } : {};
    const j = await api("/v1/landmarks", { method: "POST", form: formWith(fields, [["image", f]]) });
    lastPoints = { file: f.name, ...j };
    const view = photoView(localUrl("landmarks", f), j.image, "photo with landmarks");
    drawBox(view, j.crop_box, "crop");
    drawBox(view, j.box, "face");
    const r = Math.max(1.5, (j.box[2] - j.box[0]) / 80);
    for (const [x, y] of j.points) view.svg.append(svgEl("circle", { cx: x, cy: y, r }));
    $("lm-photo").append(view.fig);
    const own = j.crop_box.every((v, i) => Math.abs(v - j.box[i]) < 0.5);
    $("lm-info").textContent = `${j.points.length} points, scheme ${j.scheme || "unnamed"}; face box ${j.box_source}; ` +
      (own ? "the model reads the face box itself" : "dashed: the square crop the model read");
    $("lm-download").disabled = false;
  } catch (e) { showError("lm-error", e); }
};
$("lm-download").onclick = () => {
  const blob = new Blob([JSON.stringify(lastPoints, null, 1)], { type: "application/json" });
  const a = el("a", { href: URL.createObjectURL(blob), download: (lastPoints.file || "photo") + ".landmarks.json" });
  document.body.append(a); a.click(); a.remove();
  setTimeout(() => URL.revokeObjectURL(a.href), 10000);
};

// -- products ----------------------------------------------------------------------------------------------------
$("products-go").onclick = async () => {
  showError("products-error", null);
  $("products-grid").replaceChildren(); $("products-query").replaceChildren();
  releaseUrls("products");
  try {
    const f = file("products-file");
    const j = await api("/v1/products/search", { method: "POST", form: formWith({ top_k: $("products-k").value }, [["image", f]]) });
    $("products-query").append(el("figure", { class: "photo" }, el("img", { src: localUrl("products", f), alt: "query photo", style: "max-height:160px" })));
    j.results.forEach((res, i) => {
      const img = el("img", { alt: "catalogue image " + res.id });
      $("products-grid").append(el("li", { "data-id": res.id }, img,
        el("p", { text: `${i + 1}. ${res.id}` }), el("p", { text: "score " + res.score.toFixed(4) })));
      api(res.image).then((b) => { img.src = localUrl("products", b); }).catch((e) => showError("products-error", e));
    });
  } catch (e) { showError("products-error", e); }
};

// -- status ------------------------------------------------------------------------------------------------------
function kv(pairs) {
  const dl = el("dl", { class: "kv" });
  for (const [k, v] of pairs) dl.append(el("dt", { text: k }), el("dd", { text: v === null || v === undefined ? "-" : String(v) }));
  return dl;
}

function contractRows(m) {
  const c = m.contract;
  const rows = [["task", c.task], ["input", `${c.input_size.join("x")} ${c.colour_order}`], ["runtime", m.runtime],
                ["origin", c.origin], ["source", c.source]];
  if (c.task === "landmarks") rows.push(["points", `${c.num_points} (${c.point_scheme})`], ["crop margin", c.crop_margin]);
  else rows.push(["embedding", `${c.embedding_dim}-d, ${c.metric}`], ["alignment", `${c.align_method} ${c.align_template || ""}`],
                 ["threshold", m.threshold_origin || "none recorded"]);
  return rows;
}

async function loadStatus() {
  showError("status-error", null);
  const out = $("status-out");
  let s;
  try { s = await api("/v1/status"); } catch (e) { showError("status-error", e); return; }
  out.replaceChildren(el("h3", { text: "Service" }),
    kv([["health", s.status], ["version", s.version], ["serves", s.serves.join(", ") || "nothing"]]));
  if (s.faces) {
    out.append(el("h3", { text: "Face model" }), kv([["model", s.faces.model], ...contractRows(s.faces),
      ["detector", s.faces.detector], ["landmarks", s.faces.landmarks], ["detect size", s.faces.detect_size]]));
    const table = el("table", { id: "status-galleries" }, el("caption", { text: "Face galleries" }),
      el("thead", {}, el("tr", {}, ...["Gallery", "Backend", "Index", "Identities", "Templates", "Threshold"].map(
        (h) => el("th", { scope: "col", text: h })))));
    const tb = el("tbody");
    for (const g of s.galleries) {
      tb.append(el("tr", {}, el("td", { text: g.name + (g.default ? " (default)" : "") }), el("td", { text: g.backend }),
        el("td", { text: g.index }), el("td", { text: String(g.identities) }), el("td", { text: String(g.templates) }),
        el("td", { text: thresholdText(g.threshold, g.threshold_origin) })));
    }
    table.append(tb);
    out.append(el("div", { class: "scroll" }, table));
  }
  if (s.landmarks) out.append(el("h3", { text: "Landmark model" }), kv([["model", s.landmarks.model], ...contractRows(s.landmarks)]));
  if (s.products) out.append(el("h3", { text: "Product index" }),
    kv([["catalogue images", s.products.images], ["descriptor", s.products.dim + "-d"], ["index", s.products.index]]));
  out.append(el("h3", { text: "Request limits" }), kv(Object.entries(s.limits)));
}
$("status-go").onclick = loadStatus;

start();
