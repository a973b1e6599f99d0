//! The dashboard panel: the interlock's state and why, the watched links, each action's progress,
//! and the re-arm button.

pub const PANEL: &str = r##"<!doctype html><meta charset="utf-8"><body style="font:13px system-ui;margin:8px">
<p style="margin:0 0 6px"><b id="state">…</b> <span id="why"></span></p>
<button id="rearm" disabled>Re-arm (permit motion)</button> <span id="answer"></span>
<table id="links" style="margin-top:6px;border-collapse:collapse"><tbody></tbody></table>
<table id="actions" style="margin-top:6px;border-collapse:collapse"><tbody></tbody></table>
<p id="save" style="color:#cf222e;margin:4px 0 0"></p>
<p style="color:#666;margin:6px 0 0">Re-arming only permits motion; it never commands it. A supplementary measure, not a certified safety function.</p>
<script>
const call = (id, method, path) => parent.postMessage({ myelin: "call", id, method, path }, "*");
const colors = { armed: "#1a7f37", tripped: "#cf222e", clearing: "#bf8700", latched: "#cf222e" };
addEventListener("message", (e) => {
  if (!e.data || e.data.myelin !== "reply") return;
  if (e.data.id === 2) {
    let text = e.data.body;
    try { const b = JSON.parse(text); text = b.error || b.note || text; } catch (_) {}
    document.getElementById("answer").textContent = text;
    call(1, "GET", "status");
    return;
  }
  if (e.data.status !== 200) return;
  const s = JSON.parse(e.data.body);
  const st = document.getElementById("state");
  st.textContent = s.stopped ? "SAFE STOP (" + s.state + ")" : "armed";
  st.style.color = colors[s.state] || "";
  const why = s.reason ? s.reason + (s.peer ? " on " + s.peer : "") + (s.rtt_ms ? ", " + Math.round(s.rtt_ms) + " ms" : "") + " · " : "";
  document.getElementById("why").textContent = why + "trips: " + s.trips + (s.rearm_required ? " · re-arm required" : "");
  document.getElementById("rearm").disabled = s.state === "armed";
  const rows = (sel, list) => {
    const tb = document.querySelector(sel + " tbody");
    tb.replaceChildren();
    for (const cells of list) {
      const tr = document.createElement("tr");
      for (const [v, color] of cells) {
        const td = document.createElement("td"); td.textContent = v; td.style.paddingRight = "12px";
        if (color) td.style.color = color;
        tr.appendChild(td);
      }
      tb.appendChild(tr);
    }
  };
  rows("#links", s.links.map((l) => [[l.peer], [l.rtt_ms == null ? "no RTT" : l.rtt_ms.toFixed(1) + " ms"], ["last answer " + Math.round(l.since_answer_ms) + " ms ago"], [l.good_for_s == null ? "" : "good for " + l.good_for_s.toFixed(1) + " s"]]));
  rows("#actions", (s.actions || []).map((a) => [
    [a.kind + " " + a.target],
    [a.pending ? "applying #" + a.generation : "applied " + (a.applied_state || "—") + " #" + (a.applied_generation ?? "—"), a.pending ? "#bf8700" : ""],
    [a.failures ? a.failures + " failures" : "no failures", a.failures ? "#cf222e" : ""],
    [a.last_error ? "last: " + a.last_error : ""],
  ]));
  document.getElementById("save").textContent = s.state_file_error ? "cannot save state to " + s.state_file + ": " + s.state_file_error : "";
});
document.getElementById("rearm").onclick = () => call(2, "POST", "rearm");
call(1, "GET", "status");
setInterval(() => call(1, "GET", "status"), 1000);
</script>"##;
