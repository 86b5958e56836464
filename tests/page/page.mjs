// The page at `/` in a real browser (Debian's Chromium, headless, driven by
// playwright-core): it loads, draws a chart per demo sensor, updates, and shows its
// error state once the server stops. Screenshots go to OUT_DIR.
//
//   node tests/page/page.mjs BASE_URL SERVER_PID OUT_DIR
import { createRequire } from "node:module";

// playwright-core is installed by scripts/page-test.sh into PLAYWRIGHT_PREFIX.
const { chromium } = createRequire(`${process.env.PLAYWRIGHT_PREFIX}/package.json`)("playwright-core");

const [base, serverPid, outDir] = process.argv.slice(2);
const sensors = ["client1-temperature", "client2-humidity"];
const fail = (why) => { console.error(`page test: ${why}`); process.exit(1); };

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  // As root (CI) Chromium refuses to start with its sandbox.
  args: ["--no-sandbox"],
});
try {
  const page = await browser.newPage({ viewport: { width: 1100, height: 700 } });
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  const requests = [];
  page.on("request", (r) => requests.push(r.url()));
  await page.goto(`${base}/`, { timeout: 30000 });

  for (const id of sensors) {
    await page.waitForSelector(`[data-sensor="${id}"]`, { timeout: 30000 });
  }
  // A chart is drawn: its canvas holds non-blank pixels.
  const drawn = await page.evaluate(() =>
    [...document.querySelectorAll(".sensor canvas")].map((c) => {
      const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
      let ink = 0;
      for (let i = 3; i < d.length; i += 4) if (d[i] > 0) ink++;
      return ink;
    }));
  if (drawn.length < 2 || drawn.some((ink) => ink < 100)) fail(`charts not drawn: ${drawn}`);

  // It updates: the stored counts shown grow.
  const stored = () => page.evaluate((ids) => ids.map((id) =>
    Number(document.querySelector(`[data-sensor="${id}"] .facts`).textContent
      .match(/(\d+) stored/)[1])), sensors);
  const first = await stored();
  await page.waitForFunction(([ids, before]) => ids.every((id, i) => {
    const m = document.querySelector(`[data-sensor="${id}"] .facts`).textContent.match(/(\d+) stored/);
    return m && Number(m[1]) > before[i];
  }), [sensors, first], { timeout: 30000 });
  const readings = await page.textContent("#readings");
  if (!/\d+ ok/.test(readings)) fail(`counts not shown: ${readings}`);
  await page.screenshot({ path: `${outDir}/page.png`, fullPage: true });

  // Nothing but the server itself was asked for.
  const foreign = requests.filter((u) => !u.startsWith(base));
  if (foreign.length) fail(`requests elsewhere: ${foreign}`);

  // The server stops: the page says so, and keeps what it drew.
  process.kill(Number(serverPid), "SIGTERM");
  await page.waitForSelector("#error", { state: "visible", timeout: 30000 });
  const message = await page.textContent("#error");
  if (!message.includes("does not answer")) fail(`error state says: ${message}`);
  await page.screenshot({ path: `${outDir}/page-server-down.png`, fullPage: true });
  if (errors.length) fail(`script errors: ${errors}`);
  console.log(`page test: charts for ${sensors.join(", ")} drawn and updating; ` +
    `error state shown after the stop; screenshots in ${outDir}`);
} finally {
  await browser.close();
}
