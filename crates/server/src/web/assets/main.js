// The page: log in or register, the thread list, the chat with live runs, the usage view.

import { api, authenticate, loadSession, logout } from './api.js';
import { $, h, clear } from './dom.js';
import { Connection } from './socket.js';
import { RunView, isTerminal } from './run.js';
import { UsageView } from './usage.js';
import { loadBudgets, createBudget } from './budgets.js';
import {
  loadAlerts, createAlertRule, loadWebhooks, createWebhook, loadTeams, createOrJoinTeam,
} from './alerts.js';

const SUGGESTIONS = [
  'How can I reduce my LLM costs?',
  'Which model costs me the most this week?',
  'How is my latency over the last 14 days?',
];
// error_message codes that answer a message we sent to start a run.
const START_ERRORS = new Set(['VALIDATION_ERROR', 'THREAD_NOT_FOUND', 'SERVER_SHUTTING_DOWN',
  'TOO_MANY_RUNS', 'THREAD_BUSY', 'RATE_LIMITED', 'INTERNAL_ERROR', 'JSON_PARSE_ERROR']);
const TERMINAL_STATUSES = new Set(['completed', 'failed', 'cancelled', 'timed_out', 'interrupted']);

const state = {
  connection: null,
  usage: null,
  threads: [],
  threadId: null,   // the thread shown; null for a new conversation
  runs: new Map(),  // run_id -> RunView: every run this page has seen, with its last seq
  pending: null,    // {bubble, threadId, discard} while a sent message waits for run_accepted
  regenerating: null, // the thread id while a regenerate frame waits for its answer
  answering: null,  // the RunView whose approval frame waits for its answer
  filling: new Set(), // run ids whose missing events are being fetched
  openToken: 0,
};

// ---------------------------------------------------------------- auth view

let authMode = 'login';

function setAuthMode(mode) {
  authMode = mode;
  $('mode-login').setAttribute('aria-selected', String(mode === 'login'));
  $('mode-register').setAttribute('aria-selected', String(mode === 'register'));
  $('name-field').hidden = mode !== 'register';
  $('auth-submit').textContent = mode === 'register' ? 'Create account' : 'Log in';
  $('password').autocomplete = mode === 'register' ? 'new-password' : 'current-password';
  $('auth-error').textContent = '';
}

async function submitAuth(event) {
  event.preventDefault();
  const fields = { email: $('email').value.trim(), password: $('password').value };
  if (authMode === 'register' && $('name').value.trim()) fields.name = $('name').value.trim();
  $('auth-submit').disabled = true;
  $('auth-error').textContent = '';
  try {
    await authenticate(authMode, fields);
    $('password').value = '';
    showApp();
  } catch (err) {
    $('auth-error').textContent = err.message || 'could not reach the server';
  } finally {
    $('auth-submit').disabled = false;
  }
}

function showAuth(message) {
  if (state.connection) state.connection.stop();
  state.connection = null;
  state.runs.clear();
  state.pending = null;
  state.threads = [];
  state.threadId = null;
  state.openToken += 1;
  // Nothing of the previous user stays in the page.
  for (const id of ['thread-list', 'messages', 'usage-stats', 'usage-chart', 'usage-legend', 'csv-status', 'who', 'key-list', 'key-new', 'budget-list']) clear($(id));
  $('key-new').hidden = true;
  $('app-view').hidden = true;
  $('auth-view').hidden = false;
  $('auth-error').textContent = message || '';
  $('email').focus();
}

// ---------------------------------------------------------------- app shell

function showApp() {
  const session = loadSession();
  if (!session) return showAuth();
  $('auth-view').hidden = true;
  $('app-view').hidden = false;
  $('who').textContent = session.user ? session.user.email : '';
  state.threadId = null;
  showTab('chat');
  renderEmptyChat();
  refreshThreads();
  // The composer's approval box starts at the account's setting.
  api('/api/settings').then((s) => { $('require-approval').checked = Boolean(s.require_approval); }).catch(() => {});
  state.connection = new Connection({
    onFrame: handleFrame,
    onState: setConnectionState,
    resumeTargets: () => [...state.runs.values()]
      .filter((run) => !run.done)
      .map((run) => ({ run_id: run.runId, after_seq: run.lastSeq })),
  });
  state.connection.start();
}

function showTab(tab) {
  $('chat-view').hidden = tab !== 'chat';
  $('usage-view').hidden = tab !== 'usage';
  $('tab-chat').toggleAttribute('aria-current', tab === 'chat');
  $('tab-usage').toggleAttribute('aria-current', tab === 'usage');
  if (tab === 'chat') $('tab-chat').setAttribute('aria-current', 'page');
  if (tab === 'usage') {
    $('tab-usage').setAttribute('aria-current', 'page');
    state.usage.load();
    loadSessions();
    loadKeys();
    loadBudgets();
    loadAlerts(openAlertThread);
    loadWebhooks();
    loadTeams();
  }
}

/** From an alert: the chat tab, on the thread of the run that explains it. */
function openAlertThread(threadId) {
  showTab('chat');
  refreshThreads().then(() => openThread(threadId));
}

/** The account's sessions (GET /auth/sessions), each with a button that ends it. */
async function loadSessions() {
  const list = $('session-list');
  let sessions;
  try {
    sessions = await api('/auth/sessions');
  } catch (err) {
    $('sessions-status').textContent = `Could not load sessions: ${err.message}`;
    return;
  }
  $('sessions-status').textContent = '';
  clear(list);
  for (const session of sessions) {
    const started = new Date(session.created_at).toLocaleString();
    const used = new Date(session.last_used_at).toLocaleString();
    const label = session.current ? 'This browser' : (session.user_agent || 'Unknown client');
    list.append(h('li', { class: 'session', 'data-session': session.id },
      h('span', { class: 'session-label', text: label }),
      h('span', { class: 'muted', text: ` started ${started}, last refreshed ${used}` }),
      session.current ? null : h('button', {
        type: 'button',
        class: 'ghost',
        text: 'End',
        onclick: async () => {
          try {
            await api(`/auth/sessions/${encodeURIComponent(session.id)}`, { method: 'DELETE' });
            $('sessions-status').textContent = 'Session ended.';
          } catch (err) {
            $('sessions-status').textContent = `Could not end the session: ${err.message}`;
          }
          loadSessions();
        },
      })));
  }
}

/** The account's API keys (GET /api/keys), each with a button that revokes it. */
async function loadKeys() {
  const list = $('key-list');
  let keys;
  try {
    keys = await api('/api/keys');
  } catch (err) {
    $('keys-status').textContent = `Could not load keys: ${err.message}`;
    return;
  }
  clear(list);
  if (keys.length === 0) list.append(h('li', { class: 'muted', text: 'No keys.' }));
  for (const key of keys) {
    const used = key.last_used_at ? `last used ${new Date(key.last_used_at).toLocaleString()}` : 'never used';
    const expires = key.expires_at ? `expires ${new Date(key.expires_at).toLocaleDateString()}` : 'never expires';
    list.append(h('li', { class: 'session', 'data-key': key.id },
      h('span', { class: 'session-label', text: key.name }),
      h('code', { text: `${key.prefix}…` }),
      h('span', { class: 'muted', text: ` ${key.scopes.join(', ')} · ${used} · ${expires}` }),
      h('button', {
        type: 'button', class: 'ghost', text: 'Revoke',
        onclick: async () => {
          try {
            await api(`/api/keys/${encodeURIComponent(key.id)}`, { method: 'DELETE' });
            $('keys-status').textContent = `Key "${key.name}" revoked.`;
          } catch (err) {
            $('keys-status').textContent = `Could not revoke the key: ${err.message}`;
          }
          loadKeys();
        },
      })));
  }
}

/** POST /api/keys; the new key is shown once, here. */
async function createKey(event) {
  event.preventDefault();
  const scopes = [...document.querySelectorAll('#key-form input[name="scope"]:checked')].map((i) => i.value);
  const body = { name: $('key-name').value.trim(), scopes };
  if ($('key-expiry').value) body.expires_in_days = Number($('key-expiry').value);
  try {
    const created = await api('/api/keys', { method: 'POST', json: body });
    const shown = $('key-new');
    clear(shown).append('Your new key (shown only now, copy it): ', h('code', { id: 'key-secret', text: created.key }));
    shown.hidden = false;
    $('keys-status').textContent = '';
    $('key-name').value = '';
  } catch (err) {
    $('keys-status').textContent = `Could not make the key: ${err.message}`;
  }
  loadKeys();
}

/** POST /auth/logout-all: every session ends, this one too. */
async function logoutEverywhere() {
  try {
    await api('/auth/logout-all', { method: 'POST' });
  } catch (err) {
    $('sessions-status').textContent = `Could not log out everywhere: ${err.message}`;
    return;
  }
  await logout();
  showAuth('You were logged out everywhere.');
}

function setConnectionState(connState) {
  $('conn').dataset.state = connState;
  $('conn-text').textContent = { online: 'live', connecting: 'connecting…', offline: 'reconnecting…' }[connState] || connState;
  updateComposer();
}

// ---------------------------------------------------------------- threads

function relativeTime(iso) {
  const seconds = (Date.now() - Date.parse(iso)) / 1000;
  if (!Number.isFinite(seconds)) return '';
  if (seconds < 60) return 'just now';
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min ago`;
  if (seconds < 86400) return `${Math.floor(seconds / 3600)} h ago`;
  return new Date(iso).toLocaleDateString();
}

async function refreshThreads() {
  try {
    state.threads = await api('/api/threads?limit=100');
  } catch (err) {
    return; // the list stays as it was; a 401 already led back to the log-in form
  }
  renderThreads();
}

function renderThreads() {
  const list = clear($('thread-list'));
  if (state.threads.length === 0) {
    list.append(h('li', { class: 'muted empty-list', text: 'No conversations yet.' }));
  }
  for (const thread of state.threads) {
    list.append(h('li', {},
      h('button', {
        type: 'button', class: 'thread', 'data-thread-id': thread.id,
        'aria-current': thread.id === state.threadId ? 'true' : null,
        onclick: () => openThread(thread.id),
      },
      h('span', { class: 'thread-title', text: thread.title }),
      h('span', { class: 'thread-meta muted', text: `${thread.message_count} message${thread.message_count === 1 ? '' : 's'} · ${relativeTime(thread.updated_at)}` }))));
  }
  const current = state.threads.find((t) => t.id === state.threadId);
  $('thread-title').textContent = current ? current.title : 'New conversation';
}

// ---------------------------------------------------------------- chat

function userBubble(text) {
  return h('div', { class: 'msg user' }, h('div', { class: 'bubble', text }));
}

/** Dims an answer that a regeneration replaced and labels it "superseded". */
function markSuperseded(el, superseded) {
  el.classList.toggle('superseded', superseded);
  const label = el.querySelector(':scope > .superseded-label');
  if (superseded && !label) {
    el.prepend(h('span', { class: 'superseded-label', text: 'superseded' }));
  } else if (!superseded && label) {
    label.remove();
  }
}

/** The answers shown after the thread's last question (the ones a regeneration replaces). */
function answersAfterLastQuestion() {
  const items = [...$('messages').children];
  const last = items.map((el) => el.classList.contains('user')).lastIndexOf(true);
  return items.slice(last + 1).filter((el) => el.matches('.msg.assistant, .run') && !el.classList.contains('superseded'));
}

function note(text, kind) {
  return h('p', { class: `chat-note ${kind || ''}`, text });
}

function scrollToEnd() {
  const box = $('messages');
  box.scrollTop = box.scrollHeight;
}

function renderEmptyChat() {
  clear($('messages')).append(h('div', { class: 'welcome' },
    h('h2', { text: 'Ask about your AI usage' }),
    h('p', { class: 'muted', text: 'Five agents read your own usage data and answer live: triage, data, optimization, actions, reporting.' }),
    h('div', { class: 'suggestions' }, SUGGESTIONS.map((text) => h('button', {
      type: 'button', class: 'suggestion', text,
      onclick: () => { $('composer-input').value = text; $('composer-input').focus(); },
    })))));
  renderThreads();
  updateComposer();
}

function newChat() {
  state.threadId = null;
  state.openToken += 1;
  renderEmptyChat();
  $('composer-input').focus();
}

async function openThread(threadId) {
  state.threadId = threadId;
  const token = ++state.openToken;
  renderThreads();
  const box = clear($('messages'));
  box.append(note('Loading…'));
  let page;
  try {
    page = await api(`/api/threads/${encodeURIComponent(threadId)}/messages?limit=500`);
  } catch (err) {
    if (token === state.openToken) clear(box).append(note(`Could not load the conversation: ${err.message}`, 'error'));
    return;
  }
  if (token !== state.openToken) return;
  clear(box);
  const answered = new Set(page.messages
    .filter((m) => m.role === 'assistant' && m.metadata && m.metadata.run_id)
    .map((m) => m.metadata.run_id));
  let unanswered = null;
  for (const message of page.messages) {
    const runId = message.metadata && message.metadata.run_id;
    if (message.role === 'user') {
      box.append(userBubble(message.content));
      if (runId && state.runs.has(runId)) {
        box.append(state.runs.get(runId).el);
      } else if (runId && !answered.has(runId)) {
        unanswered = runId;
      }
    } else if (runId && state.runs.has(runId)) {
      // A regeneration's run has no question of its own: its card goes where its answer is.
      const view = state.runs.get(runId);
      if (!view.el.isConnected) box.append(view.el);
      markSuperseded(view.el, Boolean(message.superseded));
    } else {
      const answer = h('div', { class: 'msg assistant' }, h('div', { class: 'answer', text: message.content }));
      markSuperseded(answer, Boolean(message.superseded));
      box.append(answer);
    }
  }
  // The thread's last question has no answer yet: follow its run if it is still going
  // (e.g. after a page reload), or say how it ended.
  if (unanswered) {
    try {
      const run = await api(`/api/runs/${encodeURIComponent(unanswered)}`);
      if (token !== state.openToken) return;
      if (TERMINAL_STATUSES.has(run.status)) {
        box.append(note(`This run ended: ${run.status}${run.error ? ` (${run.error})` : ''}.`, 'muted'));
      } else {
        const view = runView(unanswered, threadId);
        box.append(view.el);
        state.connection.send({ type: 'resume', run_id: unanswered, after_seq: view.lastSeq });
      }
    } catch {
      // unknown run: nothing to follow
    }
  }
  if (page.messages.length === 0) box.append(note('No messages yet.', 'muted'));
  updateComposer(); // places the Regenerate button, which the scroll then shows
  scrollToEnd();
}

function runView(runId, threadId) {
  let view = state.runs.get(runId);
  if (!view) {
    view = new RunView(runId, threadId, {
      onStop: (id) => {
        if (!state.connection.send({ type: 'stop_agent', run_id: id })) {
          api(`/api/runs/${encodeURIComponent(id)}/cancel`, { method: 'POST' }).catch(() => {});
        }
      },
      onGap: fillGap,
      onApproval: (id, answer) => {
        if (!state.connection.send({ type: 'approval', run_id: id, ...answer })) {
          api(`/api/runs/${encodeURIComponent(id)}/approval`, { method: 'POST', json: answer })
            .then((accepted) => view.approvalAnswered(accepted.decision))
            .catch((err) => view.approvalAnswered(null, err.message));
        } else {
          state.answering = view;
        }
      },
    });
    state.runs.set(runId, view);
  }
  return view;
}

/** Fetches the events a run view is missing (e.g. live events overtook a resume). */
async function fillGap(view) {
  if (state.filling.has(view.runId)) return;
  state.filling.add(view.runId);
  try {
    while (view.buffer.size > 0 && !view.done) {
      const before = view.lastSeq;
      const page = await api(`/api/runs/${encodeURIComponent(view.runId)}/events?after_seq=${before}`);
      for (const event of page.events) view.receive(event);
      if (view.lastSeq === before) break; // nothing new stored yet; live events will come
    }
  } catch {
    // offline: the resume after reconnecting catches up
  } finally {
    state.filling.delete(view.runId);
  }
}

function currentRunActive() {
  return [...state.runs.values()].some((run) => run.threadId === state.threadId && !run.done && state.threadId);
}

function updateComposer() {
  const online = state.connection && state.connection.isOpen();
  const waiting = Boolean(state.pending) || Boolean(state.regenerating);
  const running = currentRunActive();
  // A message may go into a thread whose run is still going: the strategy choice says
  // what happens to that run (double-texting, docs/protocol.md 3.4.1).
  $('send').disabled = !online || waiting;
  $('strategy-row').hidden = !online || !running;
  $('composer-note').textContent = !online ? 'Connecting to the server…' : '';
  placeRegenerate(online && !waiting && !running);
}

/** The Regenerate button, after the thread's last answer; only while nothing runs there. */
function placeRegenerate(allowed) {
  const existing = $('regenerate');
  if (existing) existing.parentElement.remove();
  const box = $('messages');
  const items = [...box.children];
  const last = items.filter((el) => el.matches('.msg.user, .msg.assistant, .run')).pop();
  if (!allowed || !state.threadId || !last || last.classList.contains('user')) return;
  box.append(h('div', { class: 'regenerate-row' }, h('button', {
    type: 'button', id: 'regenerate', class: 'ghost', text: '↻ Regenerate',
    title: 'Answer the last question again (this answer is kept, marked superseded)',
    onclick: regenerate,
  })));
}

function regenerate() {
  const threadId = state.threadId;
  if (!threadId || !state.connection.send({ type: 'regenerate', thread_id: threadId })) return;
  state.regenerating = threadId;
  updateComposer();
}

function sendMessage(event) {
  event.preventDefault();
  const input = $('composer-input');
  const text = input.value.trim();
  if (!text || $('send').disabled) return;
  const frame = { type: 'user_message', text };
  if (state.threadId) frame.thread_id = state.threadId;
  const running = currentRunActive();
  const strategy = running ? $('strategy').value : null;
  if (strategy) frame.multitask_strategy = strategy;
  frame.require_approval = $('require-approval').checked;
  if (!state.connection.send(frame)) {
    updateComposer();
    return;
  }
  if (!state.threadId) clear($('messages'));
  const bubble = userBubble(text);
  bubble.classList.add('pending');
  $('messages').append(bubble);
  // A rollback removes the running run with its question: they leave the page once the
  // server accepted the new message.
  const discard = strategy === 'rollback'
    ? [...state.runs.values()].filter((run) => run.threadId === state.threadId && !run.done)
    : [];
  state.pending = { bubble, threadId: state.threadId, discard };
  input.value = '';
  scrollToEnd();
  updateComposer();
}

function handleFrame(frame) {
  if (typeof frame.seq === 'number' && frame.run_id) return handleEvent(frame);
  switch (frame.type) {
    case 'thread_created':
      if (state.pending && !state.pending.threadId) {
        state.pending.threadId = frame.thread_id;
        state.threadId = frame.thread_id;
        state.openToken += 1;
      }
      refreshThreads();
      break;
    case 'run_accepted': {
      const view = runView(frame.run_id, frame.thread_id);
      if (state.regenerating && state.regenerating === frame.thread_id && !state.pending) {
        // The answers it replaces stay, dimmed; they are current again if it brings none.
        state.regenerating = null;
        if (frame.thread_id === state.threadId) {
          view.supersedes = answersAfterLastQuestion();
          for (const el of view.supersedes) markSuperseded(el, true);
        }
      }
      if (state.pending && state.pending.threadId === frame.thread_id) {
        for (const old of state.pending.discard || []) {
          old.discarded = true;
          const question = old.el.previousElementSibling;
          if (question && question.matches('.msg.user')) question.remove();
          old.el.remove();
        }
        state.pending.bubble.classList.remove('pending');
        state.pending.bubble.after(view.el);
        state.pending = null;
      } else if (frame.thread_id === state.threadId && !view.el.isConnected) {
        $('messages').append(view.el);
      }
      scrollToEnd();
      updateComposer();
      break;
    }
    case 'approval_accepted': {
      const view = state.runs.get(frame.run_id);
      if (view) view.approvalAnswered(frame.decision);
      if (state.answering === view) state.answering = null;
      break;
    }
    case 'stop_acknowledged': {
      const view = state.runs.get(frame.run_id);
      if (view) view.stopAcknowledged();
      break;
    }
    case 'error_message':
      if (state.answering && frame.error_code.startsWith('APPROVAL_')) {
        state.answering.approvalAnswered(null, frame.error_message);
        state.answering = null;
      } else if (state.regenerating && !state.pending) {
        state.regenerating = null;
        $('messages').append(note(`Could not regenerate: ${frame.error_message}`, 'error'));
        updateComposer();
      } else if (state.pending && START_ERRORS.has(frame.error_code)) {
        state.pending.bubble.classList.replace('pending', 'failed');
        state.pending.bubble.after(note(`Not sent: ${frame.error_message}`, 'error'));
        state.pending = null;
        updateComposer();
      } else if (frame.error_code !== 'AUTH_FAILED') {
        $('messages').append(note(frame.error_message, 'error'));
      }
      break;
    case 'server_shutdown':
      $('conn-text').textContent = 'server restarting…';
      break;
    case 'budget_warning': {
      // Names come from the user's own budgets; set as text.
      const what = frame.scope === 'model' ? `the ${frame.scope_id} budget`
        : frame.scope === 'key' ? 'an API key\'s budget' : 'your budget';
      const amount = (n) => (frame.unit === 'usd' ? `$${n.toFixed(2)}` : `${n.toLocaleString('en-US')} tokens`);
      $('messages').append(note(`${frame.threshold}% of ${what} is spent (${amount(frame.spent)} of ${amount(frame.limit)}); it resets ${new Date(frame.resets_at).toLocaleString()}.`, 'budget-warning'));
      if (!$('usage-view').hidden) loadBudgets();
      break;
    }
    case 'alert':
      // An alert rule of the user's raised this (text set as text).
      $('messages').append(note(`${frame.title}. ${frame.detail}`, 'budget-warning'));
      if (!$('usage-view').hidden) loadAlerts(openAlertThread);
      break;
    default:
      break;
  }
}

function handleEvent(event) {
  const view = runView(event.run_id, event.thread_id);
  // A run started elsewhere (another tab, the API) in the thread on screen shows up live.
  if (!view.el.isConnected && event.thread_id === state.threadId && !state.pending && !view.discarded) {
    $('messages').append(view.el);
  }
  const nearEnd = $('messages').scrollHeight - $('messages').scrollTop - $('messages').clientHeight < 80;
  const wasDone = view.done;
  view.receive(event);
  if (nearEnd && view.el.isConnected) scrollToEnd();
  if (view.done && !wasDone) {
    if (view.el.dataset.status !== 'completed' && view.supersedes) {
      for (const el of view.supersedes) markSuperseded(el, false);
    }
    refreshThreads();
    updateComposer();
  }
}

// ---------------------------------------------------------------- start

function init() {
  state.usage = new UsageView();
  $('mode-login').addEventListener('click', () => setAuthMode('login'));
  $('mode-register').addEventListener('click', () => setAuthMode('register'));
  $('auth-form').addEventListener('submit', submitAuth);
  $('logout').addEventListener('click', async () => { await logout(); showAuth(); });
  $('tab-chat').addEventListener('click', () => showTab('chat'));
  $('tab-usage').addEventListener('click', () => showTab('usage'));
  $('logout-all').addEventListener('click', logoutEverywhere);
  $('key-form').addEventListener('submit', createKey);
  $('budget-form').addEventListener('submit', createBudget);
  $('alert-form').addEventListener('submit', (e) => createAlertRule(e, openAlertThread));
  $('webhook-form').addEventListener('submit', createWebhook);
  $('team-form').addEventListener('submit', createOrJoinTeam);
  $('new-chat').addEventListener('click', newChat);
  $('composer').addEventListener('submit', sendMessage);
  $('composer-input').addEventListener('keydown', (e) => {
    if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) sendMessage(e);
  });
  window.addEventListener('apex:logout', () => showAuth('Your session ended. Please log in again.'));
  if (loadSession()) showApp(); else showAuth();
}

init();
