// Server-sent events over fetch(), so the token travels in the
// Authorization header (EventSource cannot send one, and a token in the
// URL would end up in logs and history).
//
// SseParser follows the HTML standard's event stream interpretation: lines
// end in LF, CRLF or CR (a CRLF may be split across chunks); a line
// starting with ':' is a comment (agentd's keep-alives); `field: value`
// drops one space after the colon; data lines join with '\n'; a blank line
// dispatches an event that had data; `id` persists across events as the
// last event id (an id containing NUL is ignored); `retry` (digits only)
// sets the reconnection delay.
//
// EventStream reconnects as EventSource does: after the stream ends or
// drops it waits the server's `retry:` delay (longer, doubling, while
// connects fail) and asks again with Last-Event-ID, so no event is seen
// twice or missed. A 401/403 or a 404/410 ends it for good (the caller is
// told why), as does close().

export class SseParser {
  constructor() {
    this.decoder = new TextDecoder();
    this.pending = '';
    this.started = false;
    this.type = '';
    this.data = '';
    this.hasData = false;
    /** The last event id buffer. */
    this.lastEventId = null;
    /** The event source's last event id: the buffer as of the last blank
     *  line (set even by an event without data, as the standard says). */
    this.dispatchedId = null;
    /** The last `retry:` in ms, if any. */
    this.retry = null;
  }

  /** Takes the next bytes (or text); returns the events they complete. */
  feed(chunk) {
    this.pending += typeof chunk === 'string' ? chunk : this.decoder.decode(chunk, { stream: true });
    const events = [];
    let start = 0;
    let i = 0;
    while (i < this.pending.length) {
      const c = this.pending.charCodeAt(i);
      let end;
      if (c === 10) {
        end = i + 1;
      } else if (c === 13) {
        // A CR last in the buffer may be half of a CRLF: wait for more.
        if (i + 1 === this.pending.length) break;
        end = this.pending.charCodeAt(i + 1) === 10 ? i + 2 : i + 1;
      } else {
        i += 1;
        continue;
      }
      const event = this.line(this.pending.slice(start, i));
      if (event) events.push(event);
      start = end;
      i = end;
    }
    this.pending = this.pending.slice(start);
    return events;
  }

  line(line) {
    if (!this.started) {
      this.started = true;
      if (line.startsWith('\uFEFF')) line = line.slice(1);
    }
    if (line === '') return this.dispatch();
    if (line.startsWith(':')) return null;
    const colon = line.indexOf(':');
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? '' : line.slice(colon + 1);
    if (value.startsWith(' ')) value = value.slice(1);
    switch (field) {
      case 'event':
        this.type = value;
        break;
      case 'data':
        this.data = this.hasData ? `${this.data}\n${value}` : value;
        this.hasData = true;
        break;
      case 'id':
        if (!value.includes('\0')) this.lastEventId = value;
        break;
      case 'retry':
        if (/^[0-9]+$/.test(value)) this.retry = Number(value);
        break;
      default:
        break;
    }
    return null;
  }

  dispatch() {
    this.dispatchedId = this.lastEventId;
    const had = this.hasData;
    const event = { id: this.lastEventId, type: this.type || 'message', data: this.data };
    this.type = '';
    this.data = '';
    this.hasData = false;
    return had ? event : null;
  }
}

const sleep = (ms, signal) => new Promise((resolve) => {
  const timer = setTimeout(resolve, ms);
  signal.addEventListener('abort', () => { clearTimeout(timer); resolve(); }, { once: true });
});

export class EventStream {
  /**
   * url: the stream; options:
   * - headers(): headers for each connect (the token, read afresh);
   * - lastEventId: where to start (null: from the beginning);
   * - onEvent({id, type, data}); onState(state, detail) with state one of
   *   connecting, open, reconnecting, ended, denied, gone;
   * - shouldReconnect(): after the server ended the stream, whether to ask
   *   again (a closed session's replay ends for good);
   * - fetch: the fetch to use (tests cut streams with it);
   * - maxDelay: the longest wait between failed connects.
   */
  constructor(url, options = {}) {
    this.url = url;
    this.options = options;
    this.lastEventId = options.lastEventId ?? null;
    this.delay = 1000;
    this.maxDelay = options.maxDelay ?? 15000;
    this.controller = new AbortController();
    this.connects = 0;
  }

  start() {
    this.done = this.run().catch((e) => this.state('ended', e.message));
    return this;
  }

  close() {
    this.controller.abort();
  }

  get closed() {
    return this.controller.signal.aborted;
  }

  state(state, detail) {
    if (!this.closed && this.options.onState) this.options.onState(state, detail);
  }

  async run() {
    const signal = this.controller.signal;
    const doFetch = this.options.fetch || ((...args) => fetch(...args));
    let failures = 0;
    while (!signal.aborted) {
      this.state(this.connects === 0 ? 'connecting' : 'reconnecting');
      const headers = { Accept: 'text/event-stream', ...(this.options.headers ? this.options.headers() : {}) };
      if (this.lastEventId !== null) headers['Last-Event-ID'] = this.lastEventId;
      this.connects += 1;
      let response;
      try {
        response = await doFetch(this.url, { headers, signal, cache: 'no-store', credentials: 'omit' });
      } catch (e) {
        if (signal.aborted) return;
        failures += 1;
        this.state('reconnecting', `no answer: ${e.message}`);
        await sleep(Math.min(this.delay * 2 ** (failures - 1), this.maxDelay), signal);
        continue;
      }
      if (response.status === 401 || response.status === 403) {
        this.state('denied', await detailOf(response));
        return;
      }
      if (response.status === 404 || response.status === 410) {
        this.state('gone', await detailOf(response));
        return;
      }
      const type = response.headers.get('content-type') || '';
      if (!response.ok || !type.startsWith('text/event-stream')) {
        failures += 1;
        this.state('reconnecting', await detailOf(response));
        await sleep(Math.min(this.delay * 2 ** (failures - 1), this.maxDelay), signal);
        continue;
      }
      failures = 0;
      this.state('open');
      const parser = new SseParser();
      parser.lastEventId = this.lastEventId;
      parser.dispatchedId = this.lastEventId;
      const reader = response.body.getReader();
      try {
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          for (const event of parser.feed(value)) {
            // A page's bug is reported as such, never taken for a dropped stream.
            try { if (this.options.onEvent) this.options.onEvent(event); } catch (e) { reportError(e); }
            if (signal.aborted) return;
          }
          this.lastEventId = parser.dispatchedId;
          if (parser.retry !== null) this.delay = parser.retry;
        }
      } catch (e) {
        if (signal.aborted) return;
        // The connection dropped mid-stream: reconnect below.
      }
      if (signal.aborted) return;
      if (this.options.shouldReconnect && !(await this.options.shouldReconnect())) {
        this.state('ended');
        return;
      }
      this.state('reconnecting');
      await sleep(this.delay, signal);
    }
  }
}

async function detailOf(response) {
  try {
    const body = await response.json();
    return `${response.status} ${body.code || ''}: ${body.detail || ''}`.trim();
  } catch (_) {
    return `${response.status} ${response.statusText}`;
  }
}
