// The alerts, webhooks and teams cards of the Usage tab:
// - alert rules and scheduled reports (GET/POST/DELETE /api/alerts/rules) and what they
//   raised (GET /api/alerts), each linking the run that explains it;
// - webhooks (GET/POST/DELETE /api/webhooks), their secret shown once, and each one's
//   delivery log with every attempt and a Redeliver button;
// - the team view: the user's teams, making one, inviting, and for owners and admins the
//   members with their usage totals (never their messages).
// Every text from the server is set as text, never as HTML.

import { api } from './api.js';
import { $, h, clear, usd } from './dom.js';

function status(id, text) {
  $(id).textContent = text;
}

function describeRule(rule) {
  const p = rule.params || {};
  const whose = rule.team_id ? 'team' : 'your';
  const what = {
    spend_over: `when ${whose} spend this ${p.period} reaches ${usd(p.threshold_usd || 0)}`,
    spend_change: `when a day's ${whose} spend is ${p.percent}% above the ${p.baseline_days}-day average`,
    budget_forecast: `when budget ${p.budget_id} is on course to run out`,
    report: 'a cost report',
  }[rule.kind] || rule.kind;
  const every = rule.every === 'hour' ? 'every hour' : `every ${rule.every} at ${rule.at_hour}:00`;
  return `${rule.kind === 'report' ? 'Write ' : 'Alert '}${what}, checked ${every} (${rule.timezone}); next ${new Date(rule.next_tick_at).toLocaleString()}`;
}

/** The alert rules and the alerts they raised. `openThread` opens a run's thread. */
export async function loadAlerts(openThread) {
  let rules;
  let alerts;
  try {
    [rules, alerts] = await Promise.all([api('/api/alerts/rules'), api('/api/alerts?limit=20')]);
  } catch (err) {
    status('alerts-status', `Could not load alerts: ${err.message}`);
    return;
  }
  const list = clear($('alert-rule-list'));
  if (rules.length === 0) list.append(h('li', { class: 'muted', text: 'No alert rules.' }));
  for (const rule of rules) {
    list.append(h('li', { class: 'session', 'data-rule': rule.id },
      h('span', { class: 'session-label', text: describeRule(rule) }),
      h('button', {
        type: 'button', class: 'ghost', text: 'Delete',
        onclick: async () => {
          try {
            await api(`/api/alerts/rules/${encodeURIComponent(rule.id)}`, { method: 'DELETE' });
            status('alerts-status', 'Rule deleted.');
          } catch (err) {
            status('alerts-status', `Could not delete the rule: ${err.message}`);
          }
          loadAlerts(openThread);
        },
      })));
  }
  const raised = clear($('alert-list'));
  if (alerts.length === 0) raised.append(h('li', { class: 'muted', text: 'Nothing raised yet.' }));
  for (const alert of alerts) {
    const item = h('li', { class: 'session', 'data-alert': alert.id },
      h('span', { class: 'session-label', text: alert.title }),
      h('span', { class: 'muted', text: ` ${alert.detail} · ${new Date(alert.created_at).toLocaleString()}` }));
    if (alert.thread_id) {
      item.append(h('button', {
        type: 'button', class: 'ghost', text: alert.kind === 'report' ? 'Read the report' : 'Why?',
        onclick: () => openThread(alert.thread_id),
      }));
    }
    raised.append(item);
  }
}

/** POST /api/alerts/rules from the form. */
export async function createAlertRule(event, openThread) {
  event.preventDefault();
  const kind = $('alert-kind').value;
  const body = {
    kind,
    every: $('alert-every').value,
    timezone: Intl.DateTimeFormat().resolvedOptions().timeZone || 'UTC',
  };
  const amount = Number($('alert-amount').value);
  if (kind === 'spend_over') {
    body.threshold_usd = amount;
    body.period = $('alert-period').value;
  } else if (kind === 'spend_change') {
    body.percent = amount || 50;
  }
  try {
    await api('/api/alerts/rules', { method: 'POST', json: body });
    status('alerts-status', kind === 'report' ? 'Report scheduled; the first is being written.' : 'Rule made; it is checked now, then on schedule.');
    $('alert-amount').value = '';
  } catch (err) {
    status('alerts-status', `Could not make the rule: ${err.message}`);
  }
  loadAlerts(openThread);
  // The first tick runs at once: show what it raised.
  setTimeout(() => loadAlerts(openThread), 1500);
}

async function showDeliveries(hook, into) {
  let deliveries;
  try {
    deliveries = await api(`/api/webhooks/${encodeURIComponent(hook.id)}/deliveries?limit=20`);
  } catch (err) {
    status('webhooks-status', `Could not load the delivery log: ${err.message}`);
    return;
  }
  clear(into);
  if (deliveries.length === 0) into.append(h('li', { class: 'muted', text: 'No messages yet.' }));
  for (const d of deliveries) {
    const attempts = d.attempt_log
      .map((a) => `#${a.attempt} ${a.status_code != null ? a.status_code : a.error}`)
      .join(', ');
    into.append(h('li', { class: 'delivery', 'data-delivery': d.id, 'data-status': d.status },
      h('span', { class: 'session-label', text: `${d.event_type} · ${d.status}` }),
      h('span', { class: 'muted', text: ` ${d.id} · ${attempts || 'not tried yet'}` }),
      h('button', {
        type: 'button', class: 'ghost', text: 'Redeliver',
        onclick: async () => {
          try {
            await api(`/api/webhooks/${encodeURIComponent(hook.id)}/deliveries/${encodeURIComponent(d.id)}/redeliver`, { method: 'POST' });
            status('webhooks-status', 'Queued again.');
          } catch (err) {
            status('webhooks-status', `Could not redeliver: ${err.message}`);
          }
          setTimeout(() => showDeliveries(hook, into), 800);
        },
      })));
  }
}

/** The webhooks, each with its delivery log. */
export async function loadWebhooks() {
  let hooks;
  try {
    hooks = await api('/api/webhooks');
  } catch (err) {
    status('webhooks-status', `Could not load webhooks: ${err.message}`);
    return;
  }
  const list = clear($('webhook-list'));
  if (hooks.length === 0) list.append(h('li', { class: 'muted', text: 'No webhooks.' }));
  for (const hook of hooks) {
    const log = h('ul', { class: 'delivery-log session-list' });
    list.append(h('li', { class: 'session', 'data-webhook': hook.id },
      h('span', { class: 'session-label', text: hook.url }),
      h('button', {
        type: 'button', class: 'ghost', text: 'Send a test',
        onclick: async () => {
          try {
            await api(`/api/webhooks/${encodeURIComponent(hook.id)}/test`, { method: 'POST' });
            status('webhooks-status', 'Test message queued.');
          } catch (err) {
            status('webhooks-status', `Could not queue a test: ${err.message}`);
          }
          setTimeout(() => showDeliveries(hook, log), 800);
        },
      }),
      h('button', { type: 'button', class: 'ghost', text: 'Delivery log', onclick: () => showDeliveries(hook, log) }),
      h('button', {
        type: 'button', class: 'ghost', text: 'Delete',
        onclick: async () => {
          try {
            await api(`/api/webhooks/${encodeURIComponent(hook.id)}`, { method: 'DELETE' });
            status('webhooks-status', 'Webhook deleted.');
          } catch (err) {
            status('webhooks-status', `Could not delete the webhook: ${err.message}`);
          }
          loadWebhooks();
        },
      }),
      log));
  }
}

/** POST /api/webhooks from the form; the signing secret is shown once. */
export async function createWebhook(event) {
  event.preventDefault();
  try {
    const hook = await api('/api/webhooks', { method: 'POST', json: { url: $('webhook-url').value.trim() } });
    const shown = $('webhook-secret');
    shown.textContent = `Signing secret (shown once; verify each message's webhook-signature with it): ${hook.secret}`;
    shown.hidden = false;
    $('webhook-url').value = '';
    status('webhooks-status', 'Webhook added.');
  } catch (err) {
    status('webhooks-status', `Could not add the webhook: ${err.message}`);
  }
  loadWebhooks();
}

async function showMembers(team, into) {
  try {
    const [members, usage] = await Promise.all([
      api(`/api/teams/${encodeURIComponent(team.id)}/members`),
      team.role === 'member' ? Promise.resolve(null) : api(`/api/teams/${encodeURIComponent(team.id)}/usage`),
    ]);
    const totals = new Map((usage ? usage.members : []).map((m) => [m.user_id, m]));
    clear(into);
    for (const m of members) {
      const t = totals.get(m.user_id);
      const spend = t ? ` · ${usd(t.cost_usd)} over ${usage.days} days, ${t.requests.toLocaleString('en-US')} requests` : '';
      into.append(h('li', { class: 'member', 'data-member': m.user_id },
        h('span', { class: 'session-label', text: `${m.email} (${m.role})` }),
        h('span', { class: 'muted', text: spend })));
    }
  } catch (err) {
    status('teams-status', `Could not load the team: ${err.message}`);
  }
}

/** The user's teams; owners and admins see members' usage totals and can invite. */
export async function loadTeams() {
  let teams;
  try {
    teams = await api('/api/teams');
  } catch (err) {
    status('teams-status', `Could not load teams: ${err.message}`);
    return;
  }
  const list = clear($('team-list'));
  if (teams.length === 0) list.append(h('li', { class: 'muted', text: 'You are in no team.' }));
  for (const team of teams) {
    const members = h('ul', { class: 'member-list session-list' });
    const item = h('li', { class: 'session', 'data-team': team.id },
      h('span', { class: 'session-label', text: `${team.name} · ${team.role} · ${team.members} member${team.members === 1 ? '' : 's'}` }),
      h('button', { type: 'button', class: 'ghost', text: 'Members', onclick: () => showMembers(team, members) }));
    if (team.role !== 'member') {
      item.append(h('button', {
        type: 'button', class: 'ghost', text: 'Invite',
        onclick: async () => {
          try {
            const invite = await api(`/api/teams/${encodeURIComponent(team.id)}/invites`, { method: 'POST', json: { role: 'member' } });
            status('teams-status', `Invite (single use, give it to one person; they join with it): ${invite.token}`);
          } catch (err) {
            status('teams-status', `Could not make an invite: ${err.message}`);
          }
        },
      }));
    }
    item.append(members);
    list.append(item);
  }
}

/** POST /api/teams, or POST /api/teams/join with an invite, from the form. */
export async function createOrJoinTeam(event) {
  event.preventDefault();
  const value = $('team-name').value.trim();
  try {
    if (value.startsWith('apt_')) {
      await api('/api/teams/join', { method: 'POST', json: { token: value } });
      status('teams-status', 'Joined.');
    } else {
      await api('/api/teams', { method: 'POST', json: { name: value } });
      status('teams-status', 'Team made; you are its owner.');
    }
    $('team-name').value = '';
  } catch (err) {
    status('teams-status', `Could not do that: ${err.message}`);
  }
  loadTeams();
}
