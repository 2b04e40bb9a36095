// The usage view: the user's own spend by model per day as a stacked bar chart drawn in
// SVG, headline numbers from the summary, where the figures came from and how each cost
// was computed, and uploads.

import { api } from './api.js';
import { $, h, svg, clear, usd } from './dom.js';

const PALETTE = ['#4f46e5', '#0ea5e9', '#10b981', '#f59e0b', '#ef4444', '#8b5cf6', '#14b8a6', '#f97316', '#64748b'];
const MONTHS = ['Jan', 'Feb', 'Mar', 'Apr', 'May', 'Jun', 'Jul', 'Aug', 'Sep', 'Oct', 'Nov', 'Dec'];

/** UTC dates from `days` days ago to today, as YYYY-MM-DD. */
function dateRange(days) {
  const out = [];
  const today = Date.UTC(new Date().getUTCFullYear(), new Date().getUTCMonth(), new Date().getUTCDate());
  for (let i = days; i >= 0; i -= 1) {
    out.push(new Date(today - i * 86400000).toISOString().slice(0, 10));
  }
  return out;
}

function shortDate(date) {
  const [, month, day] = date.split('-').map(Number);
  return `${MONTHS[month - 1] || '?'} ${day}`;
}

/** A round axis maximum and step, about four gridlines. */
function niceScale(max) {
  if (!(max > 0)) return { top: 1, step: 0.25 };
  const rough = max / 4;
  const magnitude = 10 ** Math.floor(Math.log10(rough));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * magnitude).find((s) => s >= rough) || rough;
  return { top: Math.ceil(max / step) * step, step };
}

/** Stacked bars: one per day, one segment per model, models ordered by total spend. */
export function drawChart(container, legend, daily) {
  clear(container);
  clear(legend);
  const dates = dateRange(daily.days);
  const byModel = new Map();
  for (const entry of daily.series) {
    if (!byModel.has(entry.model)) byModel.set(entry.model, { total: 0, requests: 0, days: new Map() });
    const model = byModel.get(entry.model);
    model.total += entry.cost_usd;
    model.requests += entry.requests;
    model.days.set(entry.date, entry);
  }
  if (byModel.size === 0) {
    container.append(h('p', { class: 'empty muted', text: 'No usage in this window yet. Upload a CSV below.' }));
    return;
  }
  const models = [...byModel.entries()].sort((a, b) => b[1].total - a[1].total || a[0].localeCompare(b[0]));
  const color = new Map(models.map(([name], i) => [name, PALETTE[i % PALETTE.length]]));
  const dayTotals = dates.map((date) => models.reduce((sum, [, m]) => sum + (m.days.get(date)?.cost_usd || 0), 0));
  const { top, step } = niceScale(Math.max(...dayTotals));

  const W = 760; const H = 280;
  const left = 56; const right = 12; const topPad = 12; const bottom = 30;
  const plotW = W - left - right; const plotH = H - topPad - bottom;
  const y = (v) => topPad + plotH - (v / top) * plotH;
  const slot = plotW / dates.length;
  const barW = Math.max(2, slot * 0.72);

  const chart = svg('svg', {
    viewBox: `0 0 ${W} ${H}`, class: 'chart-svg', role: 'img',
    'aria-label': `Spend by model per day over the last ${daily.days} days`,
  });
  for (let v = 0; v <= top + step / 2; v += step) {
    chart.append(
      svg('line', { x1: left, x2: W - right, y1: y(v), y2: y(v), class: v === 0 ? 'axis' : 'grid' }),
      svg('text', { x: left - 8, y: y(v) + 4, 'text-anchor': 'end', class: 'tick', text: usd(v, v < 10 && step < 1 ? 2 : 0) }),
    );
  }
  const labelEvery = Math.max(1, Math.ceil(dates.length / 8));
  dates.forEach((date, i) => {
    const x = left + i * slot + (slot - barW) / 2;
    let base = 0;
    for (const [name, model] of models) {
      const entry = model.days.get(date);
      if (!entry || entry.cost_usd <= 0) continue;
      const y0 = y(base); const y1 = y(base + entry.cost_usd);
      base += entry.cost_usd;
      chart.append(svg('rect', {
        x, y: y1, width: barW, height: Math.max(0.5, y0 - y1), fill: color.get(name), class: 'bar',
        'data-date': date, 'data-model': name,
      }, svg('title', { text: `${date} · ${name}: ${usd(entry.cost_usd)} (${entry.requests} requests)` })));
    }
    if ((dates.length - 1 - i) % labelEvery === 0) {
      chart.append(svg('text', { x: x + barW / 2, y: H - 10, 'text-anchor': 'middle', class: 'tick', text: shortDate(date) }));
    }
  });
  container.append(chart);
  for (const [name, model] of models) {
    legend.append(h('li', {},
      h('span', { class: 'swatch', 'data-color': color.get(name) }),
      h('span', { class: 'legend-name', text: name }),
      h('span', { class: 'muted', text: `${usd(model.total)} · ${model.requests.toLocaleString('en-US')} requests` })));
  }
  // Swatch colours are set through the CSSOM (allowed by the CSP, unlike inline styles).
  for (const swatch of legend.querySelectorAll('.swatch')) swatch.style.background = swatch.dataset.color;
}

/// The summary's sources, as text (a source name comes from the server, never as markup).
function drawSources(list, sources) {
  clear(list);
  if (sources.length === 0) {
    list.append(h('li', { class: 'muted', text: 'No usage in this window yet.' }));
    return;
  }
  for (const source of sources) {
    list.append(h('li', { 'data-source': source.source },
      h('span', { class: 'legend-name', text: SOURCE_NAMES[source.source] || source.source }),
      h('span', { class: 'muted', text: `${usd(source.cost_usd)} · ${source.requests.toLocaleString('en-US')} requests · latest ${source.latest.slice(0, 10)}` })));
  }
}

/// One line per model of the summary, each with a button that shows the arithmetic of its
/// cost (`GET /api/usage/explain`). Names come from the server and are set as text.
function drawCosts(list, models, days) {
  clear(list);
  if (models.length === 0) {
    list.append(h('li', { class: 'muted', text: 'No usage in this window yet.' }));
    return;
  }
  for (const model of models) {
    const detail = h('div', { class: 'explain' });
    const button = h('button', { type: 'button', class: 'ghost', text: 'Show the arithmetic' });
    button.addEventListener('click', () => explainModel(detail, model.model, days, button));
    list.append(h('li', { 'data-model': model.model },
      h('span', { class: 'legend-name', text: model.model }),
      h('span', { class: 'muted', text: ` ${usd(model.cost_usd)} · ${model.requests.toLocaleString('en-US')} requests ` }),
      button, detail));
  }
}

const CLASS_NAMES = {
  input: 'input', cached_input: 'cached input', cache_write: 'cache write',
  output: 'output', reasoning: 'reasoning', requests: 'request fee',
};

async function explainModel(detail, model, days, button) {
  button.disabled = true;
  try {
    const x = await api(`/api/usage/explain?days=${days}&model=${encodeURIComponent(model)}`);
    clear(detail);
    for (const group of x.groups) {
      const title = group.price
        ? `${group.rows.toLocaleString('en-US')} rows at ${group.price.version}`
        : `${group.rows.toLocaleString('en-US')} rows with the cost their source sent: ${usd(group.stored_cost_usd, 6)}`;
      const lines = group.lines.map((line) => h('li', {
        'data-class': line.class,
        text: `${CLASS_NAMES[line.class] || line.class}: ${line.quantity.toLocaleString('en-US')} × $${line.rate_usd}`
          + `${line.class === 'requests' ? '' : ' per million'} = ${usd(line.cost_usd, 6)}`,
      }));
      detail.append(h('p', { class: 'explain-group', text: title }), h('ul', {}, ...lines));
    }
    detail.append(h('p', {
      class: 'explain-total',
      text: `Total ${usd(x.computed_cost_usd, 6)} computed (${x.computed_cost_micro_usd.toLocaleString('en-US')} µ$), ${usd(x.stored_cost_usd, 6)} stored`,
    }));
  } catch (err) {
    clear(detail).append(h('p', { class: 'error', text: `Could not explain: ${err.message}` }));
  } finally {
    button.disabled = false;
  }
}

const SOURCE_NAMES = {
  upload: 'Uploads',
  demo: 'Demo data',
  apex: "Apex's own LLM calls",
  otlp: 'OpenTelemetry',
  gateway: 'LLM gateway',
  'openai-usage': 'OpenAI usage export',
  'anthropic-usage': 'Anthropic usage report',
  'litellm-spend': 'LiteLLM spend logs',
};

function stat(label, value, id) {
  return h('div', { class: 'stat' }, h('div', { class: 'stat-label muted', text: label }),
    h('div', { class: 'stat-value', id, title: value, text: value }));
}

export class UsageView {
  constructor() {
    this.loading = 0;
    $('usage-days').addEventListener('change', () => this.load());
    $('csv-form').addEventListener('submit', (e) => { e.preventDefault(); this.upload(); });
  }

  async load() {
    const days = Number($('usage-days').value) || 30;
    const ticket = ++this.loading;
    const stats = $('usage-stats');
    try {
      const [summary, daily] = await Promise.all([
        api(`/api/usage/summary?days=${days}`),
        api(`/api/usage/daily?days=${days}`),
      ]);
      if (ticket !== this.loading) return;
      clear(stats).append(
        stat('Total spend', usd(summary.total_cost_usd), 'stat-total'),
        stat('Requests', summary.total_requests.toLocaleString('en-US')),
        stat('Top model', summary.by_model[0] ? summary.by_model[0].model : '—'),
        stat('p95 latency', `${summary.latency_ms.p95.toLocaleString('en-US')} ms`),
      );
      drawChart($('usage-chart'), $('usage-legend'), daily);
      drawSources($('usage-sources'), summary.by_source || []);
      drawCosts($('usage-costs'), summary.by_model || [], days);
    } catch (err) {
      if (ticket !== this.loading) return;
      clear(stats).append(h('p', { class: 'error', text: `Could not load usage: ${err.message}` }));
    }
  }

  async upload() {
    const status = $('csv-status');
    const file = $('csv-file').files[0];
    status.className = 'note';
    if (!file) {
      status.textContent = 'Choose a file first.';
      return;
    }
    const format = $('import-format').value;
    const [path, contentType] = format === 'csv'
      ? ['/api/usage/events', 'text/csv']
      : [`/api/usage/events?format=${encodeURIComponent(format)}`, 'application/json'];
    $('csv-upload').disabled = true;
    status.textContent = `Uploading ${file.name}…`;
    try {
      const result = await api(path, { method: 'POST', body: await file.text(), contentType });
      status.classList.add('ok');
      const notes = [];
      if (result.duplicates) notes.push(`${result.duplicates} already stored`);
      const skipped = result.skipped || [];
      if (skipped.length) {
        notes.push(`${skipped.length} skipped: ${skipped.slice(0, 3).map((s) => `entry ${s.index}: ${s.reason}`).join('; ')}`);
      }
      status.textContent = `Imported ${result.inserted} rows from ${file.name}.${notes.length ? ` (${notes.join('; ')})` : ''}`;
      $('csv-file').value = '';
      await this.load();
    } catch (err) {
      status.classList.add('error');
      status.textContent = `Upload refused: ${err.message}`;
    } finally {
      $('csv-upload').disabled = false;
    }
  }
}
