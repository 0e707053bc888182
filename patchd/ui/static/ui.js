// patchd approval pages: confirm before a decision, refresh live tables in place. No framework.
"use strict";
document.addEventListener("submit", (event) => {
  const form = event.target;
  const question = form.getAttribute("data-confirm");
  if (question && !window.confirm(question)) event.preventDefault();
});

function refresh(box) {
  fetch(window.location.href, { credentials: "same-origin", headers: { "Accept": "text/html" } })
    .then((resp) => (resp.ok && !resp.redirected ? resp.text() : null))
    .then((html) => {
      if (html === null) return;
      const fresh = new DOMParser().parseFromString(html, "text/html").querySelector("[data-refresh]");
      if (fresh) box.replaceChildren(...fresh.childNodes);
    })
    .catch(() => {});
}

for (const box of document.querySelectorAll("[data-refresh]")) {
  const seconds = Math.max(2, Number(box.getAttribute("data-refresh")) || 10);
  window.setInterval(() => { if (!document.hidden) refresh(box); }, seconds * 1000);
}
