// The answer table sorts by a column (click its heading) and filters by
// text, in the page: no request is made. Served from the agent itself
// (Content-Security-Policy: script-src 'self').
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  const table = document.querySelector("table.answer");
  if (!table) return;
  const body = table.tBodies[0];
  const rows = Array.from(body.rows);
  const count = document.getElementById("shown");
  table.querySelectorAll("thead th").forEach((heading, column) => {
    heading.addEventListener("click", () => {
      const ascending = heading.dataset.order !== "asc";
      table.querySelectorAll("thead th").forEach((h) => delete h.dataset.order);
      heading.dataset.order = ascending ? "asc" : "desc";
      const numeric = heading.classList.contains("num");
      const key = (row) => {
        const text = row.cells[column].dataset.sort ?? row.cells[column].textContent;
        return numeric ? Number(text) : text;
      };
      const sorted = Array.from(body.rows).sort((a, b) => {
        const [x, y] = [key(a), key(b)];
        const order = x < y ? -1 : x > y ? 1 : 0;
        return ascending ? order : -order;
      });
      sorted.forEach((row) => body.appendChild(row));
    });
  });
  const filter = document.getElementById("filter");
  if (filter) {
    filter.addEventListener("input", () => {
      const wanted = filter.value.trim().toLowerCase();
      let shown = 0;
      for (const row of rows) {
        row.hidden = wanted !== "" && !row.textContent.toLowerCase().includes(wanted);
        if (!row.hidden) shown += 1;
      }
      if (count) count.textContent = String(shown);
    });
  }
});
