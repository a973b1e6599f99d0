// Drives headless Chromium through the operator's fleet page as a user of the lab host would:
// every robot listed with its interlock, one video tile per camera with frames decoding, a trip
// of robot1's interlock (its link probes dropped with nftables in its namespace) shown within
// 2 s, then re-armed from the page. Fails on any console error. Keeps a screenshot.
// Then robot1's own dashboard: its fleet view limited to what a robot may see, and its video
// panel with one tile for its own camera and one for robot2's, both decoding.
// Usage: node fleet.mjs <fleet URL with #token=...> <screenshot> <robot1 namespace> <its TUN>
//        <robot1's dashboard URL> <robot>...
import { chromium } from "playwright-core";
import { execFileSync } from "node:child_process";

const [url, shot, robotNs, tun, robotUrl, ...robots] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run", "--autoplay-policy=no-user-gesture-required",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
const step = (what) => console.log(`fleet: ${what}`);
const problems = [];
const cut = (on) => {
  const nft = (args) => execFileSync("ip", ["netns", "exec", robotNs, "nft", ...args], { stdio: "pipe" });
  if (on) {
    nft(["add", "table", "inet", "fleet_test"]);
    nft(["add", "chain", "inet", "fleet_test", "input", "{ type filter hook input priority -10 ; }"]);
    // Only the link probes (UDP 51821 on the overlay): the interlock hears nothing, while the
    // operator still reaches robot1's API to see it.
    nft(["add", "rule", "inet", "fleet_test", "input", "iifname", tun, "udp", "dport", "51821", "drop"]);
    nft(["add", "rule", "inet", "fleet_test", "input", "iifname", tun, "udp", "sport", "51821", "drop"]);
  } else {
    nft(["delete", "table", "inet", "fleet_test"]);
  }
};
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  page.on("pageerror", (e) => problems.push(`page error: ${e.message}`));
  page.on("console", (m) => { if (m.type() === "error") problems.push(`console error: ${m.text()}`); });
  page.on("dialog", (d) => d.accept());
  page.on("response", (r) => { if (r.status() >= 400) problems.push(`HTTP ${r.status()} for ${r.request().method()} ${r.url()}`); });
  const opened = Date.now();
  await page.goto(url);
  await page.waitForSelector("body[data-fleet-ready]", { timeout: 20000 });
  for (const r of robots) {
    await page.locator(`.card[data-member="${r}"] .interlock .badge[data-state]`).first().waitFor({ timeout: 20000 });
  }
  step(`fleet page lists ${robots.length} robots with their interlock in ${((Date.now() - opened) / 1000).toFixed(1)} s`);
  try {
    await page.waitForFunction((names) => names.every((n) =>
      document.querySelector(`.card[data-member="${n}"] .badge[data-state="armed"]`)), robots, { timeout: 60000, polling: 100 });
  } catch (err) {
    // What each robot's card says instead (its interlock state and reason), so a failure on
    // a busy machine can be read.
    const cards = await page.evaluate((names) => names.map((n) =>
      `${n}: ${document.querySelector(`.card[data-member="${n}"] .interlock`)?.textContent?.replace(/\s+/g, " ").trim()}`), robots)
      .catch((e) => [`unreadable: ${e.message}`]);
    throw new Error(`not every robot armed in 60 s (${err.message}): ${cards.join("; ")}`);
  }
  step("every robot armed");

  // Video: one tile per camera, and its frames advance.
  const cameras = robots.map((r) => `${r}/front`);
  await page.waitForFunction((keys) => keys.every((k) => document.querySelectorAll(`video[data-stream="${k}"]`).length === 1), cameras, { timeout: 20000 });
  await page.waitForFunction((keys) => keys.every((k) => {
    const v = document.querySelector(`video[data-stream="${k}"]`);
    return v && v.currentTime > 1;
  }), cameras, { timeout: 30000 });
  const tiles = await page.$$eval("video[data-stream]", (vs) => vs.map((v) => `${v.dataset.stream} ${v.currentTime.toFixed(1)} s ${v.videoWidth}x${v.videoHeight}`));
  const keys = await page.$$eval("video[data-stream]", (vs) => vs.map((v) => v.dataset.stream));
  if (new Set(keys).size !== keys.length) throw new Error(`a stream has two tiles: ${keys.join(", ")}`);
  step(`one tile per stream, playing: ${tiles.join("; ")}`);

  // A trip: robot1 stops hearing the operator.
  const robot1 = page.locator(`.card[data-member="${robots[0]}"]`);
  cut(true);
  const cutAt = Date.now();
  await robot1.locator('.badge[data-state="tripped"]').waitFor({ timeout: 10000 });
  const shown = (Date.now() - cutAt) / 1000;
  step(`robot1's trip shown on the fleet page ${shown.toFixed(2)} s after its link was cut`);
  if (shown > 2.5) throw new Error(`the trip took ${shown} s to show (budget: the 0.5 s heartbeat timeout + 2 s)`);
  await page.locator("#timeline li[data-kind=trip]", { hasText: robots[0] }).first().waitFor({ timeout: 5000 });
  step("the timeline has the trip");
  cut(false);
  await robot1.locator('.badge[data-state="latched"]').waitFor({ timeout: 30000 });
  step("link back: robot1 latched, waiting for a re-arm");
  await robot1.locator("button.rearm:not([disabled])").click();
  await robot1.locator('.badge[data-state="armed"]').waitFor({ timeout: 10000 });
  await page.locator("#timeline li[data-kind=rearm]", { hasText: robots[0] }).first().waitFor({ timeout: 5000 });
  const rearmed = await page.locator("#timeline li[data-kind=rearm]").first().textContent();
  step(`re-armed from the page: ${rearmed}`);

  // Panels share the dashboard's look and never scroll sideways.
  await page.click("#show-node");
  await page.locator('section[data-panel="telemetry"] iframe').waitFor({ timeout: 20000 });
  // The frames are sandboxed (no same-origin access), so each is asked from inside.
  await page.waitForFunction(() => document.querySelectorAll("section[data-panel] iframe").length >= 3, null, { timeout: 20000 });
  const wide = [];
  for (const frame of page.frames().filter((f) => f.parentFrame())) {
    await frame.waitForLoadState("load");
    const [scroll, client, background] = await frame.evaluate(() => [document.documentElement.scrollWidth,
      document.documentElement.clientWidth, getComputedStyle(document.body).backgroundColor]);
    if (scroll > client + 1) wide.push(`${frame.name() || frame.url()} (${scroll} > ${client})`);
    if (background === "rgb(255, 255, 255)") wide.push(`${frame.url()} has a white background`);
  }
  if (wide.length) throw new Error(`panels off the theme: ${wide.join(", ")}`);
  step("node view: panels themed, none wider than its frame");
  await page.click("#show-fleet");
  await page.screenshot({ path: shot });
  step(`screenshot ${shot}`);
  if (problems.length) throw new Error(`the page logged errors:\n${problems.join("\n")}`);
  step("no console errors");
  await page.close();

  const own = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  own.on("pageerror", (e) => problems.push(`robot1 page error: ${e.message}`));
  own.on("console", (m) => { if (m.type() === "error") problems.push(`robot1 console error: ${m.text()}`); });
  await own.goto(robotUrl);
  await own.waitForSelector("body[data-fleet-ready]", { timeout: 20000 });
  const other = own.locator(`.card[data-member="${robots[1]}"] .unreachable-reason`);
  await other.filter({ hasText: "HTTP 403" }).waitFor({ timeout: 20000 });
  step(`robot1's fleet view: ${await other.textContent()}`);
  await own.click("#show-node");
  const panel = own.frameLocator('section[data-panel="webrtc"] iframe');
  for (const key of robots.map((r) => `${r}/front`)) {
    const stats = panel.locator(`.stats[data-stream="${key}"]`);
    await stats.waitFor({ timeout: 30000 });
    const deadline = Date.now() + 30000;
    while (Number((await stats.getAttribute("data-frames-decoded")) ?? 0) === 0) {
      if (Date.now() > deadline) throw new Error(`robot1's panel decodes nothing of ${key}: ${await stats.textContent()}`);
      await new Promise((r) => setTimeout(r, 200));
    }
  }
  const panelKeys = await panel.locator(".stats[data-stream]").evaluateAll((all) => all.map((e) => e.dataset.stream));
  if (new Set(panelKeys).size !== panelKeys.length || panelKeys.length !== robots.length) {
    throw new Error(`robot1's video panel tiles: ${panelKeys.join(", ")}`);
  }
  step(`robot1's video panel: one decoding tile each for ${panelKeys.join(", ")}`);
  if (problems.length) throw new Error(`robot1's page logged errors:\n${problems.join("\n")}`);
  step("no console errors on robot1's page");
} finally {
  try { cut(false); } catch { /* not cut, or removed already */ }
  await browser.close();
}
