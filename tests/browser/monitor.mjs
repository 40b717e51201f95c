// Drives the dashboard in headless Chromium (Debian's, through playwright-core), one step per run:
//   node monitor.mjs live <url> <worker hostname> <progress task id> <screenshot>
//     the worker and its task counts appear, the running progress task's bar moves;
//   node monitor.mjs pause <url>
//     the queue `celery` is paused from its button;
//   node monitor.mjs resume <url> <task id>
//     the task sent while paused waits on `celery` (the page shows it waiting), then resuming from
//     the button runs it;
//   node monitor.mjs dead <url> <filter> <retried id> <kept id> <screenshot>
//     both dead letters are listed, "retry matching" with the filter retries only the first (it is
//     received again), the other stays;
//   node monitor.mjs history <url> <argument text> <count> <failed ids, comma-separated> <screenshot>
//     (after a monitor restart) the history search finds <count> tasks by argument text over two
//     pages (20 a page) with the pager, and the failed ones by state.
// Exits non-zero (with the reason) on any failure, and on anything the page's CSP blocked.
import { chromium } from "playwright-core";

// The row of queue `celery`.
function celeryRow(page) {
  return page.locator("#queues tr", { has: page.locator("td:first-child", { hasText: /^celery$/ }) });
}

// Clicks the queue `celery`'s `action` button and checks that the control request succeeded (the
// test checks in the worker's log that it was told).
async function queueButton(page, action) {
  const answer = page.waitForResponse((r) => r.url().includes(`/api/queue/celery/${action}`), T);
  await celeryRow(page).locator(`button.${action}`).click();
  const r = await answer;
  if (!r.ok()) throw new Error(`${action}: ${r.status()}`);
  return r.status();
}

const steps = {
  async live(page, host, progressId, shot) {
    await page.locator("tr.worker", { hasText: host }).waitFor(T);
    await page.waitForFunction((h) => {
      const row = [...document.querySelectorAll("tr.worker")].find((r) => r.textContent.includes(h));
      return row && Number(row.querySelector(".processed").textContent) >= 5;
    }, host, T);
    // The running task's PROGRESS reports show as a bar that moves.
    const bar = page.locator(`tr.task[data-id="${progressId}"] progress.task-progress`);
    await bar.waitFor(T);
    const first = Number(await bar.getAttribute("value"));
    await page.waitForFunction(([id, v]) => {
      const b = document.querySelector(`tr.task[data-id="${id}"] progress.task-progress`);
      return b && Number(b.value) > v && Number(b.max) === 100;
    }, [progressId, first], T);
    const tasks = await page.locator("tr.task").count();
    if (tasks < 5) throw new Error(`expected at least 5 tasks listed, saw ${tasks}`);
    await page.screenshot({ path: shot, fullPage: true });
    return { tasks };
  },

  async pause(page) {
    return { status: await queueButton(page, "pause") };
  },

  async resume(page, waitingId) {
    // Paused: the task sent meanwhile waits on the queue, and the page shows it.
    await page.waitForFunction(() => {
      const row = [...document.querySelectorAll("#queues tr")].find((r) => r.cells[0]?.textContent === "celery");
      return row && Number(row.cells[1].textContent) >= 1;
    }, null, T);
    const status = await queueButton(page, "resume");
    await page.locator(`tr.task[data-id="${waitingId}"] td.SUCCESS`).waitFor(T);
    return { status };
  },

  async dead(page, filter, retriedId, keptId, shot) {
    await celeryRow(page).locator("button", { hasText: "dead letters" }).click();
    const retried = page.locator(`tr.dead-letter[data-id="${retriedId}"]`);
    const kept = page.locator(`tr.dead-letter[data-id="${keptId}"]`);
    await retried.waitFor(T);
    await kept.waitFor(T);
    await page.locator("#dead-filter").fill(filter);
    await page.locator("button.retry-all").click();
    await page.locator("#dead-bulk", { hasText: "retry: 1 done" }).waitFor(T);
    await page.locator("#dead").screenshot({ path: shot });
    // Retried: the task is received again (and, still bad, dead-lettered again by the worker);
    // the other one was not touched.
    await page.locator(`tr.task[data-id="${retriedId}"]`).click();
    await page.waitForFunction(() => (document.getElementById("detail").textContent.match(/task-received/g) || []).length >= 2, null, T);
    await kept.waitFor(T);
    await page.locator(`tr.task[data-id="${keptId}"]`).click();
    await page.locator("#detail", { hasText: keptId }).waitFor(T);
    const received = (await page.locator("#detail").textContent()).match(/task-received/g) || [];
    if (received.length !== 1) throw new Error(`the dead letter the filter did not match was received ${received.length} times`);
    return {};
  },

  async history(page, text, count, failed, shot) {
    const want = Number(count);
    // Read back at start: the live list shows the tasks of the monitor that ran before.
    await page.waitForFunction((n) => document.querySelectorAll("tr.task").length >= n, want, T);
    const rows = page.locator("#history tr.history-task");
    const ids = async () => (await rows.evaluateAll((trs) => trs.map((tr) => tr.dataset.id)));
    await page.locator("#h-text").fill(text);
    await page.locator("#h-search").click();
    await page.waitForFunction((t) => document.querySelectorAll("#history tr.history-task").length === 20 &&
      [...document.querySelectorAll("#history tr.history-task")].every((tr) => tr.textContent.includes(t)), text, T);
    const first = await ids();
    await page.locator("section:has(#history-form)").screenshot({ path: shot });
    await page.locator("#h-older").click();
    await page.waitForFunction((n) => document.querySelectorAll("#history tr.history-task").length === n &&
      document.getElementById("h-page").textContent === "page 2", want - 20, T);
    const second = await ids();
    if (!(await page.locator("#h-older").isDisabled())) throw new Error("an older page after the last one");
    const all = new Set([...first, ...second]);
    if (all.size !== want) throw new Error(`${all.size} distinct tasks over two pages, expected ${want}`);
    await page.locator("#h-newer").click();
    await page.waitForFunction(() => document.getElementById("h-page").textContent === "page 1", null, T);
    // By state: the failed ones only.
    await page.locator("#h-text").fill("");
    await page.locator("#h-state").selectOption("FAILURE");
    await page.locator("#h-search").click();
    const wantFailed = failed.split(",").sort();
    await page.waitForFunction((w) => {
      const got = [...document.querySelectorAll("#history tr.history-task")].map((tr) => tr.dataset.id).sort();
      return JSON.stringify(got) === JSON.stringify(w);
    }, wantFailed, T);
    return { pages: [first.length, second.length] };
  },
};

const [step, url, ...args] = process.argv.slice(2);
const T = { timeout: 20000 };
const browser = await chromium.launch({ executablePath: process.env.CHROMIUM || "/usr/bin/chromium", args: ["--no-sandbox"] });
try {
  const page = await browser.newPage({ viewport: { width: 1400, height: 1000 } });
  // The page runs under a strict Content-Security-Policy: anything it blocks is a failure.
  const blocked = [];
  page.on("console", (m) => { if (/Content Security Policy/i.test(m.text())) blocked.push(m.text()); });
  await page.goto(url);
  const out = await steps[step](page, ...args);
  if (blocked.length) throw new Error(`blocked by the page's CSP: ${blocked.join("; ")}`);
  console.log(JSON.stringify({ ok: true, step, ...out }));
} finally {
  await browser.close();
}
