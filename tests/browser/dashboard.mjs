// Drives headless Chromium through a lab node's dashboard: peers with a live RTT, events
// flowing, a plugin switched off and on from the page (checked against the API), a screenshot.
// Usage: node dashboard.mjs <dashboard URL with #token=...> <screenshot path> <plugin name>
import { chromium } from "playwright-core";

const [url, shot, plugin] = process.argv.slice(2);
const token = new URLSearchParams(new URL(url).hash.slice(1)).get("token");
const origin = new URL(url).origin;
const browser = await chromium.launch({
  executablePath: "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
const step = (what) => console.log(`dashboard: ${what}`);
async function apiState() {
  const r = await fetch(`${origin}/api/v1/plugins/${plugin}`, { headers: { Authorization: `Bearer ${token}` } });
  return (await r.json()).state;
}
async function waitApi(want) {
  const deadline = Date.now() + 20000;
  for (;;) {
    const got = await apiState();
    if (got === want) return;
    if (Date.now() > deadline) throw new Error(`API shows plugin ${plugin} ${got}, expected ${want}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}
try {
  const page = await browser.newPage({ viewport: { width: 1100, height: 700 } });
  page.on("pageerror", (e) => console.log(`page error: ${e.message}`));
  // Runs `fn` in a plugin's panel; a panel that reloads meanwhile is waited for and asked again.
  const inPanel = async (name, fn) => {
    const deadline = Date.now() + 20000;
    for (;;) {
      const frame = await (await page.waitForSelector(`section[data-panel="${name}"] iframe`, { timeout: 20000 })).contentFrame();
      try {
        if (!frame) throw new Error("panel iframe detached");
        await frame.waitForLoadState("load", { timeout: 20000 });
        return await frame.evaluate(fn);
      } catch (e) {
        const reloaded = /context was destroyed|detached|navigat/i.test(String(e));
        if (!reloaded || Date.now() > deadline) throw e;
        await new Promise((r) => setTimeout(r, 100));
      }
    }
  };
  await page.goto(url);
  // The dashboard opens on the fleet page; this test is about the node's own view.
  await page.click("#show-node");
  await page.waitForFunction(
    () => [...document.querySelectorAll("tr[data-peer] .rtt")].filter((td) => td.textContent.endsWith(" ms")).length >= 2,
    null, { timeout: 20000 });
  step("every peer shows an RTT");
  await page.waitForFunction(() => Number(document.body.dataset.events ?? 0) >= 10, null, { timeout: 20000 });
  step("live events arrive");
  const toggle = page.locator(`tr[data-plugin="${plugin}"] input.toggle`);
  await toggle.uncheck();
  await waitApi("disabled");
  await page.locator(`tr[data-plugin="${plugin}"] .state.disabled`).waitFor({ timeout: 20000 });
  step(`switched ${plugin} off; the API and the page agree`);
  await toggle.check();
  await waitApi("running");
  await page.locator(`tr[data-plugin="${plugin}"] .state.running`).waitFor({ timeout: 20000 });
  step(`switched ${plugin} on; the API and the page agree`);
  // The plugin's own panel: its button reaches the plugin's route through the dashboard.
  const frame = page.frameLocator(`section[data-panel="${plugin}"] iframe`);
  await frame.locator("#mode").waitFor({ timeout: 20000 });
  step(`${plugin} panel shown`);
  const before = await (await fetch(`${origin}/api/v1/plugins/${plugin}`, { headers: { Authorization: `Bearer ${token}` } })).json();
  // The dashboard reloads a panel when its plugin's state or restart count changes; a click
  // that lands in a panel being reloaded is lost with it, so it is repeated (20 s in all).
  const answered = frame.locator("#out").filter({ hasText: "answered 202" });
  const clickDeadline = Date.now() + 20000;
  for (;;) {
    await frame.locator("#panic").click();
    try {
      await answered.waitFor({ timeout: 3000 });
      break;
    } catch (err) {
      if (Date.now() > clickDeadline) throw err;
    }
  }
  const deadline = Date.now() + 20000;
  for (;;) {
    const now = await (await fetch(`${origin}/api/v1/plugins/${plugin}`, { headers: { Authorization: `Bearer ${token}` } })).json();
    if (now.restarts > before.restarts && now.state === "running") break;
    if (Date.now() > deadline) throw new Error(`${plugin} was not restarted after its panel's panic button: ${JSON.stringify(now)}`);
    await new Promise((r) => setTimeout(r, 100));
  }
  step(`${plugin} panicked from its panel and was restarted`);
  // A panel may call only its own plugin's routes: a path that the URL parser turns into
  // `../../api/...` (percent-encoded dots) would carry the node's token to the API.
  // The dashboard reloads a panel when its plugin restarts, so the call is retried (bounded)
  // when a reload destroys the page it ran in.
  const escape = await inPanel(plugin, () => new Promise((resolve) => {
    window.addEventListener("message", (e) => { if (e.data && e.data.id === "escape") resolve(e.data); });
    parent.postMessage({ myelin: "call", id: "escape", method: "POST", path: "%2e%2e/%2e%2e/api/v1/plugins/safety/disable" }, "*");
  }));
  if (escape.status !== 403) throw new Error(`a panel escaped its routes: ${JSON.stringify(escape)}`);
  const safetyNow = await (await fetch(`${origin}/api/v1/plugins/safety`, { headers: { Authorization: `Bearer ${token}` } })).json();
  if (!safetyNow.enabled) throw new Error(`safety was disabled through a panel: ${JSON.stringify(safetyNow)}`);
  step("a panel's call to %2e%2e/%2e%2e/api/v1/plugins/safety/disable is refused");
  // The telemetry plugin's panel: scrape URL and live figures fetched through the dashboard.
  const telemetry = page.frameLocator(`section[data-panel="telemetry"] iframe`);
  await telemetry.locator("#urls").filter({ hasText: ":9477/metrics" }).waitFor({ timeout: 20000 });
  await telemetry.locator("#figures").filter({ hasText: "load" }).waitFor({ timeout: 20000 });
  step("telemetry panel shows the scrape URL and live figures");
  // Robotics mode: robot1's router is connected to the operator's and robot2's.
  const zenoh = page.frameLocator(`section[data-panel="zenoh"] iframe`);
  for (const peer of ["operator", "robot2"]) {
    await zenoh.locator("#peers tr", { hasText: peer }).filter({ hasText: "connected" }).first().waitFor({ timeout: 30000 });
  }
  step("zenoh panel shows the operator and robot2 connected");
  // The interlock: armed on the operator link, with its re-arm button (disabled while armed).
  const safety = page.frameLocator(`section[data-panel="safety"] iframe`);
  await safety.locator("#state").filter({ hasText: /^armed$/ }).waitFor({ timeout: 30000 });
  await safety.locator("#links tr", { hasText: "operator" }).first().waitFor({ timeout: 20000 });
  if (!(await safety.locator("#rearm").isDisabled())) throw new Error("the re-arm button is enabled while armed");
  // Its actions: the twist_mux lock has applied the current (armed) generation, no failures.
  await safety.locator("#actions tr", { hasText: "ros_lock /e_stop" }).filter({ hasText: "applied armed" }).filter({ hasText: "no failures" }).first().waitFor({ timeout: 20000 });
  step("safety panel shows the interlock armed on the operator link, its lock action applied");
  // Inference at the gateway: the lab robot's orientation classifier and its camera pipeline.
  const ai = page.frameLocator(`section[data-panel="ai"] iframe`);
  await ai.locator("#backend").filter({ hasText: /^tract$/ }).waitFor({ timeout: 30000 });
  await ai.locator("#models tr", { hasText: "orientation" }).filter({ hasText: "x float32 [1×3×224×224]" }).first().waitFor({ timeout: 20000 });
  await ai.locator("#pipelines tr", { hasText: "robot1/camera/front" }).first().waitFor({ timeout: 20000 });
  step("ai panel shows the tract backend, the model and the camera pipeline");
  await page.screenshot({ path: shot });
  step(`screenshot ${shot}`);
} finally {
  await browser.close();
}
