// Drives the Apex web page in Debian's headless Chromium with playwright-core (never a
// downloaded browser). Run by crates/apex/tests/browser.rs against a real `apex serve`
// started with --template-stream-delay-ms 50; can also be run by hand:
//
//   APEX_URL=http://127.0.0.1:8000 node tests/browser/chat.test.mjs
//
// Two users in two browser contexts at once each ask a question; each page must show only
// its own run, steps and answer, and the answer must quote that user's own spend (compared
// with GET /api/usage/summary). User B's WebSocket is dropped mid-answer: the page must
// reconnect with a fresh ticket, `resume` from its last seq and show the answer exactly
// once. User A regenerates her answer (the first one stays, labelled superseded), then
// stops a slow second run. The usage view draws the user's own chart and
// takes a CSV upload. Logging out leaves nothing of the user behind. Screenshots go to
// APEX_ARTIFACTS.

import assert from 'node:assert/strict';
import { mkdirSync } from 'node:fs';
import { createServer } from 'node:http';
import { join } from 'node:path';
import { chromium } from 'playwright-core';

const BASE = process.env.APEX_URL;
const CHROMIUM = process.env.APEX_CHROMIUM || '/usr/bin/chromium';
const ARTIFACTS = process.env.APEX_ARTIFACTS || join(process.cwd(), 'browser-artifacts');
const PASSWORD = 'a browser test password';
const QUESTION = 'How can I reduce my LLM costs?';
const AGENTS = ['triage', 'data', 'optimization', 'actions', 'reporting'];
const TOOLS = ['usage_summary', 'pricing_lookup', 'savings_simulator', 'action_plan'];
const RUN_TIMEOUT = 90_000;

if (!BASE) {
  console.error('set APEX_URL to the server, e.g. http://127.0.0.1:8000');
  process.exit(2);
}
mkdirSync(ARTIFACTS, { recursive: true });

const t0 = Date.now();
const log = (...parts) => console.log(`[${((Date.now() - t0) / 1000).toFixed(1)}s]`, ...parts);
const unique = `${Date.now().toString(36)}${Math.random().toString(36).slice(2, 8)}`;

async function step(name, fn) {
  log(`▶ ${name}`);
  const value = await fn();
  log(`✔ ${name}`);
  return value;
}

/** Calls the API from inside the page with that page's own token. */
function pageApi(page, path) {
  return page.evaluate(async (p) => {
    const session = JSON.parse(sessionStorage.getItem('apex.session'));
    const response = await fetch(p, { headers: { Authorization: `Bearer ${session.access_token}` } });
    return { status: response.status, body: await response.json().catch(() => null) };
  }, path);
}

/** The total as the template writer prints it: "$123.46" (no thousands separator). */
function quotedTotal(answer) {
  const match = /costing \$([0-9]+\.[0-9]{2}) in total/.exec(answer);
  assert.ok(match, `answer quotes a total: ${answer.slice(0, 200)}`);
  return Number(match[1]);
}

async function openPage(context, user, errors) {
  const page = await context.newPage();
  page.on('pageerror', (err) => errors.push(`${user.label}: ${err.message}`));
  page.on('console', (msg) => { if (msg.type() === 'error') log(`${user.label} console: ${msg.text()}`); });
  await page.goto(BASE + '/');
  await page.waitForSelector('#auth-view:not([hidden])');
  if (user.register) {
    await page.click('#mode-register');
    await page.fill('#name', user.label);
  }
  await page.fill('#email', user.email);
  await page.fill('#password', PASSWORD);
  await page.click('#auth-submit');
  await page.waitForSelector('#app-view:not([hidden])');
  await page.waitForSelector('#conn[data-state="online"]');
  assert.equal(await page.textContent('#who'), user.email);
  return page;
}

async function ask(page, text) {
  await page.waitForSelector('#send:not([disabled])');
  const before = await page.locator('.run').evaluateAll((els) => els.map((el) => el.dataset.runId));
  await page.fill('#composer-input', text);
  await page.click('#send');
  // The new run's card: the one whose id was not on the page (a "replace" removes one).
  const card = await page.waitForFunction((known) => [...document.querySelectorAll('.run')]
    .map((el) => el.dataset.runId)
    .find((id) => !known.includes(id)), before);
  return card.jsonValue();
}

/** Every check of one finished run on one page, against that user's own data. */
async function checkCompletedRun(page, user, other, runId) {
  const card = page.locator(`.run[data-run-id="${runId}"]`);
  await card.locator('xpath=self::*[@data-status="completed"]').waitFor({ timeout: RUN_TIMEOUT });
  const run = await pageApi(page, `/api/runs/${runId}`);
  assert.equal(run.status, 200, `${user.label}'s page shows a run of their own`);
  assert.equal(run.body.status, 'completed');
  // Each stored event was applied exactly once, in order.
  assert.equal(await card.getAttribute('data-applied'), String(run.body.last_seq), 'every event applied once');
  assert.equal(await card.getAttribute('data-last-seq'), String(run.body.last_seq));

  const agents = await card.locator('.agent').evaluateAll((els) => els.map((e) => [e.dataset.agent, e.dataset.state]));
  assert.deepEqual(agents, AGENTS.map((a) => [a, 'completed']), 'each agent shown once, completed');
  assert.ok(await card.locator('.thinking').count() >= 5, 'thinking lines shown');
  assert.match(await card.locator('.agent[data-agent="data"] .agent-meta').textContent(), /^done in \d/);
  const tools = await card.locator('.tool-chip').evaluateAll((els) => els.map((e) => [e.dataset.tool, e.dataset.state]));
  assert.deepEqual(tools, TOOLS.map((t) => [t, 'ok']), 'tool chips completed');
  const chip = card.locator('.tool-chip[data-tool="usage_summary"]');
  await chip.locator('summary').click();
  const toolResult = JSON.parse(await chip.locator('.tool-result').textContent());
  assert.equal(toolResult.total_cost_usd, user.summary.total_cost_usd, 'tool result is the own summary');
  assert.equal(toolResult.total_requests, user.summary.total_requests);
  await chip.locator('summary').click(); // closed again, for a readable screenshot

  const answer = await card.locator('.answer').textContent();
  assert.ok(Math.abs(quotedTotal(answer) - user.summary.total_cost_usd) <= 0.0051,
    `${user.label}'s answer quotes their own total ${user.summary.total_cost_usd}`);
  assert.ok(!answer.includes(`$${other.summary.total_cost_usd.toFixed(2)}`), 'no trace of the other total');
  const messages = await pageApi(page, `/api/threads/${run.body.thread_id}/messages`);
  const stored = messages.body.messages.find((m) => m.role === 'assistant' && m.metadata.run_id === runId);
  assert.equal(answer, stored.content, 'the streamed answer is the stored answer, exactly once');

  const pageText = await page.locator('body').textContent();
  assert.ok(!pageText.includes(other.email), 'the other user is nowhere on the page');
  const foreign = await page.locator(`[data-run-id="${other.runId}"]`).count();
  assert.equal(foreign, 0, 'the other run is not on the page');
  assert.equal(await page.locator('.run').count(), 1, 'only its own run');
  return answer;
}

const browser = await chromium.launch({
  executablePath: CHROMIUM,
  headless: true,
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
const errors = [];
try {
  log(`chromium ${browser.version()} against ${BASE}`);
  const alice = { label: 'Alice', email: `alice-${unique}@example.com`, register: true };
  const bob = { label: 'Bob', email: `bob-${unique}@example.com`, register: false };
  await step('Bob has an account (registered over the API; he logs in through the page)', async () => {
    const response = await fetch(`${BASE}/auth/register`, {
      method: 'POST', headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify({ email: bob.email, password: PASSWORD }),
    });
    assert.equal(response.status, 201);
  });

  const viewport = { width: 1280, height: 900 };
  const contextA = await browser.newContext({ viewport });
  const contextB = await browser.newContext({ viewport });

  // Bob's WebSocket goes through a proxy that can cut it, like a network drop.
  const bobSockets = [];
  await contextB.routeWebSocket(/\/ws(\?|$)/, (ws) => {
    const server = ws.connectToServer();
    const socket = { url: ws.url(), sent: [], ws, server };
    bobSockets.push(socket);
    ws.onMessage((message) => { socket.sent.push(String(message)); server.send(message); });
  });

  const [pageA, pageB] = await step('Alice registers and Bob logs in, at the same time', () =>
    Promise.all([openPage(contextA, alice, errors), openPage(contextB, bob, errors)]));

  for (const [user, page] of [[alice, pageA], [bob, pageB]]) {
    const summary = await pageApi(page, '/api/usage/summary?days=30');
    assert.equal(summary.status, 200);
    user.summary = summary.body;
    log(`${user.label}: ${user.summary.total_requests} requests, $${user.summary.total_cost_usd}`);
    assert.ok(user.summary.total_cost_usd > 0, 'demo data gives spend');
  }
  assert.notEqual(alice.summary.total_cost_usd.toFixed(2), bob.summary.total_cost_usd.toFixed(2),
    'the two users spend differently');

  [alice.runId, bob.runId] = await step('both ask a question at the same time', () =>
    Promise.all([ask(pageA, QUESTION), ask(pageB, QUESTION)]));

  await step("Bob's network drops while his answer streams in; the page resumes", async () => {
    const answer = pageB.locator(`.run[data-run-id="${bob.runId}"] .answer`);
    await pageB.waitForFunction((id) => {
      const el = document.querySelector(`.run[data-run-id="${id}"] .answer`);
      return el && el.textContent.length > 0;
    }, bob.runId, { timeout: RUN_TIMEOUT });
    const seenBefore = Number(await pageB.locator(`.run[data-run-id="${bob.runId}"]`).getAttribute('data-last-seq'));
    const first = bobSockets[0];
    assert.equal(bobSockets.length, 1);
    await first.ws.close({ code: 4001, reason: 'simulated network drop' });
    await first.server.close();
    await pageB.waitForSelector('#conn:not([data-state="online"])', { timeout: 5000 }).catch(() => {});
    await pageB.waitForSelector('#conn[data-state="online"]', { timeout: 20000 });
    assert.ok(bobSockets.length >= 2, 'reconnected');
    const second = bobSockets[bobSockets.length - 1];
    for (const socket of bobSockets) {
      assert.match(socket.url, /\/ws\?ticket=[A-Za-z0-9_-]{20,}$/, 'authenticated with a ticket');
      assert.ok(!socket.url.includes('eyJ'), 'no JWT in the URL');
    }
    assert.notEqual(first.url, second.url, 'a fresh ticket for the new socket');
    const resume = second.sent.map((m) => JSON.parse(m)).find((f) => f.type === 'resume');
    assert.ok(resume, 'the page sent resume after reconnecting');
    assert.equal(resume.run_id, bob.runId);
    assert.ok(resume.after_seq >= seenBefore, `resume after the last seq seen (${resume.after_seq} >= ${seenBefore})`);
    log(`Bob resumed run after seq ${resume.after_seq}; answer so far ${(await answer.textContent()).length} chars`);
  });

  const [answerA, answerB] = await step('each page shows only its own steps and answer', () =>
    Promise.all([checkCompletedRun(pageA, alice, bob, alice.runId), checkCompletedRun(pageB, bob, alice, bob.runId)]));
  assert.notEqual(answerA, answerB);
  for (const page of [pageA, pageB]) {
    await page.evaluate(() => { const box = document.getElementById('messages'); box.scrollTop = box.scrollHeight; });
  }
  await pageA.screenshot({ path: join(ARTIFACTS, 'chat-alice.png'), fullPage: false });
  await pageB.screenshot({ path: join(ARTIFACTS, 'chat-bob.png'), fullPage: false });

  await step('Alice regenerates her answer: a second answer, the first kept and labelled superseded', async () => {
    const first = pageA.locator(`.run[data-run-id="${alice.runId}"]`);
    await pageA.waitForSelector('#regenerate:not([disabled])');
    await pageA.click('#regenerate');
    await pageA.waitForFunction((id) => [...document.querySelectorAll('.run')].some((e) => e.dataset.runId !== id), alice.runId);
    const runId = await pageA.locator('.run').last().getAttribute('data-run-id');
    assert.notEqual(runId, alice.runId);
    const second = pageA.locator(`.run[data-run-id="${runId}"]`);
    // While it runs: the first answer is dimmed and labelled, and there is no button.
    assert.equal(await first.locator('.superseded-label').textContent(), 'superseded');
    if ((await second.getAttribute('data-status')) === 'running') {
      assert.equal(await pageA.locator('#regenerate').count(), 0, 'no Regenerate while a run is going');
    }
    await second.locator('xpath=self::*[@data-status="completed"]').waitFor({ timeout: RUN_TIMEOUT });
    assert.ok((await second.locator('.answer').textContent()).length > 0, 'a second answer');
    assert.ok(await first.evaluate((e) => e.classList.contains('superseded')));
    assert.equal(await second.locator('.superseded-label').count(), 0, 'the new answer is current');
    await pageA.waitForSelector('#regenerate', { timeout: 5000 });
    const run = await pageApi(pageA, `/api/runs/${runId}`);
    const messages = (await pageApi(pageA, `/api/threads/${run.body.thread_id}/messages`)).body.messages;
    assert.deepEqual(messages.map((m) => [m.role, m.superseded]),
      [['user', false], ['assistant', true], ['assistant', false]], 'the question is stored once');
    assert.equal(messages[1].superseded_by, runId);
    // Opened again from history, the thread shows the same.
    await pageA.click(`.thread[data-thread-id="${run.body.thread_id}"]`);
    await pageA.waitForFunction(() => document.querySelectorAll('#messages .superseded .superseded-label').length === 1);
    assert.equal(await pageA.locator('#messages .msg.user').count(), 1);
    await pageA.screenshot({ path: join(ARTIFACTS, 'chat-alice-regenerated.png') });
  });

  await step('Alice stops a slow second run', async () => {
    const runId = await ask(pageA, 'And how could I cut spend over the last 7 days?');
    const card = pageA.locator(`.run[data-run-id="${runId}"]`);
    await pageA.waitForFunction((id) => {
      const el = document.querySelector(`.run[data-run-id="${id}"] .answer`);
      return el && el.textContent.length > 0;
    }, runId, { timeout: RUN_TIMEOUT });
    await card.locator('.stop').click();
    await card.locator('xpath=self::*[@data-status="cancelled"]').waitFor({ timeout: 20000 });
    const run = await pageApi(pageA, `/api/runs/${runId}`);
    assert.equal(run.body.status, 'cancelled');
    assert.equal(await card.locator('.pill').textContent(), 'Stopped');
    assert.equal(await card.locator('.stop').count(), 0, 'no stop button once stopped');
    assert.equal(await card.locator('.agent[data-agent="reporting"]').getAttribute('data-state'), 'stopped');
    assert.match(await card.locator('.run-error').textContent(), /stopped/);
    const partial = await card.locator('.answer').textContent();
    assert.ok(partial.length < answerA.length, 'the answer stopped part-way');
    assert.equal(await card.getAttribute('data-applied'), String(run.body.last_seq));
    await pageA.screenshot({ path: join(ARTIFACTS, 'chat-alice-stopped.png') });
  });

  await step('Alice writes into her running conversation: queue one message, replace another', async () => {
    const first = await ask(pageA, 'Which workload costs me most?');
    // While it runs the page offers the strategies; "queue" waits for that answer.
    await pageA.waitForSelector('#strategy-row:not([hidden])');
    await pageA.selectOption('#strategy', 'enqueue');
    const queued = await ask(pageA, 'And which model?');
    const cards = (id) => pageA.locator(`.run[data-run-id="${id}"]`);
    await cards(first).locator('xpath=self::*[@data-status="completed"]').waitFor({ timeout: RUN_TIMEOUT });
    await cards(queued).locator('xpath=self::*[@data-status="completed"]').waitFor({ timeout: RUN_TIMEOUT });
    const [a, b] = await Promise.all([pageApi(pageA, `/api/runs/${first}`), pageApi(pageA, `/api/runs/${queued}`)]);
    assert.ok(b.body.started_at >= a.body.finished_at, 'the queued run started after the first ended');

    // "replace": the running question and its answer leave the page and the thread.
    const replaced = await ask(pageA, 'Summarise my spend per day, please.');
    await pageA.waitForSelector('#strategy-row:not([hidden])');
    await pageA.selectOption('#strategy', 'rollback');
    const replacement = await ask(pageA, 'Summarise my spend per week instead.');
    await cards(replacement).locator('xpath=self::*[@data-status="completed"]').waitFor({ timeout: RUN_TIMEOUT });
    assert.equal(await cards(replaced).count(), 0, 'the replaced run left the page');
    const bubbles = await pageA.locator('.msg.user').allTextContents();
    assert.ok(!bubbles.some((t) => t.includes('per day')), `the replaced question left the page: ${bubbles}`);
    assert.ok(bubbles.some((t) => t.includes('per week')));
    await pageA.waitForFunction(async (id) => {
      const session = JSON.parse(sessionStorage.getItem('apex.session'));
      const r = await fetch(`/api/runs/${id}`, { headers: { Authorization: `Bearer ${session.access_token}` } });
      return r.status === 404;
    }, replaced, { timeout: 20000, polling: 250 });
    await pageA.screenshot({ path: join(ARTIFACTS, 'chat-alice-double-texting.png') });
  });

  await step('Alice asks to approve the plan first, leaves a step out and approves it on the page', async () => {
    await pageA.check('#require-approval');
    const runId = await ask(pageA, 'How can I reduce my LLM costs?');
    const card = pageA.locator(`.run[data-run-id="${runId}"]`);
    await card.locator('.approval-card button.approve').waitFor({ timeout: RUN_TIMEOUT });
    assert.equal(await card.getAttribute('data-status'), 'awaiting_approval');
    assert.equal(await card.locator('[data-agent="reporting"]').count(), 0, 'the report waits for the answer');
    const waiting = await pageApi(pageA, `/api/runs/${runId}`);
    assert.equal(waiting.body.status, 'awaiting_approval');
    const steps = waiting.body.approval.plan;
    assert.ok(steps.length >= 2, `a plan with steps: ${JSON.stringify(steps)}`);
    // Leave the last step out: what is approved is the rest, in order.
    await card.locator(`.approval-card input[data-step="${steps[steps.length - 1].order}"]`).uncheck();
    await pageA.screenshot({ path: join(ARTIFACTS, 'chat-alice-approval.png') });
    await card.locator('.approval-card button.approve').click();
    await card.locator('xpath=self::*[@data-status="completed"]').waitFor({ timeout: RUN_TIMEOUT });
    assert.equal(await card.locator('.approval-card[data-decision="edit"]').count(), 1);
    assert.equal(await card.locator('.approval-card button').count(), 0, 'the answered card is read-only');
    const done = await pageApi(pageA, `/api/runs/${runId}/events`);
    const terminal = done.body.events[done.body.events.length - 1];
    const carried = terminal.payload.result.action_plan.map((s) => s.title);
    assert.deepEqual(carried, steps.slice(0, -1).map((s) => s.title));
    assert.ok((await card.locator('.answer').textContent()).length > 0, 'the answer is shown');
    await pageA.uncheck('#require-approval');
  });

  await step("the usage view charts the user's own spend and takes a CSV upload", async () => {
    // An expired-looking access token: the page refreshes it with /auth/refresh.
    const oldRefresh = await pageA.evaluate(() => {
      const session = JSON.parse(sessionStorage.getItem('apex.session'));
      const refresh = session.refresh_token;
      session.access_token = 'not.a.valid-token';
      sessionStorage.setItem('apex.session', JSON.stringify(session));
      return refresh;
    });
    await pageA.click('#tab-usage');
    await pageA.waitForSelector('#usage-chart svg rect.bar');
    const session = await pageA.evaluate(() => JSON.parse(sessionStorage.getItem('apex.session')));
    assert.notEqual(session.access_token, 'not.a.valid-token', 'tokens were refreshed after a 401');
    assert.notEqual(session.refresh_token, oldRefresh);
    assert.equal(await pageA.textContent('#stat-total'), `$${alice.summary.total_cost_usd.toLocaleString('en-US', { minimumFractionDigits: 2, maximumFractionDigits: 2 })}`);
    const legend = await pageA.locator('#usage-legend .legend-name').allTextContents();
    assert.deepEqual([...legend].sort(), alice.summary.by_model.map((m) => m.model).sort(), 'legend: own models');
    await pageA.screenshot({ path: join(ARTIFACTS, 'usage-alice.png'), fullPage: true });
    const barModels = new Set(await pageA.locator('#usage-chart rect.bar').evaluateAll((els) => els.map((e) => e.dataset.model)));
    assert.deepEqual([...barModels].sort(), [...legend].sort());

    // A model name that looks like markup is shown as text.
    const hostile = '<img src=x onerror=alert(1)>';
    const ts = new Date(Date.now() - 3600_000).toISOString();
    const csv = 'provider,model,workload,timestamp,prompt_tokens,completion_tokens,latency_ms,status,cost_usd\n'
      + `acme,"${hostile}",csv-upload,${ts},1000,200,900,ok,4.5\n`
      + `acme,"${hostile}",csv-upload,${ts},1000,200,900,ok,0.5\n`;
    await pageA.setInputFiles('#csv-file', { name: 'usage.csv', mimeType: 'text/csv', buffer: Buffer.from(csv) });
    await pageA.click('#csv-upload');
    await pageA.waitForFunction(() => /Imported 2 rows/.test(document.getElementById('csv-status').textContent));
    await pageA.waitForFunction((name) => [...document.querySelectorAll('#usage-legend .legend-name')]
      .some((e) => e.textContent === name), hostile);
    assert.equal(await pageA.locator('#usage-legend img, #usage-chart img').count(), 0, 'markup is not parsed');
    assert.equal(await pageA.textContent('#stat-total'),
      `$${(alice.summary.total_cost_usd + 5).toLocaleString('en-US', { minimumFractionDigits: 2, maximumFractionDigits: 2 })}`);
    await pageA.waitForSelector('#usage-sources li[data-source="upload"]');
    const sources = await pageA.locator('#usage-sources li').evaluateAll((els) => els.map((e) => e.dataset.source));
    assert.ok(sources.includes('demo') && sources.includes('upload'), `the page says where the figures came from: ${sources}`);
    assert.match(await pageA.textContent('#usage-sources li[data-source="upload"]'), /\$5\.00 · 2 requests/);

    // A provider export: LiteLLM's spend log, one usable entry, uploaded twice.
    const log = JSON.stringify([
      { request_id: 'chatcmpl-page-1', spend: 0.25, prompt_tokens: 300, completion_tokens: 50, startTime: ts, model: 'gpt-4o', request_tags: ['page-export'] },
      { request_id: 'chatcmpl-page-2', spend: 0.1, startTime: ts },
    ]);
    await pageA.selectOption('#import-format', 'litellm-spend');
    for (const expected of [/Imported 1 rows .*1 skipped: entry 1: no model/, /Imported 0 rows .*1 already stored/]) {
      await pageA.setInputFiles('#csv-file', { name: 'spend.json', mimeType: 'application/json', buffer: Buffer.from(log) });
      await pageA.click('#csv-upload');
      await pageA.waitForFunction((re) => new RegExp(re).test(document.getElementById('csv-status').textContent), expected.source);
    }
    await pageA.waitForSelector('#usage-sources li[data-source="litellm-spend"]');

    // How a cost was computed: the top model's arithmetic, tokens × rate per class, adds
    // up to its spend; the hostile model's cost was sent with the upload, and says so.
    const top = alice.summary.by_model[0];
    const topItem = pageA.locator('#usage-costs > li').filter({ has: pageA.locator('.legend-name', { hasText: top.model }) }).first();
    await topItem.locator('button').click();
    await topItem.locator('.explain-total').waitFor();
    const lines = await topItem.locator('.explain li').allTextContents();
    assert.ok(lines.some((l) => /^input: [\d,]+ × \$[\d.]+ per million = \$[\d,.]+$/.test(l)), lines.join('\n'));
    const groups = await topItem.locator('.explain-group').allTextContents();
    assert.ok(groups.some((g) => /rows at builtin:/.test(g)), groups.join('\n'));
    const total = await topItem.locator('.explain-total').textContent();
    const computed = Number(/Total \$([\d,.]+) computed/.exec(total)[1].replace(/,/g, ''));
    // The LiteLLM entry above (gpt-4o, $0.25 as sent) counts too when gpt-4o is the top model.
    // Both sides are rounded to micro-dollars from sums added in different orders, so a sum
    // that lands on a half micro-dollar may round either way: one micro-dollar apart at most.
    const expected = top.cost_usd + (top.model === 'gpt-4o' ? 0.25 : 0);
    assert.ok(Math.abs(computed - expected) < 0.0000015, `${total} vs ${expected}`);
    const hostileItem = pageA.locator('#usage-costs > li').filter({ has: pageA.locator('.legend-name', { hasText: hostile }) }).first();
    await hostileItem.locator('button').click();
    await hostileItem.locator('.explain-total').waitFor();
    assert.match(await hostileItem.locator('.explain-group').first().textContent(), /2 rows with the cost their source sent: \$5\.000000/);
    assert.equal(await pageA.locator('#usage-costs img').count(), 0, 'markup is not parsed');
    await pageA.screenshot({ path: join(ARTIFACTS, 'usage-alice-after-upload.png'), fullPage: true });

    // Bob's chart has none of it.
    await pageB.click('#tab-usage');
    await pageB.waitForSelector('#usage-chart svg rect.bar');
    const bobLegend = await pageB.locator('#usage-legend .legend-name').allTextContents();
    assert.deepEqual([...bobLegend].sort(), bob.summary.by_model.map((m) => m.model).sort());
    assert.ok(!bobLegend.includes(hostile));
  });

  await step('Alice makes an API key on the page, a program reads her usage with it, then she revokes it', async () => {
    await pageA.waitForSelector('#key-form');
    await pageA.fill('#key-name', 'spreadsheet export');
    await pageA.click('#key-create');
    const key = (await pageA.locator('#key-secret').textContent()).trim();
    assert.match(key, /^apx_[0-9a-f]{48}$/);
    await pageA.waitForSelector('#key-list .session[data-key]');
    const listed = await pageA.locator('#key-list').textContent();
    assert.ok(listed.includes('spreadsheet export') && listed.includes(key.slice(0, 12)), listed);
    assert.ok(!listed.includes(key.slice(12)), 'the list never shows the key');
    const summary = await fetch(`${BASE}/api/usage/summary?days=30`, { headers: { Authorization: `Bearer ${key}` } });
    assert.equal(summary.status, 200);
    assert.equal((await summary.json()).total_requests, alice.summary.total_requests + 3, "Alice's own rows (two uploaded, one imported)");
    const threads = await fetch(`${BASE}/api/threads`, { headers: { Authorization: `Bearer ${key}` } });
    assert.equal(threads.status, 403, 'a usage key cannot read conversations');
    await pageA.screenshot({ path: join(ARTIFACTS, 'keys-alice.png'), fullPage: true });
    await pageA.locator('#key-list .session[data-key] button').click();
    await pageA.waitForFunction(() => document.querySelectorAll('#key-list .session[data-key]').length === 0);
    const after = await fetch(`${BASE}/api/usage/summary`, { headers: { Authorization: `Bearer ${key}` } });
    assert.equal(after.status, 401, 'a revoked key is dead');
  });

  await step('Alice sets a budget on the page; it is listed with what it spent, then deleted', async () => {
    await pageA.waitForSelector('#budget-form');
    await pageA.fill('#budget-model', 'gpt-4o');
    await pageA.fill('#budget-limit', '12.5');
    await pageA.selectOption('#budget-period', 'rolling_days:7');
    await pageA.click('#budget-create');
    await pageA.waitForSelector('#budget-list .session[data-budget]');
    const listed = await pageA.locator('#budget-list .session[data-budget]').textContent();
    assert.match(listed, /model gpt-4o.*\$12\.50 the last 7 days · \$0\.0000 spent \(0%\)/, listed);
    const budgets = await (await fetch(`${BASE}/api/budgets`, {
      headers: { Authorization: `Bearer ${await pageA.evaluate(() => JSON.parse(sessionStorage.getItem('apex.session')).access_token)}` },
    })).json();
    assert.deepEqual(budgets.map((b) => [b.scope, b.scope_id, b.limit_usd, b.period, b.days]), [['model', 'gpt-4o', 12.5, 'rolling_days', 7]]);
    await pageA.screenshot({ path: join(ARTIFACTS, 'budgets-alice.png'), fullPage: true });
    await pageA.locator('#budget-list .session[data-budget] button').click();
    await pageA.waitForFunction(() => document.querySelectorAll('#budget-list .session[data-budget]').length === 0);
  });

  await step('Alice adds a webhook and an alert: it is raised at once, explained by a run, posted signed, and logged', async () => {
    // A receiver on loopback that takes every message.
    const received = [];
    const receiver = createServer((req, res) => {
      let body = '';
      req.on('data', (chunk) => { body += chunk; });
      req.on('end', () => { received.push({ headers: req.headers, body }); res.writeHead(204).end(); });
    });
    await new Promise((resolve) => receiver.listen(0, '127.0.0.1', resolve));
    try {
      await pageA.fill('#webhook-url', `http://127.0.0.1:${receiver.address().port}/hook`);
      await pageA.click('#webhook-create');
      await pageA.waitForSelector('#webhook-secret:not([hidden])');
      assert.match(await pageA.locator('#webhook-secret').textContent(), /whsec_/);
      await pageA.waitForSelector('#webhook-list .session[data-webhook]');
      // Alert when this month's spend reaches a cent: the demo data has spent more.
      await pageA.selectOption('#alert-kind', 'spend_over');
      await pageA.fill('#alert-amount', '0.01');
      await pageA.selectOption('#alert-every', 'hour');
      await pageA.click('#alert-create');
      await pageA.waitForSelector('#alert-rule-list .session[data-rule]');
      await pageA.waitForSelector('#alert-list .session[data-alert] button', { timeout: 15_000 });
      assert.match(await pageA.locator('#alert-list .session[data-alert]').first().textContent(), /this month reached \$/);
      for (let i = 0; i < 100 && received.length === 0; i += 1) await new Promise((r) => setTimeout(r, 100));
      assert.equal(received.length, 1, 'one message at the webhook');
      const message = JSON.parse(received[0].body);
      assert.equal(message.type, 'alert.fired');
      assert.match(received[0].headers['webhook-signature'], /^v1,/);
      await pageA.locator('#webhook-list .session[data-webhook] button', { hasText: 'Delivery log' }).click();
      await pageA.waitForSelector('#webhook-list .delivery[data-status="delivered"]');
      await pageA.screenshot({ path: join(ARTIFACTS, 'alerts-alice.png'), fullPage: true });
      // "Why?" opens the thread of the run that explains the alert.
      await pageA.locator('#alert-list .session[data-alert] button').first().click();
      await pageA.waitForSelector('#chat-view:not([hidden])');
      await pageA.waitForFunction(() => document.querySelector('#messages').textContent.includes('alert threshold'), null, { timeout: RUN_TIMEOUT });
      await pageA.click('#tab-usage');
      await pageA.locator('#alert-rule-list .session[data-rule] button').click();
      await pageA.waitForFunction(() => document.querySelectorAll('#alert-rule-list .session[data-rule]').length === 0);
    } finally {
      receiver.close();
    }
  });

  await step('Alice makes a team; as its owner she sees its members with their usage totals', async () => {
    await pageA.fill('#team-name', 'Platform');
    await pageA.click('#team-create');
    await pageA.waitForSelector('#team-list .session[data-team]');
    assert.match(await pageA.locator('#team-list .session[data-team]').textContent(), /Platform · owner · 1 member/);
    await pageA.locator('#team-list .session[data-team] button', { hasText: 'Members' }).click();
    await pageA.waitForSelector('#team-list .member[data-member]');
    assert.match(await pageA.locator('#team-list .member[data-member]').textContent(), /\(owner\).*\$[\d,.]+ over 30 days/);
  });

  await step('Bob logs out: his token is revoked and nothing of his stays on the page', async () => {
    const token = await pageB.evaluate(() => JSON.parse(sessionStorage.getItem('apex.session')).access_token);
    await pageB.click('#logout');
    await pageB.waitForSelector('#auth-view:not([hidden])');
    assert.equal(await pageB.evaluate(() => sessionStorage.getItem('apex.session')), null);
    for (const id of ['#thread-list', '#messages', '#usage-chart', '#usage-legend', '#who']) {
      assert.equal(await pageB.locator(id).textContent(), '', `${id} emptied`);
    }
    const me = await fetch(`${BASE}/auth/me`, { headers: { Authorization: `Bearer ${token}` } });
    assert.equal(me.status, 401);
  });

  await step("Alice sees where she is logged in, ends another session, then logs out everywhere", async () => {
    // A second session of Alice's, as a phone would have.
    const phoneLogin = await fetch(`${BASE}/auth/login`, {
      method: 'POST',
      headers: { 'Content-Type': 'application/json', 'User-Agent': 'Alice phone' },
      body: JSON.stringify({ email: alice.email, password: PASSWORD }),
    });
    assert.equal(phoneLogin.status, 200);
    const phone = await phoneLogin.json();
    await pageA.click('#tab-chat');
    await pageA.click('#tab-usage');
    await pageA.waitForFunction(() => document.querySelectorAll('#session-list .session').length >= 2);
    const labels = await pageA.locator('#session-list .session-label').allTextContents();
    assert.ok(labels.includes('This browser'), `${labels}`);
    await pageA.screenshot({ path: join(ARTIFACTS, 'sessions-alice.png'), fullPage: true });
    const before = await pageA.locator('#session-list .session').count();
    await pageA.locator('#session-list .session button').first().click();
    await pageA.waitForFunction((n) => document.querySelectorAll('#session-list .session').length === n - 1, before);
    const me = (token) => fetch(`${BASE}/auth/me`, { headers: { Authorization: `Bearer ${token}` } });
    // The page ended one of the other sessions; after "log out everywhere" every one is over.
    const token = await pageA.evaluate(() => JSON.parse(sessionStorage.getItem('apex.session')).access_token);
    await pageA.click('#logout-all');
    await pageA.waitForSelector('#auth-view:not([hidden])');
    assert.equal((await me(token)).status, 401);
    assert.equal((await me(phone.access_token)).status, 401);
  });

  assert.deepEqual(errors, [], 'no script errors on the pages');
  log(`screenshots in ${ARTIFACTS}`);
  console.log('BROWSER TEST OK: every check passed');
} catch (err) {
  for (const [i, page] of browser.contexts().flatMap((c) => c.pages()).entries()) {
    await page.screenshot({ path: join(ARTIFACTS, `failure-${i}.png`), fullPage: true }).catch(() => {});
  }
  console.error(err);
  if (errors.length) console.error('page errors:', errors);
  process.exitCode = 1;
} finally {
  await browser.close();
}
