"""The web page served at `GET /`: drop or pick images, see the predicted labels.

A multi-label bundle's answer shows as the set of labels that pass, each with a bar for its score
and a mark at its threshold, or "no label" when none passes.

Self-contained on purpose (inline CSS and JS, no CDN, no external font): graft runs where there
is no network, and the server sends a Content-Security-Policy that forbids any other origin.
Everything the server returns is put into the page with `textContent`, never as HTML.
"""

PAGE_HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>graft — predict</title>
<style>
  :root { --fg: #1d232a; --muted: #5c6670; --line: #d5dbe1; --accent: #2b6cb0; --bad: #b42318; }
  * { box-sizing: border-box; }
  body { margin: 0; font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: var(--fg); background: #f6f8fa; }
  header, main { max-width: 980px; margin: 0 auto; padding: 16px 20px; }
  h1 { font-size: 22px; margin: 8px 0 2px; }
  #model-info { color: var(--muted); margin: 0; }
  #drop-zone { display: block; border: 2px dashed var(--line); border-radius: 10px; background: #fff;
               padding: 32px 20px; text-align: center; cursor: pointer; transition: border-color .15s, background .15s; }
  #drop-zone.over { border-color: var(--accent); background: #eef5fc; }
  #drop-zone strong { color: var(--accent); }
  #file-input { display: block; margin: 12px auto 0; }
  #limits { color: var(--muted); font-size: 13px; margin-top: 6px; }
  #results { display: grid; grid-template-columns: repeat(auto-fill, minmax(210px, 1fr)); gap: 14px; margin-top: 18px; padding: 0; }
  .result { list-style: none; background: #fff; border: 1px solid var(--line); border-radius: 10px; overflow: hidden; }
  .result img { display: block; width: 100%; height: 160px; object-fit: contain; background: #eceff2; image-rendering: auto; }
  .result .body { padding: 10px 12px 12px; }
  .result .name { font-size: 12px; color: var(--muted); overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
  .result .label { font-size: 18px; font-weight: 600; margin: 2px 0; }
  .result .error { color: var(--bad); font-size: 13px; }
  .result[data-unknown="true"] .label { color: var(--bad); }
  .result .unknown-note { color: var(--muted); font-size: 12px; }
  .result[data-state="pending"] .label { color: var(--muted); font-weight: 400; }
  .topk { list-style: none; margin: 6px 0 0; padding: 0; font-size: 13px; }
  .topk li { display: grid; grid-template-columns: 1fr 52px; gap: 6px; align-items: center; margin: 3px 0; }
  .bar { position: relative; height: 18px; background: #eceff2; border-radius: 4px; overflow: hidden; }
  .bar span { position: absolute; inset: 0 auto 0 0; background: #bcd4ee; }
  .bar em { position: relative; padding-left: 6px; font-style: normal; white-space: nowrap; }
  .topk .pct { text-align: right; font-variant-numeric: tabular-nums; color: var(--muted); }
  .bar .threshold { position: absolute; top: 0; bottom: 0; width: 2px; margin-left: -1px; background: var(--fg); }
  .result[data-empty="true"] .label { color: var(--muted); }
  .result .note { color: var(--muted); font-size: 12px; }
</style>
</head>
<body>
<header>
  <h1>graft: predict</h1>
  <p id="model-info">loading the model's description…</p>
</header>
<main>
  <label id="drop-zone" for="file-input">
    <strong>Drop images here</strong> or pick them
    <input id="file-input" type="file" accept="image/*" multiple>
    <div id="limits"></div>
  </label>
  <ul id="results" aria-live="polite"></ul>
</main>
<script>
"use strict";
(function () {
  const results = document.getElementById("results");
  const input = document.getElementById("file-input");
  const zone = document.getElementById("drop-zone");
  let limits = { max_upload_bytes: Infinity, max_images: 1 };

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }
  function percent(score) { return (100 * score).toFixed(1) + "%"; }
  function megabytes(bytes) { return (bytes / 1048576).toFixed(1) + " MB"; }

  fetch("healthz").then(function (response) { return response.json(); }).then(function (info) {
    limits = info;
    document.getElementById("model-info").textContent = info.task === "multilabel"
      ? info.backbone + " · " + info.num_classes + " labels, several per image: " + info.classes.join(", ") +
        " · a label is shown when its score reaches its threshold (the mark on its bar)"
      : info.backbone + " · " + info.num_classes + " classes: " + info.classes.join(", ") +
        (info.temperature !== 1 ? " · scores calibrated (temperature " + info.temperature.toFixed(2) + ")" : "");
    document.getElementById("limits").textContent =
      "Up to " + megabytes(info.max_upload_bytes) + " per image. Images stay on this server.";
  }).catch(function () {
    document.getElementById("model-info").textContent = "the server did not answer /healthz";
  });

  function card(file) {
    const item = el("li", "result");
    item.dataset.state = "pending";
    const image = el("img");
    image.alt = file.name;
    image.src = URL.createObjectURL(file);
    const body = el("div", "body");
    body.append(el("div", "name", file.name), el("div", "label", "predicting…"));
    item.append(image, body);
    results.prepend(item);
    return item;
  }

  function showPrediction(item, prediction) {
    item.dataset.state = "done";
    const body = item.querySelector(".body");
    if (prediction.label === "unknown" && prediction.unknown_score !== undefined) {
      // Unlike the training images: the classes below are what the classifier alone would say.
      item.dataset.unknown = "true";
      body.querySelector(".label").textContent = "unknown";
      body.append(el("div", "unknown-note", "unlike the training images (unknown score " +
        prediction.unknown_score.toFixed(3) + "); the classes' own scores:"));
    } else {
      body.querySelector(".label").textContent = prediction.label + " " + percent(prediction.score);
    }
    const list = el("ol", "topk");
    prediction.top_k.forEach(function (entry) { list.append(scoreRow(entry)); });
    body.append(list);
  }

  // One label's row: a bar as long as its score with the label on it, and the score; `threshold`
  // (multi-label) adds a mark where the label's threshold lies.
  function scoreRow(entry, threshold) {
    const row = el("li");
    const bar = el("div", "bar");
    const fill = el("span");
    fill.style.width = percent(entry.score);
    bar.append(fill);
    if (threshold !== undefined) {
      const mark = el("i", "threshold");
      mark.style.left = percent(threshold);
      mark.title = "threshold " + percent(threshold);
      bar.append(mark);
    }
    bar.append(el("em", "", entry.label));
    row.append(bar, el("span", "pct", percent(entry.score)));
    return row;
  }

  // A multi-label answer: the labels that reach their thresholds, each with its score's bar and a
  // mark at its threshold; "no label" when none does, with the closest one.
  function showLabelSet(item, prediction, thresholds) {
    item.dataset.state = "done";
    item.dataset.task = "multilabel";
    const body = item.querySelector(".body");
    const names = prediction.labels.map(function (entry) { return entry.label; });
    body.querySelector(".label").textContent = names.length ? names.join(", ") : "no label";
    if (!names.length) {
      item.dataset.empty = "true";
      const best = prediction.top_k[0];
      body.append(el("div", "note", "no label reaches its threshold; closest: " + best.label + " " +
        percent(best.score) + " (threshold " + percent(thresholds[best.label]) + ")"));
    }
    const list = el("ol", "topk labelset");
    prediction.labels.forEach(function (entry) { list.append(scoreRow(entry, thresholds[entry.label])); });
    body.append(list);
  }

  function showError(item, message) {
    item.dataset.state = "error";
    const body = item.querySelector(".body");
    body.querySelector(".label").textContent = "not predicted";
    body.append(el("div", "error", message));
  }

  async function predictOne(file, item) {
    if (file.size > limits.max_upload_bytes) {
      showError(item, "larger than the server's limit of " + megabytes(limits.max_upload_bytes));
      return;
    }
    const form = new FormData();
    form.append("files", file, file.name);
    try {
      const response = await fetch("predict", { method: "POST", body: form });
      const answer = await response.json();
      if (!response.ok) { showError(item, answer.detail || ("HTTP " + response.status)); return; }
      if (answer.thresholds) showLabelSet(item, answer.predictions[0], answer.thresholds);
      else showPrediction(item, answer.predictions[0]);
    } catch (error) {
      showError(item, "the request failed: " + error.message);
    }
  }

  // One request per image, one after the other: each card gets its own answer or error, and
  // the server's thread pool is not flooded by a folder dropped at once.
  let queue = Promise.resolve();
  function handle(files) {
    Array.from(files).forEach(function (file) {
      const item = card(file);
      queue = queue.then(function () { return predictOne(file, item); });
    });
  }

  input.addEventListener("change", function () { handle(input.files); input.value = ""; });
  ["dragenter", "dragover"].forEach(function (name) {
    zone.addEventListener(name, function (event) { event.preventDefault(); zone.classList.add("over"); });
  });
  ["dragleave", "drop"].forEach(function (name) {
    zone.addEventListener(name, function (event) { event.preventDefault(); zone.classList.remove("over"); });
  });
  zone.addEventListener("drop", function (event) { handle(event.dataTransfer.files); });
})();
</script>
</body>
</html>
"""
