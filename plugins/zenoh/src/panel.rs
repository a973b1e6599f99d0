//! The dashboard panel: the router's zenoh connections to peers and the bridge's ROS routes,
//! refreshed through the dashboard every 2 s (the panel itself cannot reach the API).

/// The panel page; `namespace` is shown in its heading.
pub fn html(namespace: &str) -> String {
    let ns = namespace
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;");
    format!(
        r##"<!doctype html><meta charset="utf-8"><body style="font:13px system-ui;margin:8px">
<p>ROS namespace <code>{ns}</code> · router <code id="zid"></code></p>
<table id="peers" style="border-collapse:collapse"><thead><tr><th align=left>peer</th><th align=left>zenoh</th><th align=left>locator</th></tr></thead><tbody></tbody></table>
<p style="margin:8px 0 2px">Routes (<span id="nroutes">0</span>)</p>
<table id="routes" style="border-collapse:collapse"><tbody></tbody></table>
<script>
const cell = (tr, text) => {{ const td = document.createElement("td"); td.textContent = text; td.style.paddingRight = "12px"; tr.appendChild(td); }};
const ask = () => parent.postMessage({{ myelin: "call", id: 1, method: "GET", path: "status" }}, "*");
addEventListener("message", (e) => {{
  if (!e.data || e.data.myelin !== "reply" || e.data.status !== 200) return;
  const s = JSON.parse(e.data.body);
  document.getElementById("zid").textContent = s.zid;
  const peers = document.querySelector("#peers tbody");
  peers.replaceChildren();
  for (const p of s.peers) {{
    const tr = document.createElement("tr");
    cell(tr, p.name); cell(tr, p.connected ? "connected" : "connecting…"); cell(tr, p.locator);
    peers.appendChild(tr);
  }}
  const routes = document.querySelector("#routes tbody");
  routes.replaceChildren();
  for (const r of s.routes) {{
    const tr = document.createElement("tr");
    cell(tr, r.kind); cell(tr, r.ros_name || ""); cell(tr, r.key); cell(tr, r.ros_type || "");
    routes.appendChild(tr);
  }}
  document.getElementById("nroutes").textContent = s.routes.length;
}});
ask();
setInterval(ask, 2000);
</script>"##
    )
}
