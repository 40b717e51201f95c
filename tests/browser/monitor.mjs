// Drives the dashboard in headless Chromium (Debian's, through playwright-core):
//   node monitor.mjs <url> <worker hostname> <dead-letter task id> <screenshot path> <progress task id>
// Checks that the worker and its task counts appear, that the running progress task shows a
// progress bar, retries the dead letter from the page, and saves a screenshot. Exits non-zero (with the reason) on any failure.
import { chromium } from "playwright-core";

const [url, host, deadId, shot, progressId] = process.argv.slice(2);
const browser = await chromium.launch({ executablePath: process.env.CHROMIUM || "/usr/bin/chromium", args: ["--no-sandbox"] });
try {
  const page = await browser.newPage({ viewport: { width: 1400, height: 1000 } });
  // The page runs under a strict Content-Security-Policy: anything it blocks is a failure.
  const blocked = [];
  page.on("console", (m) => { if (/Content Security Policy/i.test(m.text())) blocked.push(m.text()); });
  await page.goto(url);
  const worker = page.locator("tr.worker", { hasText: host });
  await worker.waitFor({ timeout: 20000 });
  await page.waitForFunction((h) => {
    const row = [...document.querySelectorAll("tr.worker")].find((r) => r.textContent.includes(h));
    return row && Number(row.querySelector(".processed").textContent) >= 5;
  }, host, { timeout: 20000 });
  // The running task's PROGRESS reports show as a bar that moves.
  const bar = page.locator(`tr.task[data-id="${progressId}"] progress.task-progress`);
  await bar.waitFor({ timeout: 20000 });
  const first = Number(await bar.getAttribute("value"));
  await page.waitForFunction(([id, v]) => {
    const b = document.querySelector(`tr.task[data-id="${id}"] progress.task-progress`);
    return b && Number(b.value) > v && Number(b.max) === 100;
  }, [progressId, first], { timeout: 20000 });
  const tasks = await page.locator("tr.task").count();
  if (tasks < 5) throw new Error(`expected at least 5 tasks listed, saw ${tasks}`);
  await page.getByRole("button", { name: "dead letters" }).first().click();
  const dead = page.locator(`tr.dead-letter[data-id="${deadId}"]`);
  await dead.waitFor({ timeout: 20000 });
  await page.screenshot({ path: shot, fullPage: true });
  await dead.locator("button.retry").click();
  // Retried: the task is received again (and, still bad, dead-lettered again by the worker).
  await page.locator(`tr.task[data-id="${deadId}"]`).click();
  await page.waitForFunction(() => (document.getElementById("detail").textContent.match(/task-received/g) || []).length >= 2, null, { timeout: 20000 });
  if (blocked.length) throw new Error(`blocked by the page's CSP: ${blocked.join("; ")}`);
  console.log(JSON.stringify({ ok: true, tasks }));
} finally {
  await browser.close();
}
