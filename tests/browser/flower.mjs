// Loads Flower's page of one worker in headless Chromium (Debian's, through playwright-core):
//   node flower.mjs <url> <worker name> <screenshot path>
// Checks that the page is Flower's worker page for that worker (not an error page) and saves a
// screenshot. Exits non-zero (with the reason) on any failure.
import { chromium } from "playwright-core";

const [url, name, shot] = process.argv.slice(2);
const browser = await chromium.launch({ executablePath: process.env.CHROMIUM || "/usr/bin/chromium", args: ["--no-sandbox"] });
try {
  const page = await browser.newPage({ viewport: { width: 1400, height: 900 } });
  const response = await page.goto(url);
  if (!response || response.status() !== 200) throw new Error(`GET ${url}: HTTP ${response && response.status()}`);
  await page.locator("#workername", { hasText: name }).waitFor({ timeout: 20000 });
  const text = await page.locator("body").textContent();
  if (/Traceback|Internal Server Error|Unknown worker|Unable to get stats/.test(text)) {
    throw new Error(`an error page:\n${text.slice(0, 2000)}`);
  }
  for (const section of ["Worker pool options", "Pool controls"]) {
    if (!text.includes(section)) throw new Error(`no "${section}" on the page:\n${text.slice(0, 2000)}`);
  }
  await page.screenshot({ path: shot });
  console.log(`saved ${shot}`);
} finally {
  await browser.close();
}
