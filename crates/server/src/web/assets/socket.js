// The WebSocket: opened with a single-use ticket (POST /api/websocket/ticket, then
// /ws?ticket=...), so the JWT never appears in a URL. Reconnects with backoff after a
// drop, and on every (re)connect asks the caller which runs to `resume` and from which seq.

import { api, ApiError } from './api.js';

const PING_EVERY_MS = 20000;
const PONG_TIMEOUT_MS = 10000;

export class Connection {
  /**
   * onFrame(frame): every parsed server frame.
   * onState(state): 'connecting' | 'online' | 'offline'.
   * resumeTargets(): [{run_id, after_seq}] for the runs still going.
   */
  constructor({ onFrame, onState, resumeTargets }) {
    this.onFrame = onFrame;
    this.onState = onState;
    this.resumeTargets = resumeTargets;
    this.ws = null;
    this.ready = false;
    this.connecting = false;
    this.stopped = false;
    this.attempt = 0;
    this.retryTimer = null;
    this.pingTimer = null;
    this.pongTimer = null;
    this.onOnline = () => { if (!this.isOpen()) this.reconnectNow(); };
    window.addEventListener('online', this.onOnline);
  }

  isOpen() {
    return this.ws !== null && this.ws.readyState === WebSocket.OPEN && this.ready;
  }

  start() {
    this.connect();
  }

  stop() {
    this.stopped = true;
    window.removeEventListener('online', this.onOnline);
    clearTimeout(this.retryTimer);
    this.detach(1000);
  }

  /** Sends a frame; false when the socket is not open. */
  send(frame) {
    if (!this.isOpen()) return false;
    this.ws.send(JSON.stringify(frame));
    return true;
  }

  async connect() {
    if (this.stopped || this.connecting) return;
    this.connecting = true;
    this.onState('connecting');
    let ticket;
    try {
      ticket = await api('/api/websocket/ticket', {
        method: 'POST', json: { ttl_seconds: 60, single_use: true },
      });
    } catch (err) {
      // 401 after a failed refresh means logged out: api() already said so.
      if (!(err instanceof ApiError && err.status === 401)) this.scheduleRetry();
      return;
    } finally {
      this.connecting = false;
    }
    if (this.stopped) return;
    const scheme = location.protocol === 'https:' ? 'wss:' : 'ws:';
    const ws = new WebSocket(`${scheme}//${location.host}/ws?ticket=${encodeURIComponent(ticket.ticket_id)}`);
    this.ws = ws;
    this.ready = false;
    ws.onmessage = (message) => {
      if (this.ws !== ws) return;
      let frame;
      try {
        frame = JSON.parse(message.data);
      } catch {
        return;
      }
      this.sawTraffic();
      if (frame.type === 'connection_established') {
        this.ready = true;
        this.attempt = 0;
        this.onState('online');
        for (const target of this.resumeTargets()) {
          ws.send(JSON.stringify({ type: 'resume', run_id: target.run_id, after_seq: target.after_seq }));
        }
      }
      this.onFrame(frame);
    };
    ws.onclose = () => {
      if (this.ws !== ws) return;
      this.detach();
      this.scheduleRetry();
    };
    ws.onerror = () => {}; // onclose follows
    this.pingTimer = setInterval(() => this.ping(), PING_EVERY_MS);
  }

  /** A ping that gets no answer means a dead network: drop and reconnect. */
  ping() {
    if (!this.isOpen() || this.pongTimer) return;
    this.ws.send(JSON.stringify({ type: 'ping' }));
    this.pongTimer = setTimeout(() => {
      this.pongTimer = null;
      this.detach();
      this.scheduleRetry();
    }, PONG_TIMEOUT_MS);
  }

  sawTraffic() {
    clearTimeout(this.pongTimer);
    this.pongTimer = null;
  }

  detach(code) {
    clearInterval(this.pingTimer);
    clearTimeout(this.pongTimer);
    this.pingTimer = null;
    this.pongTimer = null;
    const ws = this.ws;
    this.ws = null;
    this.ready = false;
    if (ws) {
      ws.onmessage = ws.onclose = ws.onerror = null;
      try { ws.close(code || 4000); } catch { /* already closed */ }
    }
    if (!this.stopped) this.onState('offline');
  }

  scheduleRetry() {
    if (this.stopped) return;
    clearTimeout(this.retryTimer);
    const delay = Math.min(8000, 400 * 2 ** this.attempt) + Math.random() * 250;
    this.attempt += 1;
    this.retryTimer = setTimeout(() => this.connect(), delay);
  }

  reconnectNow() {
    if (this.connecting) return;
    clearTimeout(this.retryTimer);
    this.detach();
    this.connect();
  }
}
