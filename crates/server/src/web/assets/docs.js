// The API reference page: renders /openapi.json (operations by tag, parameters, bodies,
// responses, schemas) and sends "try it" requests to this server with a bearer token.
// Everything from the document is set as text, never parsed as HTML.

import { h, clear, $ } from './dom.js';

const TOKEN_KEY = 'apex.docs.token';
const SESSION_KEY = 'apex.session'; // the chat page's session, if this tab has one
const METHODS = ['get', 'post', 'put', 'patch', 'delete'];
const SHOWN_BYTES = 256 * 1024;

let spec = null;

// ---- small helpers --------------------------------------------------------------------

/** Text with `code spans` (the only markup the descriptions use). */
function rich(text) {
  const parts = String(text || '').split('`');
  return parts.map((part, i) => (i % 2 === 1 ? h('code', { text: part }) : part));
}

function anchor(kind, name) {
  return `${kind}-${String(name).replace(/[^A-Za-z0-9_-]/g, '_')}`;
}

function refName(ref) {
  return String(ref).split('/').pop();
}

function resolve(item) {
  if (!item || !item.$ref) return item;
  const path = item.$ref.replace(/^#\//, '').split('/');
  let node = spec;
  for (const key of path) node = node ? node[key] : undefined;
  return node || {};
}

function savedToken() {
  const own = sessionStorage.getItem(TOKEN_KEY);
  if (own) return own;
  try {
    const session = JSON.parse(sessionStorage.getItem(SESSION_KEY) || 'null');
    return (session && session.access_token) || '';
  } catch {
    return '';
  }
}

function needsToken(op) {
  const security = op.security || [];
  return security.length > 0 && !security.some((req) => Object.keys(req).length === 0);
}

// ---- schemas --------------------------------------------------------------------------

/** A one-line type: "string", "integer ≥ 1", "array of Thread", "Thread | null". */
function typeLabel(schema) {
  if (!schema) return [''];
  if (schema.$ref) {
    const name = refName(schema.$ref);
    return [h('a', { href: '#' + anchor('schema', name), text: name })];
  }
  const variants = schema.oneOf || schema.anyOf;
  if (variants) return joinLabels(variants.map(typeLabel));
  if (schema.enum) return [schema.enum.map((v) => JSON.stringify(v)).join(' | ')];
  const types = Array.isArray(schema.type) ? schema.type : [schema.type || 'any'];
  return joinLabels(
    types.map((type) => {
      if (type === 'array') return ['array of ', ...typeLabel(schema.items || {})];
      if (type === 'null') return ['null'];
      let label = type;
      if (schema.format) label += ` (${schema.format})`;
      if (schema.minimum !== undefined) label += ` ≥ ${schema.minimum}`;
      if (schema.maximum !== undefined) label += ` ≤ ${schema.maximum}`;
      return [label];
    }),
  );
}

function joinLabels(labels) {
  return labels.flatMap((label, i) => (i ? [' | ', ...label] : label));
}

/** A schema as a table of its properties (objects) or its type line (anything else). */
function schemaView(schema) {
  schema = schema || {};
  const own = schema.$ref ? resolve(schema) : schema;
  if (!own.properties) {
    return h('div', { class: 'schema' }, h('span', { class: 'type' }, ...typeLabel(schema)),
      own.description && !schema.$ref ? h('span', { class: 'muted' }, ' — ', ...rich(own.description)) : null);
  }
  const required = new Set(own.required || []);
  const rows = Object.entries(own.properties).map(([name, prop]) =>
    h('tr', {},
      h('td', {}, h('code', { text: name }), required.has(name) ? h('span', { class: 'req', title: 'required', text: ' *' }) : null),
      h('td', { class: 'type' }, ...typeLabel(prop)),
      h('td', {}, ...rich(prop.description)),
    ));
  return h('div', { class: 'schema' },
    schema.$ref ? h('div', { class: 'muted small' }, ...typeLabel(schema)) : null,
    h('table', {}, h('tbody', {}, rows)));
}

/** An example value built from a schema, for the request body field. */
function exampleFor(schema, depth = 0) {
  if (!schema || depth > 6) return null;
  if (schema.example !== undefined) return schema.example;
  if (schema.$ref) return exampleFor(resolve(schema), depth + 1);
  const variants = schema.oneOf || schema.anyOf;
  if (variants) {
    const first = variants.find((v) => v.type !== 'null') || variants[0];
    return exampleFor(first, depth + 1);
  }
  if (schema.enum) return schema.enum[0];
  const type = Array.isArray(schema.type) ? schema.type.find((t) => t !== 'null') : schema.type;
  switch (type) {
    case 'object': {
      const out = {};
      for (const [name, prop] of Object.entries(schema.properties || {})) {
        out[name] = exampleFor(prop, depth + 1);
      }
      return out;
    }
    case 'array':
      return [exampleFor(schema.items, depth + 1)];
    case 'integer':
    case 'number':
      return schema.minimum !== undefined ? schema.minimum : 0;
    case 'boolean':
      return false;
    case 'string':
      return '';
    default:
      return null;
  }
}

// ---- operations -----------------------------------------------------------------------

function operations() {
  const ops = [];
  for (const [path, item] of Object.entries(spec.paths || {})) {
    for (const method of METHODS) {
      if (item[method]) ops.push({ path, method, op: item[method] });
    }
  }
  return ops;
}

function byTag(ops) {
  const groups = new Map((spec.tags || []).map((tag) => [tag.name, []]));
  for (const entry of ops) {
    const tag = (entry.op.tags && entry.op.tags[0]) || 'other';
    if (!groups.has(tag)) groups.set(tag, []);
    groups.get(tag).push(entry);
  }
  return [...groups].filter(([, list]) => list.length > 0);
}

function methodBadge(method) {
  return h('span', { class: `method m-${method}`, text: method.toUpperCase() });
}

function parametersView(params) {
  if (!params.length) return null;
  return h('section', {},
    h('h4', { text: 'Parameters' }),
    h('table', { class: 'params' },
      h('thead', {}, h('tr', {}, h('th', { text: 'name' }), h('th', { text: 'in' }), h('th', { text: 'type' }), h('th', { text: 'description' }))),
      h('tbody', {}, params.map((p) => h('tr', {},
        h('td', {}, h('code', { text: p.name }), p.required ? h('span', { class: 'req', title: 'required', text: ' *' }) : null),
        h('td', { text: p.in }),
        h('td', { class: 'type' }, ...typeLabel(p.schema)),
        h('td', {}, ...rich(p.description)))))));
}

function bodyView(body) {
  if (!body) return null;
  body = resolve(body);
  return h('section', {},
    h('h4', {}, 'Request body', body.required ? h('span', { class: 'req', text: ' *' }) : h('span', { class: 'muted', text: ' (optional)' })),
    body.description ? h('p', {}, ...rich(body.description)) : null,
    Object.entries(body.content || {}).map(([type, media]) =>
      h('div', { class: 'media' }, h('div', { class: 'ctype', text: type }), schemaView(media.schema))));
}

function responsesView(responses) {
  return h('section', {},
    h('h4', { text: 'Responses' }),
    h('dl', { class: 'responses' }, Object.entries(responses || {}).flatMap(([status, raw]) => {
      const response = resolve(raw);
      const content = Object.entries(response.content || {});
      return [
        h('dt', { class: `status s${status[0]}`, text: status }),
        h('dd', {},
          h('div', {}, ...rich(response.description)),
          Object.keys(response.headers || {}).length
            ? h('div', { class: 'muted small', text: 'headers: ' + Object.keys(response.headers).join(', ') }) : null,
          content.map(([type, media]) =>
            h('div', { class: 'media' }, h('span', { class: 'ctype', text: type }), ' ', ...typeLabel(media.schema)))),
      ];
    })));
}

// ---- try it ---------------------------------------------------------------------------

function tryItView(path, method, op) {
  if (op.responses && op.responses['101']) {
    return h('section', { class: 'try' }, h('h4', { text: 'Try it' }),
      h('p', { class: 'muted', text: 'A WebSocket upgrade: use a WebSocket client (or apex chat); the frames are described in docs/protocol.md.' }));
  }
  const params = (op.parameters || []).map(resolve);
  const inputs = params.map((p) => {
    const example = p.example !== undefined ? p.example : (p.schema && p.schema.example);
    const input = h('input', { type: 'text', placeholder: p.required ? 'required' : 'optional', spellcheck: 'false' });
    if (example !== undefined) input.value = String(example);
    return { param: p, input };
  });
  const body = op.requestBody ? resolve(op.requestBody) : null;
  const types = Object.keys((body && body.content) || {});
  const typeSelect = types.length > 1 ? h('select', {}, types.map((t) => h('option', { value: t, text: t }))) : null;
  const textarea = body ? h('textarea', { rows: '8', spellcheck: 'false' }) : null;
  const fillBody = () => {
    if (!textarea) return;
    const type = typeSelect ? typeSelect.value : types[0];
    const media = body.content[type] || {};
    const example = media.example !== undefined ? media.example : exampleFor(media.schema);
    textarea.value = typeof example === 'string' ? example : JSON.stringify(example, null, 2);
  };
  fillBody();
  if (typeSelect) typeSelect.addEventListener('change', fillBody);

  const output = h('div', { class: 'output', hidden: true });
  const send = h('button', { type: 'submit', class: 'primary', text: 'Send' });
  const stop = h('button', { type: 'button', class: 'ghost', text: 'Stop', hidden: true });
  let controller = null;
  stop.addEventListener('click', () => controller && controller.abort());

  const form = h('form', { class: 'try' },
    h('h4', { text: 'Try it' }),
    inputs.length ? h('div', { class: 'fields' }, inputs.map(({ param, input }) =>
      h('label', {}, h('span', {}, h('code', { text: param.name }), h('span', { class: 'muted small', text: ` ${param.in}` })), input))) : null,
    body ? h('label', { class: 'body' }, h('span', {}, 'Body ', typeSelect || h('span', { class: 'muted small', text: types[0] || '' })), textarea) : null,
    h('div', { class: 'actions' }, send, stop,
      needsToken(op) ? h('span', { class: 'muted small', text: 'sends the bearer token from the top of the page' }) : null),
    output);

  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    let url = path;
    const query = new URLSearchParams();
    const headers = new Headers();
    for (const { param, input } of inputs) {
      const value = input.value.trim();
      if (param.in === 'path') url = url.replace(`{${param.name}}`, encodeURIComponent(value));
      else if (value && param.in === 'query') query.set(param.name, value);
      else if (value && param.in === 'header') headers.set(param.name, value);
    }
    if ([...query].length) url += '?' + query;
    const token = $('token').value.trim();
    if (token && (op.security || []).length) headers.set('Authorization', 'Bearer ' + token);
    const init = { method: method.toUpperCase(), headers };
    if (textarea && textarea.value.trim()) {
      headers.set('Content-Type', typeSelect ? typeSelect.value : types[0]);
      init.body = textarea.value;
    }
    controller = new AbortController();
    init.signal = controller.signal;
    send.disabled = true;
    stop.hidden = false;
    await run(url, init, output);
    send.disabled = false;
    stop.hidden = true;
  });
  return form;
}

/** Sends the request and shows status, a few headers and the body (streamed as it comes). */
async function run(url, init, output) {
  output.hidden = false;
  const status = h('div', { class: 'status-line', text: `${init.method} ${url} …` });
  const pre = h('pre', {});
  clear(output).append(status, pre);
  try {
    const response = await fetch(url, init);
    const shown = ['content-type', 'retry-after', 'etag', 'allow']
      .filter((name) => response.headers.has(name))
      .map((name) => `${name}: ${response.headers.get(name)}`);
    status.textContent = `${response.status} ${response.statusText}`.trim();
    status.className = `status-line s${String(response.status)[0]}`;
    if (shown.length) output.insertBefore(h('div', { class: 'muted small', text: shown.join(' · ') }), pre);
    const type = response.headers.get('content-type') || '';
    if (!response.body) return;
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let text = '';
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      text += decoder.decode(value, { stream: true });
      if (text.length > SHOWN_BYTES) {
        text = text.slice(0, SHOWN_BYTES) + '\n… (cut)';
        await reader.cancel();
        break;
      }
      pre.textContent = text;
    }
    if (type.includes('json')) {
      try {
        text = JSON.stringify(JSON.parse(text), null, 2);
      } catch {
        // not complete JSON: show it as it came
      }
    }
    pre.textContent = text;
  } catch (err) {
    if (err.name === 'AbortError') {
      status.textContent += ' (stopped)';
    } else {
      status.textContent = `request failed: ${err.message}`;
      status.className = 'status-line s5';
    }
  }
}

// ---- page -----------------------------------------------------------------------------

function operationView({ path, method, op }) {
  const id = anchor('op', op.operationId || `${method}${path}`);
  const locked = needsToken(op);
  return h('details', { class: 'op', id },
    h('summary', {}, methodBadge(method), h('code', { class: 'path', text: path }),
      h('span', { class: 'summary' }, ...rich(op.summary || '')),
      locked ? h('span', { class: 'lock', title: 'needs a bearer token', text: 'token' }) : null),
    h('div', { class: 'op-body' },
      op.description ? h('p', {}, ...rich(op.description)) : null,
      (op.security || []).length
        ? h('p', { class: 'small muted' }, 'Auth: ', (op.security || []).map((req) => Object.keys(req).join(' + ') || 'none').join(' or '))
        : null,
      parametersView((op.parameters || []).map(resolve)),
      bodyView(op.requestBody),
      responsesView(op.responses),
      tryItView(path, method, op)));
}

function render() {
  const info = spec.info || {};
  $('title').textContent = `${info.title || ''} API reference`;
  $('version').textContent = `v${info.version || '?'} · OpenAPI ${spec.openapi}`;
  document.title = `${info.title || 'API'} API reference`;

  const groups = byTag(operations());
  const tagInfo = new Map((spec.tags || []).map((t) => [t.name, t]));
  const schemas = Object.entries((spec.components && spec.components.schemas) || {});

  clear($('toc')).append(
    ...groups.map(([tag, list]) => h('div', { class: 'toc-group' },
      h('a', { class: 'toc-tag', href: '#' + anchor('tag', tag), text: tag }),
      h('ul', {}, list.map(({ path, method, op }) => h('li', {},
        h('a', { href: '#' + anchor('op', op.operationId || `${method}${path}`) }, methodBadge(method), h('span', { text: path }))))))),
    h('div', { class: 'toc-group' }, h('a', { class: 'toc-tag', href: '#schemas', text: 'schemas' })),
  );

  clear($('content')).append(
    h('section', { class: 'intro' }, h('p', {}, ...rich(info.description))),
    ...groups.map(([tag, list]) => h('section', { class: 'tag', id: anchor('tag', tag) },
      h('h2', { text: tag }),
      tagInfo.get(tag) && tagInfo.get(tag).description ? h('p', { class: 'muted' }, ...rich(tagInfo.get(tag).description)) : null,
      list.map(operationView))),
    h('section', { class: 'tag', id: 'schemas' },
      h('h2', { text: 'Schemas' }),
      schemas.map(([name, schema]) => h('div', { class: 'schema-def', id: anchor('schema', name) },
        h('h3', { text: name }),
        schema.description ? h('p', {}, ...rich(schema.description)) : null,
        schemaView(schema)))),
  );

  // A link to an operation opens its details (the page was empty when the browser
  // first looked for the anchor, so scroll to it now).
  const open = () => {
    const target = location.hash && document.getElementById(location.hash.slice(1));
    if (!target) return;
    if (target.tagName === 'DETAILS') target.open = true;
    target.scrollIntoView();
  };
  window.addEventListener('hashchange', open);
  open();
}

async function main() {
  const token = $('token');
  token.value = savedToken();
  token.addEventListener('change', () => sessionStorage.setItem(TOKEN_KEY, token.value.trim()));
  try {
    const response = await fetch('/openapi.json');
    if (!response.ok) throw new Error(`GET /openapi.json answered ${response.status}`);
    spec = await response.json();
    render();
  } catch (err) {
    clear($('content')).append(h('p', { class: 'error', text: `Could not load the API document: ${err.message}` }));
  }
}

main();
