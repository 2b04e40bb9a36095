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
  awaiting_approval: 'Waiting for you',
};

const DECISION_LABELS = { approve: 'Approved', edit: 'Approved with changes', reject: 'Rejected' };

function money(usd) {
  return `$${Number(usd || 0).toLocaleString('en-US', { minimumFractionDigits: 2, maximumFractionDigits: 2 })}`;
}

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
  /** onStop(runId): the stop button; onGap(view): events are missing after view.lastSeq;
   *  onApproval(runId, answer): the approve/edit/reject card's answer
   *  ({approval_id, decision, plan?}). */
  constructor(runId, threadId, { onStop, onGap, onApproval }) {
    this.runId = runId;
    this.threadId = threadId;
    this.onGap = onGap;
    this.onApproval = onApproval;
    this.approval = null; // the card while the plan waits for an answer
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
    // Anything after the request for approval means it was answered (here or elsewhere).
    if (this.approval && event.type !== 'approval_required') this.approvalSettled();
    switch (event.type) {
      case 'approval_required':
        this.askApproval(p);
        break;
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

  /** The plan, each step with its savings, a checkbox to keep it and a button to move it
   *  up; Approve sends `approve` for the plan as proposed, `edit` for a changed one. */
  askApproval(p) {
    if (this.approval) this.approval.el.remove();
    this.el.dataset.status = 'awaiting_approval';
    this.statusEl.textContent = STATUS_LABELS.awaiting_approval;
    const steps = Array.isArray(p.plan) ? p.plan : [];
    const list = h('ol', { class: 'approval-steps' });
    const row = (step) => {
      const keep = h('input', { type: 'checkbox', checked: true, 'data-step': String(step.order),
        'aria-label': `Carry out step ${step.order}` });
      const up = h('button', { type: 'button', class: 'ghost step-up', title: 'Move up', text: '↑',
        onclick: () => { const li = up.closest('li'); if (li.previousElementSibling) li.previousElementSibling.before(li); } });
      const savings = Number(step.expected_monthly_savings_usd) > 0
        ? h('span', { class: 'muted', text: ` saves about ${money(step.expected_monthly_savings_usd)}/month` }) : null;
      return h('li', { 'data-order': String(step.order) },
        h('label', {}, keep, h('span', { class: 'step-title', text: step.title || '' }), savings), up);
    };
    for (const step of steps) list.append(row(step));
    const status = h('p', { class: 'approval-status muted' });
    const answer = (decision) => {
      const chosen = [...list.children]
        .filter((li) => li.querySelector('input').checked)
        .map((li) => Number(li.dataset.order));
      const proposed = steps.map((s) => Number(s.order));
      let body = { approval_id: p.approval_id, decision };
      if (decision === 'approve' && chosen.join() !== proposed.join()) {
        if (chosen.length === 0) { status.textContent = 'Keep at least one step, or reject the plan.'; return; }
        body = { approval_id: p.approval_id, decision: 'edit', plan: chosen };
      }
      for (const b of buttons) b.disabled = true;
      status.textContent = 'Sending your answer…';
      this.onApproval(this.runId, body);
    };
    const buttons = [
      h('button', { type: 'button', class: 'primary approve', text: 'Approve', onclick: () => answer('approve') }),
      h('button', { type: 'button', class: 'ghost reject', text: 'Reject', onclick: () => answer('reject') }),
    ];
    const expires = p.expires_at ? new Date(p.expires_at).toLocaleString() : '';
    const el = h('section', { class: 'approval-card', 'data-approval-id': String(p.approval_id || '') },
      h('h3', { text: 'Approve the plan?' }),
      h('p', { class: 'muted', text: `Together about ${money(p.total_monthly_savings_usd)} a month. Untick steps to leave them out, ↑ to reorder.${expires ? ` Waits until ${expires}.` : ''}` }),
      list, h('div', { class: 'approval-actions' }, ...buttons), status);
    this.approval = { el, buttons, status };
    this.answerEl.before(el);
  }

  /** The server took the answer (`approval_accepted`), or refused it. */
  approvalAnswered(decision, error) {
    if (!this.approval) return;
    if (error) {
      this.approval.status.textContent = `Not sent: ${error}`;
      for (const b of this.approval.buttons) b.disabled = false;
      return;
    }
    this.approval.status.textContent = `${DECISION_LABELS[decision] || decision}; continuing…`;
    this.approval.el.dataset.decision = decision;
  }

  /** The run went on after the request: the card stays, read-only. */
  approvalSettled() {
    const card = this.approval;
    this.approval = null;
    for (const b of card.buttons) b.remove();
    for (const up of card.el.querySelectorAll('.step-up')) up.remove();
    for (const input of card.el.querySelectorAll('input')) input.disabled = true;
    if (!card.el.dataset.decision) card.status.textContent = 'Answered.';
    if (!this.done) {
      this.el.dataset.status = 'running';
      this.statusEl.textContent = STATUS_LABELS.running;
    }
  }

  stopAcknowledged() {
    this.stopButton.disabled = true;
    this.stopButton.textContent = 'Stopping…';
  }
}
