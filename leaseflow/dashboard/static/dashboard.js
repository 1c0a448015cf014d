// leaseflow dashboard: live refresh, and the buttons (they call the JSON API with the
// bearer token kept in this tab's sessionStorage). No library.
"use strict";
(function () {
  const KEY = "leaseflow.token";
  const PERIOD = 4000;
  const token = () => sessionStorage.getItem(KEY) || "";

  function showTokenState() {
    const el = document.getElementById("token-state");
    if (el) el.textContent = token() ? "set" : "none";
  }

  function flash(text, ok) {
    const el = document.getElementById("flash");
    if (!el) return;
    el.textContent = text;
    el.className = "flash" + (ok === false ? " bad" : "");
    el.hidden = false;
  }

  async function api(method, path, body) {
    const headers = { "Content-Type": "application/json" };
    if (token()) headers.Authorization = "Bearer " + token();
    const response = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
    let data = null;
    try { data = await response.json(); } catch (e) { data = null; }
    if (!response.ok) {
      const why = data && data.message ? data.code + ": " + data.message : response.status + " " + response.statusText;
      throw new Error(why);
    }
    return data;
  }

  function report(text, ok) {
    const el = document.getElementById("action-result");
    if (el) { el.textContent = text; el.className = "result " + (ok ? "ok" : "bad"); el.hidden = false; }
    if (ok) {  // shown again after the reload that shows the new status
      sessionStorage.setItem("leaseflow.flash", text);
      setTimeout(() => location.reload(), 600);
    }
  }

  async function act(runId, kind, form) {
    const base = "/runs/" + encodeURIComponent(runId);
    try {
      if (kind === "cancel") {
        if (!confirm("Cancel run " + runId + "?")) return;
        const done = await api("POST", base + "/cancel", { reason: "cancelled from the dashboard" });
        report("Cancel: " + done.result + " (run " + done.run_status + ")", true);
      } else if (kind === "retry") {
        const from = prompt("Retry run " + runId + " from which state? (empty: where it stopped)", "");
        if (from === null) return;
        const done = await api("POST", base + "/retry", from ? { from_state: from } : {});
        report("Retry: the run resumes at " + done.state, true);
      } else if (kind === "signal") {
        const event = form.elements.event.value.trim();
        const raw = form.elements.payload.value.trim();
        let payload = null;
        if (raw) {
          try { payload = JSON.parse(raw); } catch (e) { report("The payload is not JSON: " + e.message, false); return; }
        }
        if (!confirm("Send signal " + event + " to run " + runId + "?")) return;
        const done = await api("POST", base + "/signals", { event, payload });
        report("Signal " + done.event + ": " + done.result + " (run " + done.run_status + " at " + done.state + ")", true);
      }
    } catch (e) {
      report(kind + " refused: " + e.message, false);
    }
  }

  document.addEventListener("click", (ev) => {
    const button = ev.target.closest("button[data-action]");
    if (button && (button.dataset.action === "cancel" || button.dataset.action === "retry")) {
      act(button.closest("[data-run]").dataset.run, button.dataset.action);
    } else if (button && button.dataset.action === "token") {
      const value = prompt("Bearer token for the buttons (kept in this tab only; empty to forget):", token());
      if (value !== null) { value ? sessionStorage.setItem(KEY, value.trim()) : sessionStorage.removeItem(KEY); showTokenState(); }
    } else if (button && button.dataset.action === "logout") {
      sessionStorage.removeItem(KEY);
    }
    const link = ev.target.closest("a.artifact");
    if (link && token()) {  // the API needs the bearer header: fetch, then open the bytes
      ev.preventDefault();
      fetch(link.href, { headers: { Authorization: "Bearer " + token() } })
        .then((r) => { if (!r.ok) throw new Error(r.status + " " + r.statusText); return r.blob(); })
        .then((blob) => window.open(URL.createObjectURL(blob), "_blank"))
        .catch((e) => flash("Artefact: " + e.message, false));
    }
  });

  document.addEventListener("submit", (ev) => {
    const form = ev.target;
    if (form.dataset.action === "signal") {
      ev.preventDefault();
      act(form.closest("[data-run]").dataset.run, "signal", form);
    } else if (form.id === "login-form") {
      const value = form.elements.token.value.trim();
      if (value) sessionStorage.setItem(KEY, value);
    }
  });

  // Live refresh: an element with data-live is replaced by what its URL answers, unless
  // the reader is busy in it (an open traceback, a field being typed in).
  function refresh() {
    const live = document.getElementById("live");
    if (live && !live.checked) return;
    document.querySelectorAll("[data-live]").forEach(async (el) => {
      if (el.querySelector("details[open]") || el.contains(document.activeElement)) return;
      try {
        const response = await fetch(el.dataset.live, { credentials: "same-origin" });
        if (response.ok && !response.redirected) {
          el.innerHTML = await response.text();
          if (!el.querySelector(".actions button[data-action=cancel]:not([disabled])")) {
            if (el.id === "run") delete el.dataset.live;  // finished: nothing more will change
          }
        }
      } catch (e) { /* the server is away: try again next time */ }
    });
  }

  document.addEventListener("DOMContentLoaded", () => {
    showTokenState();
    const kept = sessionStorage.getItem("leaseflow.flash");
    if (kept) { sessionStorage.removeItem("leaseflow.flash"); flash(kept, true); }
    setInterval(refresh, PERIOD);
  });
})();
