// adforge runs: the new-run page's drop zone and the run page's live progress. Both pages work without this file
// (a plain file input and form posts; the run page shows its state as of loading). All text from the server goes
// in with textContent, never as HTML.
(function () {
  "use strict";

  // ------------------------------------------------------------------------------------------ new run: drop zone

  const zone = document.getElementById("dropzone");
  if (zone) {
    const input = document.getElementById("brief-file");
    const form = document.getElementById("brief-form");
    const stop = (e) => { e.preventDefault(); e.stopPropagation(); };
    ["dragenter", "dragover"].forEach((t) => zone.addEventListener(t, (e) => { stop(e); zone.classList.add("over"); }));
    ["dragleave", "dragend"].forEach((t) => zone.addEventListener(t, () => zone.classList.remove("over")));
    zone.addEventListener("drop", (e) => {
      stop(e);
      zone.classList.remove("over");
      if (!e.dataTransfer || !e.dataTransfer.files.length) return;
      input.files = e.dataTransfer.files;
      form.requestSubmit();  // the server checks it: the result is a page, as without JavaScript
    });
    // A dropped file that misses the zone must not replace the page with the file's contents.
    window.addEventListener("dragover", (e) => e.preventDefault());
    window.addEventListener("drop", (e) => e.preventDefault());
  }

  // ------------------------------------------------------------------------------------------ run page: progress

  const run = document.getElementById("run");
  if (!run) return;
  const cancelForm = document.getElementById("cancel-form");
  if (cancelForm) {
    cancelForm.addEventListener("submit", (e) => {
      if (!window.confirm("Cancel run " + run.dataset.runId + "? Images already made are kept.")) e.preventDefault();
    });
  }
  if (run.dataset.terminal === "1") { run.dataset.live = "done"; return; }

  const POLL_MS = 1000;
  const thumbs = document.getElementById("run-thumbs");
  const noThumbs = document.getElementById("no-thumbs");
  const bar = document.getElementById("run-progress");
  const pollError = document.getElementById("run-poll-error");
  const rerunForm = document.getElementById("rerun-form");
  const shown = new Set(Array.from(thumbs.querySelectorAll("[data-asset-id]")).map((a) => a.dataset.assetId));

  function field(name, text) {
    run.querySelectorAll('[data-field="' + name + '"]').forEach((el) => { el.textContent = text; });
  }

  function duration(s) {
    if (s === null || s === undefined) return "—";
    s = Math.round(s);
    if (s < 60) return s + " s";
    const m = Math.floor(s / 60);
    if (m < 60) return m + " min " + String(s % 60).padStart(2, "0") + " s";
    return Math.floor(m / 60) + " h " + String(m % 60).padStart(2, "0") + " min";
  }

  function when(iso) {
    if (!iso) return "—";
    const d = new Date(iso);
    return isNaN(d) ? iso : d.toISOString().replace("T", " ").replace(/\.\d+Z$/, "").replace(/Z$/, "") + " UTC";
  }

  function addThumb(a) {
    const id = String(a.asset_id);
    if (shown.has(id)) return;
    shown.add(id);
    const link = document.createElement("a");
    link.className = "run-thumb new";
    link.href = "/variants/" + encodeURIComponent(a.variant_id);
    link.dataset.assetId = id;
    link.title = (a.channel || "") + " · variant " + a.variant_id;
    const img = document.createElement("img");
    img.src = "/thumbs/" + encodeURIComponent(id) + "?w=160";
    img.alt = "variant " + a.variant_id + (a.channel ? " · " + a.channel : "");
    link.appendChild(img);
    thumbs.prepend(link);
    noThumbs.hidden = true;
  }

  async function allThumbs() {
    // The newest list holds a dozen; once the run ends, fill in any that landed between two polls.
    const res = await fetch(run.dataset.api + "/assets?per_page=200", { credentials: "same-origin", headers: { "Accept": "application/json" } });
    if (!res.ok) return;
    const data = await res.json();
    (data.assets || []).slice().forEach((a) => addThumb({ asset_id: a.id, variant_id: a.variant_id, channel: a.channel }));
  }

  function show(sub) {
    const c = sub.counts || {};
    const p = sub.progress || {};
    run.dataset.status = sub.status;
    field("status", sub.status.replace(/_/g, " "));
    const badge = document.getElementById("run-status");
    badge.className = "run-status status-" + sub.status;
    ["planned", "done", "skipped", "failed", "flagged"].forEach((k) => field(k, c[k] === null || c[k] === undefined ? "—" : String(c[k])));
    // A cancelled or failed run stopped short: its bar shows how far it got, not 100%.
    const ended = (c.done || 0) + (c.skipped || 0) + (c.failed || 0);
    const fraction = sub.status === "completed" ? 1 : c.planned ? Math.min(1, ended / c.planned)
      : typeof p.fraction === "number" ? Math.max(0, Math.min(1, p.fraction)) : 0;
    bar.value = fraction;
    bar.textContent = Math.round(fraction * 100) + "%";
    field("percent", Math.round(fraction * 100) + "%");
    field("rate", typeof p.images_per_second === "number" ? p.images_per_second.toFixed(2) : "—");
    field("elapsed", duration(p.elapsed_seconds));
    field("eta", sub.terminal ? "—" : duration(p.eta_seconds));
    field("cost", sub.cost && typeof sub.cost.cost === "number" ? sub.cost.cost.toFixed(4) : "—");
    field("finished", when(sub.finished_at));
    (sub.newest || []).slice().reverse().forEach(addThumb);
    field("shown", "(" + shown.size + ")");
    if (sub.terminal) {
      if (cancelForm) cancelForm.hidden = true;
      if (rerunForm) {
        rerunForm.hidden = !(c.failed > 0 || sub.status === "cancelled" || sub.status === "failed");
        document.getElementById("rerun-button").textContent = c.failed > 0 ? "Re-run failures" : "Run the rest";
      }
    }
  }

  async function poll() {
    let sub = null;
    try {
      const res = await fetch(run.dataset.api, { credentials: "same-origin", headers: { "Accept": "application/json" } });
      if (res.status === 401) { window.location.reload(); return; }  // signed out meanwhile: the sign-in page
      if (!res.ok) throw new Error(res.status + " " + res.statusText);
      sub = await res.json();
      pollError.hidden = true;
      show(sub);
    } catch (err) {
      pollError.textContent = "Live updates paused: " + err.message + " (retrying)";
      pollError.hidden = false;
    }
    if (sub && sub.terminal) {
      await allThumbs().catch(() => {});
      field("shown", "(" + shown.size + ")");
      run.dataset.terminal = "1";
      run.dataset.live = "done";  // the browser tests wait for this
      return;
    }
    setTimeout(poll, POLL_MS);
  }

  run.dataset.live = "polling";
  setTimeout(poll, POLL_MS);
})();
