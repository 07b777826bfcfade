/* API docs page: show the model status from /readyz (a file, not inline: the page's CSP runs no inline script). */
(function () {
  "use strict";
  const url = document.currentScript.dataset.readyz || "/readyz";
  fetch(url).then((r) => r.json()).then((b) => {
    const el = document.getElementById("model-status");
    el.textContent = b.model ? `${b.model.name} ${b.model.version}` : b.status;
    el.className = "status status-" + b.status;
  }).catch(() => {});
})();
