// cxrnode dashboard: refresh the panels marked data-refresh every 10 s while the page is
// visible, by fetching the same page and swapping those panels in. Nothing runs while the
// tab is hidden; a panel the user is working in (a focused control, an open <details>) is
// left alone until the next round.
(function () {
  "use strict";
  var PERIOD_MS = 10000;
  var timer = null;

  function busy(panel) {
    var focused = document.activeElement;
    if (focused && focused !== document.body && panel.contains(focused)) return true;
    return panel.querySelector("details[open]") !== null;
  }

  function refresh() {
    timer = null;
    if (document.hidden) return;
    fetch(window.location.href, { credentials: "same-origin", headers: { "Accept": "text/html", "X-Cxrnode-Refresh": "1" } })
      .then(function (response) {
        if (response.redirected || !response.ok) throw new Error("status " + response.status);
        return response.text();
      })
      .then(function (html) {
        var fresh = new DOMParser().parseFromString(html, "text/html");
        document.querySelectorAll("[data-refresh][id]").forEach(function (panel) {
          var next = fresh.getElementById(panel.id);
          if (next && !busy(panel)) panel.replaceWith(next);
        });
        var stamp = fresh.getElementById("refreshed");
        var mine = document.getElementById("refreshed");
        if (stamp && mine) mine.textContent = stamp.textContent;
      })
      .catch(function () {
        var mine = document.getElementById("refreshed");
        if (mine) mine.textContent = "not updated (node unreachable?)";
      })
      .finally(schedule);
  }

  function schedule() {
    if (!document.querySelector("[data-refresh][id]")) return;  // e.g. the login page
    if (timer === null && !document.hidden) timer = window.setTimeout(refresh, PERIOD_MS);
  }

  // A notice after an action ("queued again") belongs to that moment: a reload should not
  // show it again.
  if (window.location.search.indexOf("notice=") !== -1 && window.history.replaceState) {
    var url = new URL(window.location.href);
    url.searchParams.delete("notice");
    url.searchParams.delete("n");
    window.history.replaceState(null, "", url.pathname + url.search + url.hash);
  }

  document.addEventListener("visibilitychange", function () {
    if (document.hidden) {
      if (timer !== null) window.clearTimeout(timer);
      timer = null;
    } else {
      refresh();
    }
  });
  schedule();
})();
