// Picks the view of index.html from the path (/train: training, else chat) before the body is
// drawn, then loads that view's module once the page is parsed. A file rather than an inline
// script, so the server's Content-Security-Policy can forbid inline scripts.
document.documentElement.dataset.page = location.pathname.replace(/\/+$/, "") === "/train" ? "train" : "chat";
document.addEventListener("DOMContentLoaded", () => {
  import(document.documentElement.dataset.page === "train" ? "/static/train.js" : "/static/chat.js");
});
