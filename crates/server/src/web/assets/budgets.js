// The budgets card: caps on the user's own LLM calls through the gateway
// (GET/POST/DELETE /api/budgets), each with what its current period has spent.

import { api } from './api.js';
import { $, h, clear, usd } from './dom.js';

function describe(budget) {
  const what = budget.scope === 'key' ? `API key ${budget.scope_id}`
    : budget.scope === 'model' ? `model ${budget.scope_id}` : 'all your calls';
  let period = budget.period === 'rolling_days' ? `the last ${budget.days} days` : `per ${budget.period}`;
  if (budget.timezone && budget.timezone !== 'UTC') period += ` (${budget.timezone})`;
  const limit = budget.limit_usd != null ? usd(budget.limit_usd) : `${budget.limit_tokens.toLocaleString('en-US')} tokens`;
  const spent = budget.limit_usd != null ? usd(budget.spent, 4) : `${budget.spent.toLocaleString('en-US')} tokens`;
  return { what, text: `${limit} ${period} · ${spent} spent (${Math.round(budget.percent)}%) · resets ${new Date(budget.resets_at).toLocaleString()}` };
}

/** The account's budgets, each with a button that deletes it. */
export async function loadBudgets() {
  const list = $('budget-list');
  let budgets;
  try {
    budgets = await api('/api/budgets');
  } catch (err) {
    $('budgets-status').textContent = `Could not load budgets: ${err.message}`;
    return;
  }
  clear(list);
  if (budgets.length === 0) list.append(h('li', { class: 'muted', text: 'No budgets: no call is refused for one.' }));
  for (const budget of budgets) {
    const { what, text } = describe(budget);
    list.append(h('li', { class: 'session', 'data-budget': budget.id },
      h('span', { class: 'session-label', text: what }),
      h('span', { class: 'muted', text: ` ${text}` }),
      h('button', {
        type: 'button', class: 'ghost', text: 'Delete',
        onclick: async () => {
          try {
            await api(`/api/budgets/${encodeURIComponent(budget.id)}`, { method: 'DELETE' });
            $('budgets-status').textContent = 'Budget deleted.';
          } catch (err) {
            $('budgets-status').textContent = `Could not delete the budget: ${err.message}`;
          }
          loadBudgets();
        },
      })));
  }
}

/** POST /api/budgets from the form. */
export async function createBudget(event) {
  event.preventDefault();
  const model = $('budget-model').value.trim();
  const amount = Number($('budget-limit').value);
  const period = $('budget-period').value;
  const body = model ? { scope: 'model', scope_id: model } : { scope: 'user' };
  // Days run from midnight where the user is.
  body.timezone = Intl.DateTimeFormat().resolvedOptions().timeZone || 'UTC';
  if ($('budget-unit').value === 'usd') body.limit_usd = amount; else body.limit_tokens = Math.round(amount);
  if (period.startsWith('rolling_days:')) {
    body.period = 'rolling_days';
    body.days = Number(period.split(':')[1]);
  } else {
    body.period = period;
  }
  try {
    await api('/api/budgets', { method: 'POST', json: body });
    $('budgets-status').textContent = 'Budget set.';
    $('budget-limit').value = '';
  } catch (err) {
    $('budgets-status').textContent = `Could not set the budget: ${err.message}`;
  }
  loadBudgets();
}
