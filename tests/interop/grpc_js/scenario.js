// The interoperability scenario (tests/interop/scenario.py describes the steps and judges the result) on
// grpc-js, Node's gRPC stack, with the etcd protos from the repository loaded by @grpc/proto-loader.
//
//   node scenario.js '<params json>'   → one JSON object on stdout
'use strict';

const http = require('http');
const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const CALL_TIMEOUT_MS = 30000; // calls that must not hang (not the ones that test deadlines)
const CODE_NAMES = Object.fromEntries(Object.entries(grpc.status).map(([name, code]) => [code, name]));
const WATCH_GAUGES = ['etcd_debugging_mvcc_watch_stream_total', 'etcd_debugging_mvcc_watcher_total'];

function loadStubs(protoDir, endpoint) {
  const def = protoLoader.loadSync(
    ['fastetcd/proto/rpc.proto', 'fastetcd/proto/v3lock.proto'],
    // longs as strings: lease ids use all 64 bits, past what a JS number holds exactly.
    { includeDirs: [protoDir], keepCase: true, longs: String, enums: String, bytes: Buffer, defaults: true,
      oneofs: true },
  );
  const pkg = grpc.loadPackageDefinition(def);
  // One channel (one HTTP/2 connection) for every service; grpc-js's default send limit is unlimited
  // already, the oversize step relies on it, so say it.
  const kv = new pkg.etcdserverpb.KV(endpoint, grpc.credentials.createInsecure(),
    { 'grpc.max_send_message_length': -1 });
  const channelOverride = kv.getChannel();
  return {
    kv,
    watch: new pkg.etcdserverpb.Watch(endpoint, grpc.credentials.createInsecure(), { channelOverride }),
    lease: new pkg.etcdserverpb.Lease(endpoint, grpc.credentials.createInsecure(), { channelOverride }),
    lock: new pkg.v3lockpb.Lock(endpoint, grpc.credentials.createInsecure(), { channelOverride }),
  };
}

function call(client, method, request, deadlineMs = CALL_TIMEOUT_MS) {
  return new Promise((resolve, reject) => {
    client[method](request, { deadline: Date.now() + deadlineMs }, (err, resp) => (err ? reject(err) : resolve(resp)));
  });
}

function status(err) {
  if (err.code === undefined) throw err;
  return { code: CODE_NAMES[err.code], message: err.details };
}

async function statusOf(promise) {
  try {
    await promise;
    return { code: 'OK', message: '' };
  } catch (err) {
    return status(err);
  }
}

function prefixEnd(key) {
  const end = Buffer.from(key);
  for (let i = end.length - 1; i >= 0; i--) {
    if (end[i] < 0xff) {
      end[i]++;
      return end.subarray(0, i + 1);
    }
  }
  return Buffer.from([0]);
}

const b = (s) => Buffer.from(s);
const kvOut = (x) => ({ key: x.key.toString(), value: x.value.toString(), create_revision: Number(x.create_revision),
  mod_revision: Number(x.mod_revision), version: Number(x.version) });
const eventOut = (ev) => [ev.type, ev.kv.key.toString(), ev.kv.value.toString(), Number(ev.kv.create_revision),
  Number(ev.kv.mod_revision), Number(ev.kv.version)];
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

function gauges(metricsUrl) {
  return new Promise((resolve, reject) => {
    http.get(metricsUrl + '/metrics', (res) => {
      let text = '';
      res.setEncoding('utf8');
      res.on('data', (chunk) => { text += chunk; });
      res.on('end', () => {
        resolve(WATCH_GAUGES.map((name) => {
          const m = text.match(new RegExp(`^${name} (\\S+)$`, 'm'));
          if (!m) reject(new Error(`${name} missing from ${metricsUrl}/metrics`));
          return Number(m && m[1]);
        }));
      });
    }).on('error', reject);
  });
}

async function gaugesBackTo(p, base) {
  const until = Date.now() + p.settle_s * 1000;
  for (;;) {
    const now = await gauges(p.metrics_url);
    if (now.every((v, i) => v === base[i]) || Date.now() >= until) return now;
    await sleep(50);
  }
}

// A Watch stream whose responses are read in order with next(); ends with the call's status.
class WatchCall {
  constructor(stub, options = {}) {
    this.call = stub.Watch(options);
    this.queue = [];
    this.waiters = [];
    this.end = null;
    this.call.on('data', (resp) => this.push({ resp }));
    this.call.on('error', (err) => this.push({ err }));
    this.call.on('end', () => this.push({ done: true }));
  }

  push(item) {
    if (this.end) return;
    if (!item.resp) this.end = item;
    const waiter = this.waiters.shift();
    if (waiter) waiter(item);
    else this.queue.push(item);
  }

  // The next response; throws the call's error, or returns null once the call ended OK.
  async next() {
    const item = this.queue.length ? this.queue.shift() : await new Promise((resolve) => this.waiters.push(resolve));
    if (item.err) throw item.err;
    return item.done ? null : item.resp;
  }

  send(request) {
    this.call.write(request);
  }

  cancel() {
    this.call.cancel();
  }
}

// protobufjs writes a field that is set even when it holds proto3's default; leave defaults out, so the
// request is byte for byte what the other stacks send (the oversize step's expected size depends on it).
function create(key, rangeEnd, startRevision = 0) {
  const req = { key };
  if (rangeEnd.length) req.range_end = rangeEnd;
  if (startRevision) req.start_revision = String(startRevision);
  return { create_request: req };
}

async function readEvents(w, n) {
  const events = [];
  const responses = [];
  while (events.length < n) {
    const resp = await w.next();
    if (resp === null) throw new Error(`watch ended after ${events.length} of ${n} events`);
    if (resp.events.length) {
      events.push(...resp.events.map(eventOut));
      responses.push([Number(resp.header.revision), resp.events.length]);
    }
  }
  return { events, responses };
}

async function unary(p, s) {
  const pre = p.prefix + 'unary/';
  const a = b(pre + 'a');
  const bk = b(pre + 'b');
  const out = {};
  let r = await call(s.kv, 'Put', { key: a, value: b('1') });
  out.put = { revision: Number(r.header.revision) };
  r = await call(s.kv, 'Put', { key: a, value: b('2'), prev_kv: true });
  out.put_prev = { revision: Number(r.header.revision), prev_value: r.prev_kv.value.toString() };
  r = await call(s.kv, 'Range', { key: a });
  out.range = { revision: Number(r.header.revision), count: Number(r.count), kvs: r.kvs.map(kvOut) };
  const txns = [
    ['txn_success', '2', [{ request_put: { key: bk, value: b('3') } }, { request_range: { key: a } }], []],
    ['txn_failure', 'x', [], [{ request_range: { key: bk } }]],
  ];
  for (const [name, want, success, failure] of txns) {
    r = await call(s.kv, 'Txn', {
      compare: [{ result: 'EQUAL', target: 'VALUE', key: a, value: b(want) }], success, failure,
    });
    out[name] = {
      revision: Number(r.header.revision),
      succeeded: r.succeeded,
      responses: r.responses.map((op) => op.response),
      range_kvs: r.responses.filter((op) => op.response_range).flatMap((op) => op.response_range.kvs.map(kvOut)),
    };
  }
  r = await call(s.kv, 'DeleteRange', { key: b(pre), range_end: prefixEnd(pre), prev_kv: true });
  out.delete = { revision: Number(r.header.revision), deleted: Number(r.deleted),
    prev_keys: r.prev_kvs.map((x) => x.key.toString()) };
  r = await call(s.kv, 'Range', { key: b(pre), range_end: prefixEnd(pre), count_only: true });
  out.range_after_delete = { revision: Number(r.header.revision), count: Number(r.count) };
  out.empty_key = await statusOf(call(s.kv, 'Range', { key: b('') }));
  const puts = [];
  for (let i = 0; i < p.concurrent; i++) puts.push(call(s.kv, 'Put', { key: b(`${pre}c/${i}`), value: b('c') }));
  out.concurrent_revisions = (await Promise.all(puts)).map((x) => Number(x.header.revision)).sort((x, y) => x - y);
  return out;
}

async function watch(p, s) {
  const pre = b(p.prefix + 'watch/');
  const end = prefixEnd(pre);
  const out = { gauges_base: await gauges(p.metrics_url) };

  const live = new WatchCall(s.watch);
  live.send(create(pre, end));
  const first = await live.next();
  if (!first.created) throw new Error('the first watch response is not "created"');
  const revs = [];
  for (let j = 0; j < p.events / p.txn_ops; j++) {
    const success = [];
    for (let i = j * p.txn_ops; i < (j + 1) * p.txn_ops; i++) {
      const key = `${p.prefix}watch/${String(i).padStart(5, '0')}`;
      success.push({ request_put: { key: b(key), value: b(`v${i}-` + 'x'.repeat(p.value_pad)) } });
    }
    revs.push(Number((await call(s.kv, 'Txn', { success })).header.revision));
  }
  out.txn_revisions = revs;
  out.live = await readEvents(live, p.events);
  live.send({ cancel_request: { watch_id: first.watch_id } });
  let resp;
  do {
    resp = await live.next();
  } while (resp !== null && !resp.canceled);
  out.cancel_request = {
    canceled: resp !== null && resp.canceled,
    same_watch_id: resp !== null && resp.watch_id === first.watch_id,
  };
  live.cancel();

  const history = new WatchCall(s.watch);
  history.send(create(pre, end, revs[0]));
  out.history = await readEvents(history, p.events);
  history.cancel();

  const mid = new WatchCall(s.watch);
  mid.send(create(pre, end, revs[0]));
  const got = await readEvents(mid, 1);
  mid.cancel();
  let code = 'OK';
  try {
    while ((await mid.next()) !== null);
  } catch (err) {
    code = status(err).code;
  }
  out.midstream = { events_before_cancel: got.events.length, code };
  out.gauges_after = await gaugesBackTo(p, out.gauges_base);
  const r = await call(s.kv, 'Range', { key: pre, range_end: end, count_only: true });
  out.served_after = { count: Number(r.count) };
  return out;
}

async function timed(fn) {
  const t0 = process.hrtime.bigint();
  let got;
  try {
    await fn();
    got = { code: 'OK', message: '' };
  } catch (err) {
    got = status(err);
  }
  got.elapsed_ms = Math.round(Number(process.hrtime.bigint() - t0) / 1e6);
  return got;
}

async function deadline(p, s) {
  const name = b(p.prefix + 'deadline/lock');
  const waiters = b(p.prefix + 'deadline/lock/');
  const out = { gauges_base: await gauges(p.metrics_url) };
  const l1 = (await call(s.lease, 'LeaseGrant', { TTL: 60 })).ID;
  const l2 = (await call(s.lease, 'LeaseGrant', { TTL: 60 })).ID;
  out.lock_key = (await call(s.lock, 'Lock', { name, lease: l1 })).key.toString();
  out.lock_deadline = await timed(() => call(s.lock, 'Lock', { name, lease: l2 }, p.deadline_ms));
  const lockKeys = async () =>
    Number((await call(s.kv, 'Range', { key: waiters, range_end: prefixEnd(waiters), count_only: true })).count);
  const until = Date.now() + p.settle_s * 1000;
  while ((await lockKeys()) !== 1 && Date.now() < until) await sleep(50);
  out.lock_keys_after = await lockKeys();

  let created = false;
  const got = await timed(async () => {
    const w = new WatchCall(s.watch, { deadline: Date.now() + p.deadline_ms });
    w.send(create(name, b('')));
    for (let resp = await w.next(); resp !== null; resp = await w.next()) {
      if (resp.created) created = true;
    }
  });
  out.watch_deadline = { created, ...got };
  out.gauges_after = await gaugesBackTo(p, out.gauges_base);
  for (const ID of [l1, l2]) await call(s.lease, 'LeaseRevoke', { ID });
  out.served_after = { count: await lockKeys() };
  return out;
}

async function oversize(p, s) {
  const pre = p.prefix + 'oversize/';
  const out = {};
  const puts = [['too_large', p.too_large_value, 'big'], ['over_grpc', p.over_grpc_value, 'huge']];
  for (const [name, size, key] of puts) {
    out[name] = [];
    for (let i = 0; i < p.oversize_repeats; i++) {
      out[name].push(await statusOf(call(s.kv, 'Put', { key: b(pre + key), value: Buffer.alloc(size, 'x') })));
    }
  }
  out.watch_over_grpc = await statusOf((async () => {
    const w = new WatchCall(s.watch, { deadline: Date.now() + CALL_TIMEOUT_MS });
    w.send(create(Buffer.alloc(p.over_grpc_value, 'x'), b('')));
    w.call.end();
    while ((await w.next()) !== null);
  })());
  for (let i = 0; i < p.big_values; i++) {
    await call(s.kv, 'Put', { key: b(`${pre}r/${i}`), value: Buffer.alloc(p.big_value, 'x') });
  }
  const big = b(pre + 'r/');
  const got = await statusOf(call(s.kv, 'Range', { key: big, range_end: prefixEnd(big) }));
  out.response_over_client_limit = { code: got.code };
  const r = await call(s.kv, 'Range', { key: b(pre), range_end: prefixEnd(pre), count_only: true });
  out.served_after = { count: Number(r.count) };
  return out;
}

async function main() {
  const p = JSON.parse(process.argv[2]);
  const s = loadStubs(path.resolve(p.proto_dir), p.endpoint);
  const version = require('@grpc/grpc-js/package.json').version;
  const result = { client: `grpc-js ${version}` };
  result.unary = await unary(p, s);
  result.watch = await watch(p, s);
  result.deadline = await deadline(p, s);
  result.oversize = await oversize(p, s);
  s.kv.close();
  // Exit only once the pipe took all of it: process.exit would cut a large write short.
  await new Promise((resolve) => process.stdout.write(JSON.stringify(result) + '\n', resolve));
}

main().then(() => process.exit(0), (err) => {
  process.stderr.write(`${err && err.stack ? err.stack : err}\n`);
  process.exit(1);
});
