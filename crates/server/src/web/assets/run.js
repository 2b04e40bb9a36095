// One run's card: its agents' steps as they happen, the streamed answer, a stop button.
// Events are applied exactly once, in seq order: duplicates are dropped, and a gap (seq
// ahead of the next expected one) is buffered while the caller fetches the missing events.

import { h, duration } from './dom.js';

const AGENT_LABELS = {
  triage: 'Triage',
  data: 'Data',
  optimization: 'Optimization',
  actions: 'Actions',
  reporting: 'Reporting',
};

const STATUS_LABELS = {
  queued: 'Queued',
  running: 'Running',
  completed: 'Completed',
  failed: 'Failed',
  cancelled: 'Stopped',
  timed_out: 'Timed out',
  interrupted: 'Interrupted',
};

function pretty(value) {
  try {
    return JSON.stringify(value, null, 2);
  } catch {
    return String(value);
  }
}

export function isTerminal(event) {
  return event.type === 'agent_completed' && event.agent_name === 'supervisor';
}

export class RunView {
  /** onStop(runId): the stop button; onGap(view): events are missing after view.lastSeq. */
  constructor(runId, threadId, { onStop, onGap }) {
    this.runId = runId;
    this.threadId = threadId;
    this.onGap = onGap;
    this.lastSeq = 0;
    this.applied = 0;
    this.done = false;
    this.buffer = new Map();
    this.agents = new Map();
    this.tools = new Map();

    this.statusEl = h('span', { class: 'pill', text: STATUS_LABELS.running });
    this.stopButton = h('button', {
      type: 'button', class: 'stop', title: 'Stop this run',
      onclick: () => { this.stopButton.disabled = true; this.stopButton.textContent = 'Stopping…'; onStop(runId); },
    }, '■ Stop');
    this.metaEl = h('span', { class: 'muted run-meta' });
    this.stepsEl = h('ol', { class: 'steps' });
    this.answerEl = h('div', { class: 'answer' });
    this.errorEl = h('p', { class: 'run-error', hidden: true });
    this.el = h('article', { class: 'run', 'data-run-id': runId, 'data-status': 'running' },
      h('header', { class: 'run-head' },
        h('span', { class: 'run-title' }, 'Agents'), this.statusEl, this.metaEl, this.stopButton),
      this.stepsEl, this.answerEl, this.errorEl);
  }

  /** Takes any event of this run, in any order; applies what is next in seq order. */
  receive(event) {
    const seq = Number(event.seq);
    if (!Number.isInteger(seq) || seq <= this.lastSeq || this.buffer.has(seq)) return;
    if (seq !== this.lastSeq + 1) {
      this.buffer.set(seq, event);
      this.onGap(this);
      return;
    }
    this.applyInOrder(event);
    while (this.buffer.has(this.lastSeq + 1)) {
      const next = this.buffer.get(this.lastSeq + 1);
      this.buffer.delete(this.lastSeq + 1);
      this.applyInOrder(next);
    }
  }

  applyInOrder(event) {
    this.lastSeq = Number(event.seq);
    this.applied += 1;
    this.el.dataset.lastSeq = String(this.lastSeq);
    this.el.dataset.applied = String(this.applied);
    try {
      this.apply(event);
    } catch (err) {
      console.error('could not show event', event, err);
    }
  }

  agent(name) {
    let agent = this.agents.get(name);
    if (!agent) {
      const icon = h('span', { class: 'agent-icon', 'aria-hidden': 'true' });
      const meta = h('span', { class: 'agent-meta muted', text: 'working…' });
      const thoughts = h('ul', { class: 'thoughts' });
      const tools = h('div', { class: 'tools' });
      const el = h('li', { class: 'agent', 'data-agent': name, 'data-state': 'running' },
        h('div', { class: 'agent-head' }, icon,
          h('span', { class: 'agent-name', text: AGENT_LABELS[name] || name }), meta),
        thoughts, tools);
      agent = { el, meta, thoughts, tools };
      this.agents.set(name, agent);
      this.stepsEl.append(el);
    }
    return agent;
  }

  apply(event) {
    const p = event.payload || {};
    const name = String(event.agent_name || '');
    const supervisor = name === 'supervisor';
    switch (event.type) {
      case 'agent_started':
        if (!supervisor) this.agent(name);
        break;
      case 'agent_thinking':
        this.agent(name).thoughts.append(h('li', { class: 'step thinking', text: p.reasoning || '' }));
        break;
      case 'tool_executing': {
        const state = h('span', { class: 'tool-state', text: 'running…' });
        const result = h('pre', { class: 'tool-result', text: 'waiting for the result…' });
        const chip = h('details', { class: 'tool-chip', 'data-state': 'running', 'data-tool': p.tool_name || '' },
          h('summary', {}, h('span', { class: 'tool-name', text: p.tool_name || 'tool' }), state),
          h('div', { class: 'tool-body' },
            h('div', { class: 'muted small', text: 'Parameters' }),
            h('pre', { class: 'tool-params', text: pretty(p.parameters) }),
            h('div', { class: 'muted small', text: 'Result' }),
            result));
        this.tools.set(String(p.tool_call_id), { chip, state, result });
        this.agent(name).tools.append(chip);
        break;
      }
      case 'tool_completed': {
        const tool = this.tools.get(String(p.tool_call_id));
        if (!tool) break;
        const ok = p.success !== false;
        tool.chip.dataset.state = ok ? 'ok' : 'failed';
        tool.state.textContent = `${ok ? '✓' : '✕'} ${duration(p.execution_time_ms)}`;
        tool.result.textContent = pretty(p.result);
        break;
      }
      case 'partial_result':
        this.answerEl.append(String(p.content || ''));
        break;
      case 'agent_error': {
        const agent = this.agent(name);
        agent.el.dataset.state = 'failed';
        agent.meta.textContent = 'failed';
        agent.thoughts.append(h('li', { class: 'step agent-error', text: `${p.error_code || 'ERROR'}: ${p.error_message || ''}` }));
        break;
      }
      case 'agent_completed':
        if (supervisor) {
          this.finish(p);
        } else {
          const agent = this.agent(name);
          agent.el.dataset.state = 'completed';
          agent.meta.textContent = `done in ${duration(p.execution_time_ms)}`;
        }
        break;
      case 'error':
        this.errorEl.hidden = false;
        this.errorEl.textContent = String(p.error_message || p.error_code || 'the run failed');
        break;
      default:
        break; // final_report and anything newer: the terminal event carries what we show
    }
  }

  finish(p) {
    this.done = true;
    const status = String(p.status || 'completed');
    this.el.dataset.status = status;
    this.statusEl.textContent = STATUS_LABELS[status] || status;
    this.metaEl.textContent = `in ${duration(p.execution_time_ms)}`;
    this.stopButton.remove();
    for (const agent of this.agents.values()) {
      if (agent.el.dataset.state === 'running') {
        agent.el.dataset.state = 'stopped';
        agent.meta.textContent = 'stopped';
      }
    }
    // The answer was streamed; only when the chunks are gone (old, pruned log) is the
    // final text used instead.
    if (!this.answerEl.textContent && p.final_response) {
      this.answerEl.textContent = String(p.final_response);
    }
    if (!this.answerEl.textContent) this.answerEl.hidden = true;
  }

  stopAcknowledged() {
    this.stopButton.disabled = true;
    this.stopButton.textContent = 'Stopping…';
  }
}
