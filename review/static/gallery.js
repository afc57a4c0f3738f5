// adforge review gallery: keyboard review, the detail panel and compare selection on the variant grid.
// No framework and no work proportional to the page at load time beyond one querySelectorAll, so a page with
// hundreds of variants is interactive as soon as the HTML is parsed. All user text goes in with textContent,
// never as HTML: prompts are data, not markup.
(function () {
  "use strict";

  const grid = document.getElementById("gallery");
  if (!grid) return;

  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const canReview = document.body.dataset.canReview === "1";
  const cards = Array.from(grid.querySelectorAll(".card"));
  const indexOf = new Map(cards.map((c, i) => [c, i]));
  const flashBox = document.getElementById("flash");
  const panel = document.getElementById("detail-panel");
  const help = document.getElementById("keyboard-help");
  const compareButton = document.getElementById("compare-button");
  const compareCount = document.getElementById("compare-count");
  const GROUPS = "ABCDEFGHI";
  const selected = new Set();
  let current = -1;
  let panelVariant = null;

  // ------------------------------------------------------------------------------------------ messages

  function flash(text, kind) {
    const p = document.createElement("p");
    p.className = "flash flash-" + (kind || "info");
    p.textContent = text;
    flashBox.replaceChildren(p);
    clearTimeout(flash.timer);
    flash.timer = setTimeout(() => p.remove(), 5000);
  }

  async function send(url, body) {
    const res = await fetch(url, {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json", "Accept": "application/json", "X-CSRF-Token": csrf },
      body: JSON.stringify(body),
    });
    const data = await res.json().catch(() => ({}));
    if (!res.ok) throw new Error(typeof data.detail === "string" ? data.detail : res.status + " " + res.statusText);
    return data;
  }

  // ------------------------------------------------------------------------------------------ focus and movement

  function focusCard(i) {
    if (i < 0 || i >= cards.length) return;
    current = i;
    cards[i].focus({ preventScroll: true });
    cards[i].scrollIntoView({ block: "nearest", inline: "nearest" });
    if (panelVariant !== null) openPanel(cards[i]);
  }

  // Up/down follow the layout: the next visual line (also across sections), the card nearest in x there.
  function vertical(dir) {
    if (current < 0) return focusCard(0);
    const here = cards[current].getBoundingClientRect();
    const cx = here.left + here.width / 2;
    let lineTop = null;
    let best = -1;
    let bestDx = Infinity;
    for (let i = current + dir; i >= 0 && i < cards.length; i += dir) {
      const r = cards[i].getBoundingClientRect();
      const beyond = dir > 0 ? r.top > here.top + 1 : r.top < here.top - 1;
      if (!beyond) continue;
      if (lineTop === null) lineTop = r.top;
      if (Math.abs(r.top - lineTop) > 1) break; // past that line
      const dx = Math.abs(r.left + r.width / 2 - cx);
      if (dx < bestDx) { bestDx = dx; best = i; }
    }
    if (best >= 0) focusCard(best);
  }

  grid.addEventListener("focusin", (e) => {
    const card = e.target.closest(".card");
    if (card) current = indexOf.get(card);
  });

  // ------------------------------------------------------------------------------------------ review actions

  function show(card, review) {
    card.dataset.status = review.status;
    card.dataset.starred = review.starred ? "1" : "0";
    card.dataset.group = review.group || "";
    card.querySelector('[data-field="status"]').textContent = review.status;
    card.querySelector('[data-field="starred"]').textContent = review.starred ? "\u2605" : "";
    card.querySelector('[data-field="group"]').textContent = review.group || "";
  }

  function showReadiness(r) {
    const section = document.getElementById("section-" + r.row_id + "-" + r.channel);
    const badge = section && section.querySelector(".readiness");
    if (!badge) return;
    badge.dataset.ready = r.ready ? "1" : "0";
    badge.dataset.approved = String(r.approved);
    badge.dataset.needed = String(r.needed);
    badge.classList.toggle("ready", r.ready);
    badge.classList.toggle("not-ready", !r.ready);
    badge.textContent = r.approved + "/" + r.needed + " approved" + (r.ready ? " \u00b7 ready" : "");
  }

  // Changes to one card go out one after another, each computed from the state the previous one left, so
  // pressing a then r quickly ends rejected, whatever order the network would have answered in.
  function review(card, makeChange) {
    if (!canReview) { flash("Your role is read-only.", "error"); return; }
    const previous = card._queue || Promise.resolve();
    card._queue = previous.then(async () => {
      const change = makeChange(card.dataset);
      if (!change) return;
      card.classList.add("busy");
      try {
        const data = await send("/api/variants/" + card.dataset.variantId + "/review", change);
        show(card, data.review);
        showReadiness(data.readiness);
        if (panelVariant === card.dataset.variantId) fillPanelReview(data.review);
      } catch (err) {
        flash("Not saved: " + err.message, "error");
      } finally {
        card.classList.remove("busy");
      }
    });
  }

  const toggleStatus = (target) => (d) => ({ status: d.status === target ? "pending" : target });
  const toggleGroup = (g) => (d) => ({ group: d.group === g ? null : g });

  // ------------------------------------------------------------------------------------------ compare

  function toggleSelected(card) {
    const id = card.dataset.variantId;
    if (selected.has(id)) selected.delete(id); else selected.add(id);
    card.classList.toggle("selected", selected.has(id));
    const box = card.querySelector(".compare-toggle");
    if (box) box.checked = selected.has(id);
    compareCount.textContent = String(selected.size);
    compareButton.disabled = selected.size < 2;
  }

  function openCompare() {
    if (selected.size < 2) { flash("Select two or more variants with x first."); return; }
    window.location.href = "/compare?ids=" + Array.from(selected).join(",");
  }

  compareButton.addEventListener("click", openCompare);
  grid.addEventListener("change", (e) => {
    if (e.target.classList.contains("compare-toggle")) {
      const card = e.target.closest(".card");
      e.target.checked = !e.target.checked; // toggleSelected sets it from the selection
      toggleSelected(card);
    }
  });

  // ------------------------------------------------------------------------------------------ detail panel

  function setField(name, value) {
    const el = panel.querySelector('[data-field="' + name + '"]');
    if (el) el.textContent = value === null || value === undefined || value === "" ? "\u2014" : String(value);
  }

  function fillPanelReview(r) {
    setField("review.status", r.status + (r.starred ? " \u2605" : "") + (r.group ? " \u00b7 group " + r.group : ""));
  }

  async function openPanel(card) {
    const id = card.dataset.variantId;
    panelVariant = id;
    panel.hidden = false;
    panel.dataset.variantId = id;
    try {
      const res = await fetch("/api/variants/" + id, { credentials: "same-origin", headers: { Accept: "application/json" } });
      const v = await res.json();
      if (!res.ok) throw new Error(v.detail || res.statusText);
      if (panelVariant !== id) return; // moved on meanwhile
      for (const key of ["prompt", "negative_prompt", "seed", "sampler", "steps", "cfg_scale", "size"]) setField(key, v[key]);
      setField("model.name", v.model.name);
      setField("model.hash", v.model.hash);
      setField("model.license", v.model.license || "unknown");
      setField("row.key", v.row.key + " (" + v.row.brief.file_name + ":" + v.row.line + ")");
      setField("run.id", v.run ? v.run.id + " (" + v.run.status + ")" : null);
      fillPanelReview(v.review);
      // A flagged, unreleased asset: the server-blurred thumbnail (its full-size route refuses).
      document.getElementById("detail-image").src = v.filter && v.filter.withheld ? v.urls.thumb : v.urls.full;
      document.getElementById("detail-full-link").href = v.urls.full;
      document.getElementById("detail-page-link").href = v.urls.page;
    } catch (err) {
      flash("Could not load variant " + id + ": " + err.message, "error");
    }
  }

  function closePanel() {
    panel.hidden = true;
    panelVariant = null;
    if (current >= 0) cards[current].focus({ preventScroll: true });
  }

  document.getElementById("detail-close").addEventListener("click", closePanel);
  document.getElementById("detail-rerender").addEventListener("click", async () => {
    if (!panelVariant) return;
    try {
      const data = await send("/api/variants/" + panelVariant + "/rerender", {});
      flash(data.queued ? "Re-render request #" + data.request_id + " queued." : "Request #" + data.request_id + " is already waiting.");
    } catch (err) {
      flash("Not queued: " + err.message, "error");
    }
  });

  // A click on a thumbnail opens the panel (the link still works with a modifier key, or without JS).
  grid.addEventListener("click", (e) => {
    const link = e.target.closest(".card-open");
    if (!link || e.ctrlKey || e.metaKey || e.shiftKey || e.button !== 0) return;
    e.preventDefault();
    const card = link.closest(".card");
    focusCard(indexOf.get(card));
    openPanel(card);
  });

  document.getElementById("help-button").addEventListener("click", () => { help.hidden = !help.hidden; });

  // ------------------------------------------------------------------------------------------ keys

  document.addEventListener("keydown", (e) => {
    if (e.ctrlKey || e.metaKey || e.altKey) return;
    const t = e.target;
    if (t.closest && t.closest("input, select, textarea, [contenteditable]")) return;
    const key = e.key;
    if (key === "Escape") { help.hidden = true; if (!panel.hidden) closePanel(); return; }
    if (key === "?") { help.hidden = !help.hidden; e.preventDefault(); return; }
    if (!cards.length) return;
    const card = current >= 0 ? cards[current] : null;
    switch (key) {
      case "ArrowRight": focusCard(current < 0 ? 0 : Math.min(current + 1, cards.length - 1)); break;
      case "ArrowLeft": focusCard(current < 0 ? 0 : Math.max(current - 1, 0)); break;
      case "ArrowDown": vertical(1); break;
      case "ArrowUp": vertical(-1); break;
      case "Home": focusCard(0); break;
      case "End": focusCard(cards.length - 1); break;
      // Enter on a focused button or link is that control's own (sign out, help, compare, the panel's buttons).
      case "Enter": if (card && !(t.closest && t.closest("a[href], button, summary"))) openPanel(card); else return; break;
      case "a": if (card) review(card, toggleStatus("approved")); else return; break;
      case "r": if (card) review(card, toggleStatus("rejected")); else return; break;
      case "u": if (card) review(card, (d) => (d.status === "pending" ? null : { status: "pending" })); else return; break;
      case "s": if (card) review(card, (d) => ({ starred: d.starred !== "1" })); else return; break;
      case "0": if (card) review(card, (d) => (d.group ? { group: null } : null)); else return; break;
      case "x": if (card) toggleSelected(card); else return; break;
      case "c": openCompare(); break;
      default:
        if (key.length === 1 && key >= "1" && key <= "9" && card) { review(card, toggleGroup(GROUPS[Number(key) - 1])); break; }
        return;
    }
    e.preventDefault();
  });

  document.body.dataset.galleryReady = "1"; // for browser tests and the bench: handlers are attached
})();
