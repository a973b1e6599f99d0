// Opens a node's dashboard in headless Chromium and waits until its webrtc panel decodes a
// peer's stream (framesDecoded > 0 from the panel's getStats()); keeps a screenshot.
// Usage: node video.mjs <dashboard URL> <screenshot path> <peer/stream>
import { chromium } from "playwright-core";

const [url, shot, key] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run", "--autoplay-policy=no-user-gesture-required",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
try {
  const page = await browser.newPage({ viewport: { width: 1100, height: 900 } });
  page.on("pageerror", (e) => console.log(`page error: ${e.message}`));
  await page.goto(url);
  // The dashboard opens on the fleet page; this test is about the node's own view.
  await page.click("#show-node");
  const panel = page.frameLocator(`section[data-panel="webrtc"] iframe`);
  const stats = panel.locator(`.stats[data-stream="${key}"]`);
  await stats.waitFor({ timeout: 30000 });
  const deadline = Date.now() + 30000;
  for (;;) {
    const frames = Number((await stats.getAttribute("data-frames-decoded")) ?? 0);
    if (frames > 0) {
      console.log(`video panel: ${await stats.textContent()}`);
      console.log(`framesDecoded ${frames}`);
      break;
    }
    if (Date.now() > deadline) throw new Error(`no decoded frames for ${key}: ${await stats.textContent()}`);
    await new Promise((r) => setTimeout(r, 200));
  }
  await page.screenshot({ path: shot });
  console.log(`screenshot ${shot}`);
} finally {
  await browser.close();
}
