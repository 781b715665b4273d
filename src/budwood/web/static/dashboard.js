// The job page: the loss chart, and while the job is not finished, what is new every few seconds
// (metrics.json?after=SEQ): metrics merged into the chart by step (the latest value of a step wins,
// as a worker that takes a job over repeats the steps since its last checkpoint) and events added to
// the log. When the job's status changes (running, finished) the page reloads, to show what it brings.
(function () {
  "use strict";
  const root = document.getElementById("job");
  if (!root) return;
  const canvas = document.getElementById("loss-chart");
  const empty = document.getElementById("chart-empty");
  const initial = JSON.parse(document.getElementById("loss-series").textContent);
  const steps = {train: new Map(initial.train), valid: new Map(initial.valid)};
  const points = (map) => Array.from(map, ([x, y]) => ({x: x, y: y})).sort((a, b) => a.x - b.x);

  const chart = new Chart(canvas, {
    type: "line",
    data: {datasets: [
      {label: "training loss", data: points(steps.train), borderColor: "#2f6fb0", backgroundColor: "#2f6fb0",
       borderWidth: 1.5, pointRadius: 1.5, pointHitRadius: 6},
      {label: "validation loss", data: points(steps.valid), borderColor: "#c8691c", backgroundColor: "#c8691c",
       borderWidth: 2, pointRadius: 3.5, pointHitRadius: 8},
    ]},
    options: {
      animation: false, responsive: true, maintainAspectRatio: false,
      interaction: {mode: "nearest", axis: "x", intersect: false},
      scales: {
        x: {type: "linear", title: {display: true, text: "step"}, ticks: {precision: 0}},
        y: {title: {display: true, text: "loss (nats per token)"}},
      },
      plugins: {legend: {position: "bottom"}},
    },
  });

  const text = (id, value) => { const el = document.getElementById(id); if (el) el.textContent = value; };
  const events = document.querySelector("#events tbody");
  const maxRows = 300;

  function addEvent(e) {
    const row = document.createElement("tr");
    row.className = "level-" + e.level;
    row.dataset.seq = e.seq;
    for (const [cls, value] of [["time", e.time], ["", e.level], ["", e.message]]) {
      const cell = document.createElement("td");
      if (cls) cell.className = cls;
      cell.textContent = value;
      row.appendChild(cell);
    }
    events.insertBefore(row, events.firstChild);
    while (events.rows.length > maxRows) events.deleteRow(events.rows.length - 1);
  }

  function latest(map) {
    if (map.size === 0) return null;
    return map.get(Math.max(...map.keys()));
  }

  function update(body) {
    let changed = false;
    for (const e of body.events) {
      for (const name of ["train", "valid"]) {
        if (name in e) { steps[name].set(e.step, e[name]); changed = true; }
      }
      addEvent(e);
    }
    if (changed) {
      chart.data.datasets[0].data = points(steps.train);
      chart.data.datasets[1].data = points(steps.valid);
      chart.update("none");
      empty.hidden = true;
      for (const [name, id] of [["train", "job-train-loss"], ["valid", "job-valid-loss"]]) {
        const value = latest(steps[name]);
        if (value !== null) text(id, value.toFixed(4));
      }
    }
    text("job-progress", body.progress);
    text("job-speed", body.tokens_per_s);
    text("job-eta", body.estimated_finish);
  }

  let after = Number(root.dataset.after);
  const every = Number(root.dataset.pollMs) || 2000;

  async function poll() {
    let reply;
    try {
      reply = await fetch(root.dataset.metricsUrl + "?after=" + after,
                          {credentials: "same-origin", headers: {Accept: "application/json"}});
    } catch (err) {
      setTimeout(poll, every);  // the server away for a moment
      return;
    }
    if (reply.status === 401) { location.reload(); return; }  // signed out: the page goes to the login form
    if (reply.status === 404) return;  // the job is gone
    if (!reply.ok) { setTimeout(poll, every); return; }
    const body = await reply.json();
    if (body.status !== root.dataset.status) { location.reload(); return; }  // a new status: the page anew
    update(body);
    after = body.after;
    root.dataset.after = after;
    setTimeout(poll, every);
  }

  if (root.dataset.finished !== "true") setTimeout(poll, every);
})();
