//! The dashboard panel: models with their backend, shapes and inference times; pipelines with
//! their counters, rate and latest results. It refreshes through the dashboard every 2 s.

pub const PANEL: &str = r##"<!doctype html><meta charset="utf-8"><body style="font:13px system-ui;margin:8px">
<p>Backend <b id="backend"></b> <span id="ortv"></span></p>
<table id="models" style="border-collapse:collapse"><thead><tr><th align=left>model</th><th align=left>provider</th><th align=left>inputs</th><th align=right>runs</th><th align=right>median ms</th><th align=right>p99 ms</th></tr></thead><tbody></tbody></table>
<p style="margin:8px 0 2px">Pipelines</p>
<table id="pipelines" style="border-collapse:collapse"><thead><tr><th align=left>key</th><th align=left>model</th><th align=right>in</th><th align=right>inferred</th><th align=right>forwarded</th><th align=right>dropped</th><th align=right>/s</th><th align=left>latest</th></tr></thead><tbody></tbody></table>
<p id="error" style="color:#b00"></p>
<script>
const cell = (tr, text, right) => { const td = document.createElement("td"); td.textContent = text; td.style.paddingRight = "12px"; if (right) td.align = "right"; tr.appendChild(td); };
const ms = (v) => v == null ? "–" : v.toFixed(1);
const latest = (r) => {
  if (!r) return "";
  const o = r.outputs[0];
  if (o && o.top_k) return o.top_k.map((c) => `${c.label ?? c.index} ${c.score.toFixed(2)}`).join(", ");
  const v = r.value == null ? "" : ` value ${r.value.toFixed(3)}`;
  return `#${r.seq} ${ms(r.inference_ms)} ms${v}${r.forwarded ? " → forwarded" : ""}`;
};
const ask = () => parent.postMessage({ myelin: "call", id: 1, method: "GET", path: "status" }, "*");
addEventListener("message", (e) => {
  if (!e.data || e.data.myelin !== "reply" || e.data.status !== 200) return;
  const s = JSON.parse(e.data.body);
  document.getElementById("backend").textContent = s.backend;
  document.getElementById("ortv").textContent = s.onnxruntime_version ? `(ONNX Runtime ${s.onnxruntime_version})` : "";
  const models = document.querySelector("#models tbody");
  models.replaceChildren();
  for (const m of s.models) {
    const tr = document.createElement("tr");
    cell(tr, m.name); cell(tr, m.provider);
    cell(tr, m.inputs.map((i) => `${i.name} ${i.dtype} [${i.shape.join("×")}]`).join(", "));
    cell(tr, m.runs, true); cell(tr, ms(m.median_ms), true); cell(tr, ms(m.p99_ms), true);
    models.appendChild(tr);
  }
  const pipes = document.querySelector("#pipelines tbody");
  pipes.replaceChildren();
  let err = "";
  for (const p of s.pipelines) {
    const tr = document.createElement("tr");
    cell(tr, p.key); cell(tr, p.model); cell(tr, p.frames_in, true); cell(tr, p.inferred, true);
    cell(tr, p.forwarded, true); cell(tr, p.dropped_rate + p.dropped_stale + p.dropped_bad, true);
    cell(tr, p.rate_hz.toFixed(1), true); cell(tr, latest(p.recent[0]));
    pipes.appendChild(tr);
    if (p.last_error) err = `${p.key}: ${p.last_error}`;
  }
  document.getElementById("error").textContent = err;
});
ask();
setInterval(ask, 2000);
</script>"##;
