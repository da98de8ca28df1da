#!/usr/bin/env node
"use strict";
/*
 * A Cosmos DB-compatible test server for fastetcd's Cosmos store.
 *
 * It runs @vercel/cosmosdb-server in-process for what that package gets right (account, databases,
 * containers, partition key ranges, the SQL engine) and replaces its document layer, because the stock
 * one differs from Azure Cosmos DB exactly where the store depends on it (tests/cosmos_server/README.md
 * lists the differences): atomic transactional batches of every operation kind, 404s, partition-scoped
 * queries, an incremental change feed, TTL, size limits, keep-alive and plain-HTTP endpoints. It adds
 * runtime fault injection (POST /_fault) and request statistics (GET /_stats).
 *
 * Usage: node server.js [--port 0] [--host 127.0.0.1] [--tls] [--exit-with-stdin] [--log-requests]
 * When listening it prints one JSON line on stdout: {"ready": true, "port": ..., "endpoint": ...}.
 */

const crypto = require("crypto");
const fs = require("fs");
const http = require("http");
const https = require("https");
const path = require("path");

const Account = require("@vercel/cosmosdb-server/lib/account").default;
const packageRoutes = require("@vercel/cosmosdb-server/lib/routes").default;
const ResourceId = require("@vercel/cosmosdb-server/lib/account/resource-id").default;
const cosmosQuery = require("@zeit/cosmosdb-query").default;
const { SyntaxError: QuerySyntaxError } = require("@zeit/cosmosdb-query");

const { effectivePartitionKey } = require("./epk");

// Azure Cosmos DB service limits (https://learn.microsoft.com/azure/cosmos-db/concepts-limits).
const MAX_ITEM_BYTES = 2 * 1024 * 1024;
const MAX_REQUEST_BYTES = 2 * 1024 * 1024;
const MAX_BATCH_OPERATIONS = 100;
const MAX_PATCH_OPERATIONS = 10;
const MAX_ID_LENGTH = 255;
// One physical partition covers the whole hash range; the SDK routes every request to range "0".
const PK_RANGE_ID = "0";
const PK_RANGE_MIN = "";
const PK_RANGE_MAX = "FF";

// Request units are not modelled; these are in the range real Cosmos charges for ~1 KB items so that
// code reading x-ms-request-charge sees plausible numbers.
// Properties the service owns; clients cannot set them (other "_x" properties are user data).
const SYSTEM_PROPERTIES = new Set(["_rid", "_self", "_etag", "_attachments", "_ts", "_lsn"]);

const CHARGE = { read: 1.0, write: 5.71, query: 2.83, changefeed: 1.0, readfeed: 1.0, meta: 1.0, patch: 10.29 };

function parseArgs(argv) {
  const args = { port: 0, host: "127.0.0.1", tls: false, exitWithStdin: false, logRequests: false };
  for (let i = 0; i < argv.length; i += 1) {
    const a = argv[i];
    if (a === "--port" || a === "-p") args.port = parseInt(argv[++i], 10);
    else if (a === "--host") args.host = argv[++i];
    else if (a === "--tls") args.tls = true;
    else if (a === "--exit-with-stdin") args.exitWithStdin = true;
    else if (a === "--log-requests") args.logRequests = true;
    else if (a === "--help" || a === "-h") {
      process.stdout.write("usage: server.js [--port N] [--host H] [--tls] [--exit-with-stdin] [--log-requests]\n");
      process.exit(0);
    } else {
      process.stderr.write(`unknown argument ${a}\n`);
      process.exit(2);
    }
  }
  return args;
}

class HttpError extends Error {
  constructor(status, code, message, substatus = 0) {
    super(message);
    this.status = status;
    this.code = code;
    this.substatus = substatus;
  }
}

const notFound = () =>
  new HttpError(404, "NotFound", "Entity with the specified id does not exist in the system.");
const preconditionFailed = () =>
  new HttpError(412, "PreconditionFailed",
    "Operation cannot be performed because one of the specified precondition is not met.");
const conflict = () =>
  new HttpError(409, "Conflict", "Entity with the specified id already exists in the system.");
const badRequest = (message) => new HttpError(400, "BadRequest", message);
const tooLarge = () => new HttpError(413, "RequestEntityTooLarge", "Request size is too large");

function newEtag() {
  // Real etags are quoted strings; keeping the quotes catches code that strips or rebuilds them.
  return `"${crypto.randomUUID()}"`;
}

function getValue(keys, obj) {
  let cur = obj;
  for (const k of keys) {
    if (cur === null || typeof cur !== "object") return undefined;
    cur = cur[k];
  }
  return cur;
}

function firstHeader(req, name) {
  const v = req.headers[name];
  return Array.isArray(v) ? v[0] : v;
}

function trueHeader(req, name) {
  const v = firstHeader(req, name);
  return typeof v === "string" && v.toLowerCase() === "true";
}

/* ------------------------------------------------------------------------------------------------ */
/* Document storage                                                                                  */
/* ------------------------------------------------------------------------------------------------ */

// One per container (keyed by the container's _rid, which survives a container replace).
class ContainerState {
  constructor(dbId, collId, rid) {
    this.dbId = dbId;
    this.collId = collId;
    this.rid = rid;
    this.partitions = new Map(); // pkKey -> Map(id -> Entry)
    this.lsn = 0; // last committed transaction
    this.log = []; // {lsn, pkKey, id, mtime} in commit order; stale entries skipped on read
    this.live = 0;
    this.ridCount = 0;
    this.lastMtime = 0;
  }

  partition(pkKey) {
    return this.partitions.get(pkKey);
  }

  docRid() {
    this.ridCount += 1;
    try {
      const idBuffer = Buffer.alloc(8, 0);
      idBuffer.writeInt32LE(this.ridCount, 0);
      idBuffer.writeInt8(ResourceId.DocumentByte << 4, 7);
      const rid = ResourceId.parse(this.rid);
      rid.document = ResourceId.bigNumberReadIntBE(idBuffer, 0, 8).toString();
      return rid.toString();
    } catch (err) {
      return `${this.rid}${this.ridCount}`;
    }
  }

  // Applies staged writes as one transaction: one LSN, one timestamp, change feed entries in op order.
  commit(pkKey, writes, now) {
    if (writes.length === 0) return;
    this.lsn += 1;
    const mtime = Math.max(now, this.lastMtime);
    this.lastMtime = mtime;
    let part = this.partitions.get(pkKey);
    if (!part) {
      part = new Map();
      this.partitions.set(pkKey, part);
    }
    for (const w of writes) {
      const had = part.has(w.id);
      if (w.doc === null) {
        if (had) {
          part.delete(w.id);
          this.live -= 1;
        }
        continue;
      }
      w.doc._ts = Math.floor(mtime / 1000);
      part.set(w.id, { doc: w.doc, lsn: this.lsn, mtime, pkKey, epk: undefined });
      if (!had) this.live += 1;
      this.log.push({ lsn: this.lsn, pkKey, id: w.id, mtime });
    }
    if (part.size === 0) this.partitions.delete(pkKey);
    if (this.log.length > 2 * this.live + 1024) this.compactLog();
  }

  compactLog() {
    this.log = this.log.filter((e) => {
      const cur = this.partitions.get(e.pkKey);
      const entry = cur && cur.get(e.id);
      return entry && entry.lsn === e.lsn;
    });
  }

  // Removes an item without a change feed record (TTL expiry: the latest-version feed never shows deletes).
  purge(pkKey, id) {
    const part = this.partitions.get(pkKey);
    if (part && part.delete(id)) {
      this.live -= 1;
      if (part.size === 0) this.partitions.delete(pkKey);
    }
  }
}

class Server {
  constructor(args) {
    this.args = args;
    this.account = null;
    this.states = new Map(); // collection _rid -> ContainerState
    this.faultRules = [];
    this.seenSockets = new WeakSet();
    this.resetStats();
  }

  resetStats() {
    this.stats = {
      since: new Date().toISOString(),
      total: 0,
      by_kind: {},
      by_status: {},
      faults_injected: {},
      batch_operations: 0,
      bytes_in: 0,
      connections_opened: 0,
    };
    this.seenSockets = new WeakSet();
  }

  /* -------------------------------------------- containers -------------------------------------- */

  // Returns {coll, state}; throws 404 if the database or container does not exist.
  container(dbId, collId) {
    const db = this.account.database(dbId);
    if (!db.read()) throw new HttpError(404, "NotFound", `Database ${dbId} does not exist.`, 1003);
    const collection = db.collection(collId);
    const coll = collection.read();
    if (!coll) throw new HttpError(404, "NotFound", `Container ${collId} does not exist.`, 1003);
    let state = this.states.get(coll._rid);
    if (!state) {
      state = new ContainerState(db.read().id, coll.id, coll._rid);
      this.states.set(coll._rid, state);
    }
    return { coll, state };
  }

  pkPaths(coll) {
    const paths = (coll.partitionKey && coll.partitionKey.paths) || [];
    return paths.filter((p) => p !== "/_partitionKey");
  }

  // The partition key as the comparable string used for storage, from a document body.
  pkKeyOfDoc(coll, doc) {
    const values = this.pkPaths(coll).map((p) => {
      const v = getValue(p.slice(1).split("/"), doc);
      return v === undefined ? {} : v;
    });
    return JSON.stringify(values);
  }

  // The partition key from the x-ms-documentdb-partitionkey header ('["a"]', '[{}]' = undefined, '[]').
  pkKeyOfHeader(coll, req, required) {
    const raw = firstHeader(req, "x-ms-documentdb-partitionkey");
    if (raw === undefined) {
      if (required && this.pkPaths(coll).length > 0) {
        throw badRequest("PartitionKey value must be supplied for this operation.");
      }
      return null;
    }
    let parsed;
    try {
      parsed = JSON.parse(raw);
    } catch (err) {
      throw badRequest(`The partition key supplied in x-ms-partitionkey header has invalid format: ${raw}`);
    }
    if (!Array.isArray(parsed)) parsed = [parsed];
    const paths = this.pkPaths(coll);
    if (parsed.length === 0 && paths.length === 0) return "[]";
    if (parsed.length !== paths.length) {
      throw badRequest("Partition key provided either doesn't correspond to definition in the collection " +
        "or doesn't match partition key field values specified in the document.");
    }
    return JSON.stringify(parsed);
  }

  epkOf(coll, pkKey) {
    const kind = (coll.partitionKey && coll.partitionKey.kind) || "Hash";
    const version = (coll.partitionKey && coll.partitionKey.version) || 1;
    try {
      return effectivePartitionKey(JSON.parse(pkKey), kind, version);
    } catch (err) {
      throw badRequest(`This test server cannot place items by effective partition key: ${err.message}`);
    }
  }

  expiresAt(coll, entry) {
    const defaultTtl = coll.defaultTtl;
    // With TTL off on the container, item ttl values are ignored, as in Cosmos.
    if (defaultTtl === undefined || defaultTtl === null) return Infinity;
    let ttl = defaultTtl;
    const itemTtl = entry.doc.ttl;
    if (itemTtl !== undefined && itemTtl !== null) ttl = itemTtl;
    if (ttl === -1) return Infinity;
    return entry.mtime + ttl * 1000;
  }

  alive(coll, entry, now) {
    return entry !== undefined && entry !== null && now < this.expiresAt(coll, entry);
  }

  liveEntry(coll, state, pkKey, id, now) {
    const part = state.partition(pkKey);
    const entry = part && part.get(id);
    if (!entry) return null;
    if (!this.alive(coll, entry, now)) {
      state.purge(pkKey, id);
      return null;
    }
    return entry;
  }

  sweepExpired() {
    const now = Date.now();
    for (const [rid, state] of this.states) {
      const db = this.account.database(state.dbId).read() ? this.account.database(state.dbId) : null;
      const coll = db && db.collection(state.collId).read();
      if (!coll || coll._rid !== rid) {
        this.states.delete(rid);
        continue;
      }
      if (coll.defaultTtl === undefined || coll.defaultTtl === null) continue;
      for (const [pkKey, part] of [...state.partitions]) {
        for (const [id, entry] of [...part]) {
          if (!this.alive(coll, entry, now)) state.purge(pkKey, id);
        }
      }
    }
  }

  /* -------------------------------------------- operations -------------------------------------- */

  validateDoc(coll, doc, pkKey) {
    if (doc === null || typeof doc !== "object" || Array.isArray(doc)) {
      throw badRequest("The input content is invalid because the required properties - 'id; ' - are missing");
    }
    if (typeof doc.id !== "string" || doc.id.length === 0) {
      throw badRequest("The input content is invalid because the required properties - 'id; ' - are missing");
    }
    if (doc.id.length > MAX_ID_LENGTH) throw badRequest("The id is too long (more than 255 characters).");
    if (/[/\\?#]/.test(doc.id)) {
      throw badRequest("The input name is invalid. Ensure to provide a unique non-empty string less than " +
        "'255' characters and without '/', '\\\\', '?', '#'.");
    }
    if (doc.ttl !== undefined && doc.ttl !== null &&
        !(Number.isInteger(doc.ttl) && (doc.ttl > 0 || doc.ttl === -1))) {
      throw badRequest("The value of the 'ttl' property must be a positive integer or -1.");
    }
    if (pkKey !== null && this.pkKeyOfDoc(coll, doc) !== pkKey) {
      throw badRequest("PartitionKey extracted from document doesn't match the one specified in the header.");
    }
    if (Buffer.byteLength(JSON.stringify(doc)) > MAX_ITEM_BYTES) throw tooLarge();
  }

  // Builds the stored form of a document: user properties plus system properties.
  stored(state, doc, previous) {
    const out = {};
    for (const [k, v] of Object.entries(doc)) {
      if (!SYSTEM_PROPERTIES.has(k)) out[k] = v;
    }
    const rid = previous ? previous.doc._rid : state.docRid();
    out._rid = rid;
    out._self = `dbs/${state.rid.slice(0, 8)}/colls/${state.rid}/docs/${rid}/`;
    out._etag = newEtag();
    out._attachments = "attachments/";
    out._ts = 0; // set at commit
    return out;
  }

  // Runs one operation against a staged view of one logical partition (a batch shares the view).
  // Returns {status, doc}.
  applyOp(view, op) {
    const { coll, state, pkKey } = view;
    const kind = op.operationType;
    const ifMatch = op.ifMatch;
    const ifNoneMatch = op.ifNoneMatch;
    switch (kind) {
      case "Create": {
        this.validateDoc(coll, op.resourceBody, pkKey);
        if (view.get(op.resourceBody.id)) throw conflict();
        const doc = this.stored(state, op.resourceBody, null);
        view.put(doc.id, doc);
        return { status: 201, doc };
      }
      case "Upsert": {
        this.validateDoc(coll, op.resourceBody, pkKey);
        const current = view.get(op.resourceBody.id);
        // If-Match only constrains an existing item; an absent one is created (Cosmos semantics).
        if (current && ifMatch && ifMatch !== current.doc._etag) throw preconditionFailed();
        const doc = this.stored(state, op.resourceBody, current);
        view.put(doc.id, doc);
        return { status: current ? 200 : 201, doc };
      }
      case "Replace": {
        this.validateDoc(coll, op.resourceBody, pkKey);
        if (op.id !== undefined && op.id !== op.resourceBody.id) {
          throw badRequest("The id in the request URI does not match the id in the document.");
        }
        const current = view.get(op.resourceBody.id);
        if (!current) throw notFound();
        if (ifMatch && ifMatch !== current.doc._etag) throw preconditionFailed();
        const doc = this.stored(state, op.resourceBody, current);
        view.put(doc.id, doc);
        return { status: 200, doc };
      }
      case "Read": {
        const current = view.get(op.id);
        if (!current) throw notFound();
        if (ifNoneMatch && (ifNoneMatch === "*" || ifNoneMatch === current.doc._etag)) {
          return { status: 304, doc: null };
        }
        if (ifMatch && ifMatch !== current.doc._etag) throw preconditionFailed();
        return { status: 200, doc: current.doc };
      }
      case "Delete": {
        const current = view.get(op.id);
        if (!current) throw notFound();
        if (ifMatch && ifMatch !== current.doc._etag) throw preconditionFailed();
        view.del(op.id);
        return { status: 204, doc: null };
      }
      case "Patch": {
        const body = op.resourceBody || {};
        const ops = Array.isArray(body) ? body : body.operations;
        if (!Array.isArray(ops) || ops.length === 0) {
          throw badRequest("Invalid patch request: check syntax of patch specification.");
        }
        if (ops.length > MAX_PATCH_OPERATIONS) {
          throw badRequest(`The number of patch operations can't exceed ${MAX_PATCH_OPERATIONS}.`);
        }
        const current = view.get(op.id);
        if (!current) throw notFound();
        if (ifMatch && ifMatch !== current.doc._etag) throw preconditionFailed();
        if (body.condition && !this.matchesCondition(current.doc, body.condition)) throw preconditionFailed();
        const patched = applyPatch(JSON.parse(JSON.stringify(current.doc)), ops, this.pkPaths(coll));
        this.validateDoc(coll, patched, pkKey);
        const doc = this.stored(state, patched, current);
        view.put(doc.id, doc);
        return { status: 200, doc };
      }
      default:
        throw badRequest(`Operation type '${kind}' is not supported in Batch.`);
    }
  }

  matchesCondition(doc, condition) {
    let sql = condition.trim();
    if (/^from\s/i.test(sql)) sql = `SELECT * ${sql}`;
    else if (/^where\s/i.test(sql)) sql = `SELECT * FROM c ${sql}`;
    try {
      return compiledQuery(sql).exec([doc], {}).result.length > 0;
    } catch (err) {
      throw badRequest(`Invalid condition in patch request: ${err.message}`);
    }
  }

  view(coll, state, pkKey, now) {
    const staged = new Map(); // id -> {doc} | null (deleted)
    const order = [];
    const self = this;
    return {
      coll,
      state,
      pkKey,
      get(id) {
        if (staged.has(id)) return staged.get(id);
        return self.liveEntry(coll, state, pkKey, id, now);
      },
      put(id, doc) {
        staged.set(id, { doc });
        order.push(id);
      },
      del(id) {
        staged.set(id, null);
        order.push(id);
      },
      commit() {
        // Each id once, at the position of its last write, so the change feed shows op order.
        const last = new Map();
        order.forEach((id, i) => last.set(id, i));
        const writes = order
          .filter((id, i) => last.get(id) === i)
          .map((id) => ({ id, doc: staged.get(id) ? staged.get(id).doc : null }));
        state.commit(pkKey, writes, Date.now());
      },
    };
  }

  /* -------------------------------------------- handlers ---------------------------------------- */

  async handleDocuments(ctx, params) {
    const { req } = ctx;
    const { coll, state } = this.container(params.dbId, params.collId);
    const method = req.method;
    const now = Date.now();

    if (params.docId === undefined) {
      if (method === "POST") {
        if (ctx.kind === "batch") return this.handleBatch(ctx, coll, state);
        if (ctx.kind === "query") return this.handleQuery(ctx, coll, state, now);
        // create or upsert
        const body = ctx.json();
        if (body.length > MAX_REQUEST_BYTES) throw tooLarge();
        const pkKey = this.pkKeyOfHeader(coll, req, true);
        const doc = body.value;
        const opType = trueHeader(req, "x-ms-documentdb-is-upsert") ? "Upsert" : "Create";
        const key = pkKey !== null ? pkKey : this.pkKeyOfDoc(coll, doc || {});
        const view = this.view(coll, state, key, now);
        const result = this.applyOp(view, {
          operationType: opType,
          resourceBody: doc,
          ifMatch: firstHeader(req, "if-match"),
        });
        view.commit();
        return this.docResponse(ctx, result, CHARGE.write);
      }
      if (method === "GET") {
        if (req.headers["a-im"]) return this.handleChangeFeed(ctx, coll, state, now);
        return this.handleReadFeed(ctx, coll, state, now);
      }
      throw new HttpError(405, "MethodNotAllowed", `${method} is not supported on documents.`);
    }

    const pkKey = this.pkKeyOfHeader(coll, req, true);
    const key = pkKey !== null ? pkKey : "[]"; // null only for a container without a partition key
    const view = this.view(coll, state, key, now);
    const ifMatch = firstHeader(req, "if-match");
    let result;
    let charge = CHARGE.write;
    if (method === "GET") {
      result = this.applyOp(view, {
        operationType: "Read",
        id: params.docId,
        ifMatch,
        ifNoneMatch: firstHeader(req, "if-none-match"),
      });
      charge = CHARGE.read;
    } else if (method === "PUT") {
      const body = ctx.json();
      if (body.length > MAX_REQUEST_BYTES) throw tooLarge();
      result = this.applyOp(view, { operationType: "Replace", id: params.docId, resourceBody: body.value, ifMatch });
    } else if (method === "DELETE") {
      result = this.applyOp(view, { operationType: "Delete", id: params.docId, ifMatch });
    } else if (method === "PATCH") {
      result = this.applyOp(view, { operationType: "Patch", id: params.docId, resourceBody: ctx.json().value, ifMatch });
      charge = CHARGE.patch;
    } else {
      throw new HttpError(405, "MethodNotAllowed", `${method} is not supported on a document.`);
    }
    view.commit();
    return this.docResponse(ctx, result, charge);
  }

  docResponse(ctx, result, charge) {
    const headers = { "x-ms-request-charge": String(charge) };
    if (result.doc) headers.etag = result.doc._etag;
    const prefer = String(firstHeader(ctx.req, "prefer") || "");
    const minimal = /return=minimal/i.test(prefer) && ctx.req.method !== "GET";
    const body = result.doc && !minimal ? result.doc : undefined;
    return { status: result.status, headers, body };
  }

  handleBatch(ctx, coll, state) {
    const { req } = ctx;
    const raw = ctx.json();
    if (raw.length > MAX_REQUEST_BYTES) throw tooLarge();
    const ops = raw.value;
    if (!Array.isArray(ops)) throw badRequest("Invalid batch request body.");
    if (ops.length === 0) throw badRequest("Batch request has no operations.");
    if (ops.length > MAX_BATCH_OPERATIONS) {
      throw badRequest(`Batch request has more operations than what is supported (${MAX_BATCH_OPERATIONS}).`);
    }
    this.stats.batch_operations += ops.length;
    const pkKey = this.pkKeyOfHeader(coll, req, true);
    const key = pkKey !== null ? pkKey : "[]"; // null only for a container without a partition key
    // azure-cosmos always sends x-ms-cosmos-batch-atomic: True; every batch is treated as atomic.
    const view = this.view(coll, state, key, Date.now());
    const results = [];
    let failedAt = -1;
    for (let i = 0; i < ops.length; i += 1) {
      const op = ops[i] || {};
      try {
        const r = this.applyOp(view, op);
        const charge = op.operationType === "Read" ? CHARGE.read : CHARGE.write;
        const entry = { statusCode: r.status, requestCharge: charge };
        if (r.doc) {
          entry.eTag = r.doc._etag;
          entry.resourceBody = r.doc;
        }
        results.push(entry);
      } catch (err) {
        if (!(err instanceof HttpError)) throw err;
        if (err.status === 413) throw err; // the whole request is too large, as in Cosmos
        results.push({ statusCode: err.status, subStatusCode: err.substatus, requestCharge: 0,
          message: err.message });
        failedAt = i;
        break;
      }
    }
    const total = results.reduce((s, r) => s + r.requestCharge, 0);
    if (failedAt < 0) {
      view.commit();
      return { status: 200, headers: { "x-ms-request-charge": total.toFixed(2) }, body: results };
    }
    // All-or-nothing: nothing staged is applied; every other operation reports 424 Failed Dependency.
    const failed = results[failedAt];
    const body = ops.map((_, i) => (i === failedAt ? failed
      : { statusCode: 424, requestCharge: 0 }));
    return {
      status: 207,
      headers: { "x-ms-request-charge": total.toFixed(2), "x-ms-substatus": String(failed.subStatusCode || 0) },
      body,
    };
  }

  // The set of documents a query or feed request covers, by its partition headers.
  scopedEntries(ctx, coll, state, now) {
    const { req } = ctx;
    const pkKey = this.pkKeyOfHeader(coll, req, false);
    const rangeId = firstHeader(req, "x-ms-documentdb-partitionkeyrangeid");
    if (rangeId !== undefined && rangeId !== PK_RANGE_ID) {
      throw new HttpError(410, "Gone", `Partition key range ${rangeId} is gone.`, 1002);
    }
    const startEpk = firstHeader(req, "x-ms-start-epk");
    const endEpk = firstHeader(req, "x-ms-end-epk");
    const filter = this.entryFilter(coll, pkKey, startEpk, endEpk);
    const parts = pkKey !== null ? [state.partition(pkKey)].filter(Boolean) : [...state.partitions.values()];
    const out = [];
    for (const part of parts) {
      for (const entry of part.values()) {
        if (this.alive(coll, entry, now) && filter(entry)) out.push(entry);
      }
    }
    return { entries: out, filter };
  }

  entryFilter(coll, pkKey, startEpk, endEpk) {
    if (pkKey !== null) return (entry) => entry.pkKey === pkKey;
    if (startEpk !== undefined || endEpk !== undefined) {
      const lo = startEpk || PK_RANGE_MIN;
      const hi = endEpk || PK_RANGE_MAX;
      return (entry) => {
        if (entry.epk === undefined) entry.epk = this.epkOf(coll, entry.pkKey);
        return entry.epk >= lo && entry.epk < hi;
      };
    }
    return () => true;
  }

  pageHeaders(req) {
    const maxItemCount = parseInt(firstHeader(req, "x-ms-max-item-count") || "", 10);
    let continuation = null;
    const c = firstHeader(req, "x-ms-continuation");
    if (c) {
      try {
        continuation = JSON.parse(c);
      } catch (err) {
        throw badRequest("Invalid continuation token.");
      }
    }
    return { maxItemCount: maxItemCount > 0 ? maxItemCount : null, continuation };
  }

  runQuery(ctx, state, docs, query, parameters) {
    const { maxItemCount, continuation } = this.pageHeaders(ctx.req);
    let result;
    try {
      result = compiledQuery(query).exec(docs, { parameters, maxItemCount, continuation });
    } catch (err) {
      if (err instanceof QuerySyntaxError) throw badRequest(`Syntax error: ${err.message}`);
      throw badRequest(err.message);
    }
    const headers = { "x-ms-item-count": String(result.result.length) };
    if (result.continuation) headers["x-ms-continuation"] = JSON.stringify(result.continuation);
    return {
      status: 200,
      headers,
      body: { _rid: state.rid, Documents: result.result, _count: result.result.length },
    };
  }

  handleQuery(ctx, coll, state, now) {
    const { req } = ctx;
    const body = ctx.json().value || {};
    if (typeof body.query !== "string") throw badRequest("missing query");
    if (trueHeader(req, "x-ms-cosmos-is-query-plan-request")) return this.queryPlan(body.query);
    const { entries } = this.scopedEntries(ctx, coll, state, now);
    const docs = entries.map((e) => e.doc);
    const response = this.runQuery(ctx, state, docs, body.query, body.parameters);
    response.headers["x-ms-request-charge"] = String(CHARGE.query);
    return response;
  }

  // With a single physical partition the server computes the complete answer (ORDER BY, TOP,
  // aggregates) on that partition, so a plan with no client-side steps gives the SDK the right result.
  queryPlan(query) {
    try {
      compiledQuery(query);
    } catch (err) {
      throw badRequest(`Syntax error: ${err.message}`);
    }
    return {
      status: 200,
      headers: { "x-ms-request-charge": "0" },
      body: {
        partitionedQueryExecutionInfoVersion: 2,
        queryInfo: {
          distinctType: "None",
          top: null,
          offset: null,
          limit: null,
          orderBy: [],
          orderByExpressions: [],
          groupByExpressions: [],
          groupByAliases: [],
          aggregates: [],
          groupByAliasToAggregateType: {},
          rewrittenQuery: "",
          hasSelectValue: false,
          dCountInfo: null,
          hasNonStreamingOrderBy: false,
        },
        queryRanges: [{ min: PK_RANGE_MIN, max: PK_RANGE_MAX, isMinInclusive: true, isMaxInclusive: false }],
      },
    };
  }

  handleReadFeed(ctx, coll, state, now) {
    const { entries } = this.scopedEntries(ctx, coll, state, now);
    const response = this.runQuery(ctx, state, entries.map((e) => e.doc), "SELECT * FROM c", []);
    response.headers["x-ms-request-charge"] = String(CHARGE.readfeed);
    return response;
  }

  // Incremental ("latest version") change feed: every item changed after the continuation LSN, once,
  // at the position of its latest change; deletes and intermediate versions are not shown. The etag
  // header is the continuation; 304 when nothing changed.
  handleChangeFeed(ctx, coll, state, now) {
    const { req } = ctx;
    const aim = String(firstHeader(req, "a-im"));
    if (!/incremental feed/i.test(aim)) {
      throw badRequest(`Change feed mode '${aim}' is not supported by this test server.`);
    }
    const pkKey = this.pkKeyOfHeader(coll, req, false);
    const rangeId = firstHeader(req, "x-ms-documentdb-partitionkeyrangeid");
    if (rangeId !== undefined && rangeId !== PK_RANGE_ID) {
      throw new HttpError(410, "Gone", `Partition key range ${rangeId} is gone.`, 1002);
    }
    const filter = this.entryFilter(coll, pkKey, firstHeader(req, "x-ms-start-epk"), firstHeader(req, "x-ms-end-epk"));
    const { maxItemCount } = this.pageHeaders(req);
    const ifNoneMatch = firstHeader(req, "if-none-match");
    const ifModifiedSince = firstHeader(req, "if-modified-since");
    const log = state.log;
    let start = 0;
    if (ifNoneMatch === "*") {
      start = log.length; // start from now
    } else if (ifNoneMatch) {
      const since = parseInt(String(ifNoneMatch).replace(/"/g, ""), 10);
      if (Number.isNaN(since)) throw badRequest(`Invalid change feed continuation ${ifNoneMatch}.`);
      start = lowerBound(log, (e) => e.lsn > since);
    } else if (ifModifiedSince) {
      const t = Date.parse(ifModifiedSince);
      if (Number.isNaN(t)) throw badRequest(`Invalid If-Modified-Since ${ifModifiedSince}.`);
      // Cosmos compares at second granularity (_ts).
      start = lowerBound(log, (e) => Math.floor(e.mtime / 1000) >= Math.floor(t / 1000));
    }
    const limit = maxItemCount || 100;
    const docs = [];
    let lastLsn = null;
    for (let i = start; i < log.length; i += 1) {
      const e = log[i];
      // A transaction is never split across pages (Cosmos may exceed the page size to keep it whole).
      if (docs.length >= limit && e.lsn !== lastLsn) break;
      const part = state.partition(e.pkKey);
      const entry = part && part.get(e.id);
      if (!entry || entry.lsn !== e.lsn) continue; // superseded or deleted
      if (!this.alive(coll, entry, now) || !filter(entry)) continue;
      docs.push({ ...entry.doc, _lsn: entry.lsn });
      lastLsn = e.lsn;
    }
    let continuationLsn;
    if (docs.length >= limit && lastLsn !== null) continuationLsn = lastLsn;
    else continuationLsn = state.lsn;
    const etag = `"${continuationLsn}"`;
    const headers = {
      etag,
      "x-ms-request-charge": String(CHARGE.changefeed),
      "x-ms-item-count": String(docs.length),
      lsn: String(state.lsn),
    };
    if (docs.length === 0) return { status: 304, headers, body: undefined };
    return { status: 200, headers, body: { _rid: state.rid, Documents: docs, _count: docs.length } };
  }

  // The locations name the address the client used (the Host header), as a real account names its own
  // endpoint: a client behind a TCP proxy then keeps all its requests on the proxy (partition tests).
  handleAccount(host) {
    const data = JSON.parse(JSON.stringify(this.account.read()));
    const endpoint = host ? `${this.args.tls ? "https" : "http"}://${host}/` : this.endpoint();
    for (const loc of [...data.writableLocations, ...data.readableLocations]) {
      loc.databaseAccountEndpoint = endpoint;
    }
    return { status: 200, headers: {}, body: data };
  }

  endpoint() {
    const { address, port } = this.httpServer.address();
    const host = address === "0.0.0.0" || address === "::" ? "127.0.0.1" : address;
    return `${this.args.tls ? "https" : "http"}://${host.includes(":") ? `[${host}]` : host}:${port}/`;
  }

  // Everything else (databases, containers, partition key ranges, UDFs) is the package's, answered the
  // way the package's own request handler does.
  async handlePackageRoute(ctx) {
    const { req } = ctx;
    const route = packageRoutes(req);
    const fakeRes = new HeaderCollector();
    let body;
    if (!route) {
      return { status: 400, headers: {}, body: { code: "BadRequest", message: "no route" } };
    }
    const [params, handler] = route;
    const deletesContainers = req.method === "DELETE" && Object.keys(params).every((k) => k === "dbId" || k === "collId");
    if (deletesContainers) this.forgetContainers(params.dbId, params.collId);
    body = await handler(this.account, ctx.bodyStream(), fakeRes, params);
    let status = fakeRes.statusCode;
    if (status > 399 && body && !body.message) body.message = "";
    const headers = { ...fakeRes.headers, "x-ms-request-charge": String(CHARGE.meta) };
    if (body && body._etag) headers.etag = body._etag;
    // The SDK reads partition key ranges as a change feed; they never change here.
    if (req.headers["a-im"] && status === 200) {
      if (req.headers["if-none-match"]) {
        status = 304;
        body = undefined;
      }
      headers.etag = '"1"';
    }
    return { status, headers, body };
  }

  forgetContainers(dbId, collId) {
    const db = this.account.database(dbId);
    if (!db.read()) return;
    for (const [rid, state] of this.states) {
      if (state.dbId === db.read().id && (collId === undefined || state.collId === collId)) {
        this.states.delete(rid);
      }
    }
  }

  /* -------------------------------------------- control ----------------------------------------- */

  handleControl(ctx, pathname) {
    const { req } = ctx;
    if (pathname === "/_stats" && req.method === "GET") return { status: 200, headers: {}, body: this.stats };
    if ((pathname === "/_stats/reset" && req.method === "POST") || (pathname === "/_stats" && req.method === "DELETE")) {
      const old = this.stats;
      this.resetStats();
      return { status: 200, headers: {}, body: old };
    }
    if (pathname === "/_fault" && req.method === "GET") {
      return { status: 200, headers: {}, body: { rules: this.faultRules } };
    }
    if (pathname === "/_fault" && (req.method === "POST" || req.method === "PUT")) {
      const spec = ctx.json().value || {};
      const rules = Array.isArray(spec.rules) ? spec.rules : [spec];
      const parsed = [];
      for (const r of rules) {
        const rule = parseFaultRule(r);
        if (rule) parsed.push(rule);
      }
      this.faultRules = parsed;
      return { status: 200, headers: {}, body: { rules: this.faultRules } };
    }
    if (pathname === "/_fault" && req.method === "DELETE") {
      this.faultRules = [];
      return { status: 200, headers: {}, body: { rules: [] } };
    }
    return { status: 404, headers: {}, body: { code: "NotFound", message: `no control endpoint ${pathname}` } };
  }

  pickFault(kind) {
    for (const rule of this.faultRules) {
      if (rule.remaining === 0) continue;
      if (!rule.kinds.includes("all") && !rule.kinds.includes(kind)) continue;
      if (rule.probability < 1 && Math.random() >= rule.probability) continue;
      if (rule.remaining !== null) rule.remaining -= 1;
      rule.injected += 1;
      return rule;
    }
    return null;
  }

  /* -------------------------------------------- HTTP -------------------------------------------- */

  async onRequest(req, res) {
    const url = new URL(req.url, "http://x");
    let pathname = url.pathname;
    if (pathname.startsWith("//")) pathname = pathname.slice(1); // the SDKs sometimes send "//dbs/..."
    while (pathname.length > 1 && pathname.endsWith("/")) pathname = pathname.slice(0, -1);
    const kind = classify(req, pathname);
    const ctx = new RequestContext(req, res, kind, this.args.logRequests);
    let response;
    try {
      await ctx.readBody();
      if (kind === "control") {
        response = this.handleControl(ctx, pathname);
        return ctx.send(response);
      }
      this.stats.total += 1;
      if (!this.seenSockets.has(req.socket)) {
        this.seenSockets.add(req.socket); // counts connections that carried Cosmos requests, not control ones
        this.stats.connections_opened += 1;
      }
      this.stats.by_kind[kind] = (this.stats.by_kind[kind] || 0) + 1;
      this.stats.bytes_in += ctx.body.length;
      const fault = this.pickFault(kind);
      if (fault) {
        this.stats.faults_injected[fault.mode] = (this.stats.faults_injected[fault.mode] || 0) + 1;
        if (fault.mode === "delay") await sleep(fault.ms);
        else if (fault.mode === "drop") return ctx.drop();
        else if (fault.mode === "drop_after") ctx.dropAfter = true;
        else if (fault.mode === "429") {
          response = {
            status: 429,
            headers: { "x-ms-retry-after-ms": String(fault.retry_after_ms), "x-ms-substatus": "3200" },
            body: { code: "429", message: "Message: {\"Errors\":[\"Request rate is large. More Request Units may " +
              "be needed, so no changes were made. Please retry this request later.\"]}" },
          };
        } else if (fault.mode === "status") {
          const headers = { "x-ms-substatus": String(fault.substatus) };
          if (fault.retry_after_ms) headers["x-ms-retry-after-ms"] = String(fault.retry_after_ms);
          response = { status: fault.status, headers, body: { code: String(fault.status), message: "injected fault" } };
        }
        if (response) {
          this.stats.by_status[response.status] = (this.stats.by_status[response.status] || 0) + 1;
          return ctx.send(response);
        }
      }
      const docMatch = DOCS_PATH.exec(pathname);
      if (pathname === "/" && req.method === "GET") response = this.handleAccount(req.headers.host);
      else if (docMatch) {
        const params = { dbId: decodeURIComponent(docMatch[1]), collId: decodeURIComponent(docMatch[2]) };
        if (docMatch[3] !== undefined) params.docId = decodeURIComponent(docMatch[3]);
        response = await this.handleDocuments(ctx, params);
      } else response = await this.handlePackageRoute(ctx);
    } catch (err) {
      if (err instanceof HttpError) {
        response = {
          status: err.status,
          headers: { "x-ms-substatus": String(err.substatus) },
          body: { code: err.code, message: err.message },
        };
      } else {
        process.stderr.write(`internal error on ${req.method} ${req.url}: ${err && err.stack}\n`);
        response = { status: 500, headers: {}, body: { code: "InternalServerError", message: String(err) } };
      }
    }
    this.stats.by_status[response.status] = (this.stats.by_status[response.status] || 0) + 1;
    return ctx.send(response);
  }

  listen() {
    const handler = (req, res) => {
      this.onRequest(req, res).catch((err) => {
        process.stderr.write(`unhandled: ${err && err.stack}\n`);
        if (!res.headersSent) {
          res.statusCode = 500;
          res.end();
        }
      });
    };
    const opts = { keepAlive: true };
    if (this.args.tls) {
      const pkg = path.dirname(require.resolve("@vercel/cosmosdb-server/package.json"));
      opts.cert = fs.readFileSync(path.join(pkg, "cert.pem"));
      opts.key = fs.readFileSync(path.join(pkg, "key.pem"));
      this.httpServer = https.createServer(opts, handler);
    } else {
      this.httpServer = http.createServer(opts, handler);
    }
    // Clients pool connections for long; a short server idle timeout races with their reuse.
    this.httpServer.keepAliveTimeout = 300000;
    this.httpServer.headersTimeout = 301000;
    this.httpServer.requestTimeout = 0;

    this.httpServer.listen(this.args.port, this.args.host, () => {
      const { address, port } = this.httpServer.address();
      this.account = new Account(address, port);
      setInterval(() => this.sweepExpired(), 250).unref();
      process.stdout.write(`${JSON.stringify({
        ready: true, port, host: address, endpoint: this.endpoint(), tls: this.args.tls, pid: process.pid,
      })}\n`);
    });
  }
}

const DOCS_PATH = /^\/dbs\/([^/]+)\/colls\/([^/]+)\/docs(?:\/([^/]+))?$/;

// Operation kinds used by statistics and fault filters.
function classify(req, pathname) {
  if (pathname.startsWith("/_")) return "control";
  const m = DOCS_PATH.exec(pathname);
  if (!m) return "meta";
  const method = req.method;
  if (m[3] === undefined) {
    if (method === "POST") {
      if (trueHeader(req, "x-ms-cosmos-is-batch-request")) return "batch";
      if (trueHeader(req, "x-ms-documentdb-isquery") || trueHeader(req, "x-ms-cosmos-is-query-plan-request") ||
          String(req.headers["content-type"] || "").startsWith("application/query+json")) return "query";
      return "write";
    }
    if (method === "GET") return req.headers["a-im"] ? "changefeed" : "readfeed";
    return "write";
  }
  return method === "GET" ? "read" : "write";
}

const FAULT_MODES = new Set(["none", "429", "delay", "drop", "drop_after", "status"]);
const FAULT_KINDS = new Set(["all", "batch", "read", "write", "query", "changefeed", "readfeed", "meta"]);

function parseFaultRule(r) {
  const mode = String(r.mode === undefined ? "none" : r.mode);
  if (!FAULT_MODES.has(mode)) throw badRequest(`unknown fault mode ${mode}`);
  if (mode === "none") return null;
  let kinds = r.kinds !== undefined ? r.kinds : r.kind !== undefined ? r.kind : r.ops !== undefined ? r.ops : "all";
  if (!Array.isArray(kinds)) kinds = [kinds];
  kinds = kinds.map(String);
  for (const k of kinds) if (!FAULT_KINDS.has(k)) throw badRequest(`unknown operation kind ${k}`);
  const count = r.count === undefined || r.count === null ? null : parseInt(r.count, 10);
  return {
    mode,
    kinds,
    remaining: count,
    injected: 0,
    probability: r.probability === undefined ? 1 : Number(r.probability),
    retry_after_ms: r.retry_after_ms === undefined ? 100 : Number(r.retry_after_ms),
    ms: r.ms === undefined ? 1000 : Number(r.ms),
    status: r.status === undefined ? 503 : Number(r.status),
    substatus: r.substatus === undefined ? 0 : Number(r.substatus),
  };
}

class HeaderCollector {
  constructor() {
    this.statusCode = 200;
    this.headers = {};
  }

  setHeader(name, value) {
    this.headers[name.toLowerCase()] = value;
  }
}

class RequestContext {
  constructor(req, res, kind, log) {
    this.req = req;
    this.res = res;
    this.kind = kind;
    this.log = log;
    this.body = Buffer.alloc(0);
    this.parsed = undefined;
    this.dropAfter = false;
  }

  async readBody() {
    const chunks = [];
    for await (const chunk of this.req) chunks.push(chunk);
    this.body = Buffer.concat(chunks);
  }

  json() {
    if (this.parsed === undefined) {
      let value = null;
      if (this.body.length > 0) {
        try {
          value = JSON.parse(this.body.toString("utf8"));
        } catch (err) {
          throw badRequest(`The request payload is invalid: ${err.message}`);
        }
      }
      this.parsed = { value, length: this.body.length };
    }
    return this.parsed;
  }

  // The package's handlers read the body themselves (raw-body); give them a stream of what was read.
  bodyStream() {
    const { Readable } = require("stream");
    const stream = Readable.from(this.body.length ? [this.body] : []);
    stream.headers = this.req.headers;
    stream.method = this.req.method;
    stream.url = this.req.url;
    return stream;
  }

  drop() {
    if (this.log) process.stderr.write(`${this.req.method} ${this.req.url} -> dropped\n`);
    this.req.socket.destroy();
  }

  send({ status, headers, body }) {
    if (this.dropAfter) return this.drop();
    const res = this.res;
    const payload = body === undefined || status === 204 || status === 304 ? "" : JSON.stringify(body);
    res.statusCode = status;
    res.setHeader("content-type", "application/json");
    res.setHeader("x-ms-activity-id", crypto.randomUUID());
    res.setHeader("x-ms-gatewayversion", "version=2.14.0");
    if (!headers["x-ms-request-charge"]) res.setHeader("x-ms-request-charge", "1");
    for (const [k, v] of Object.entries(headers)) {
      if (v !== undefined) res.setHeader(k, v);
    }
    res.setHeader("content-length", Buffer.byteLength(payload));
    if (this.log) {
      const interesting = Object.entries(this.req.headers)
        .filter(([k]) => /^(x-ms-(documentdb|cosmos|max|continuation|start|end|read)|a-im|if-|prefer)/.test(k)
          && !/x-ms-documentdb-query-iscontinuationexpected/.test(k))
        .map(([k, v]) => `${k}=${v}`)
        .join(" ");
      process.stderr.write(`${this.req.method} ${this.req.url} [${this.kind}] ${interesting} -> ${status}` +
        ` etag=${headers.etag || ""}\n`);
    }
    res.end(payload);
  }
}

// Parsing a query compiles it to JavaScript; the same few queries repeat, so keep the compiled ones.
const queryCache = new Map();
function compiledQuery(sql) {
  let q = queryCache.get(sql);
  if (!q) {
    q = cosmosQuery(sql);
    q.code; // eslint-disable-line no-unused-expressions -- compiles now, so syntax errors surface here
    if (queryCache.size >= 512) queryCache.delete(queryCache.keys().next().value);
    queryCache.set(sql, q);
  }
  return q;
}

function lowerBound(arr, pred) {
  let lo = 0;
  let hi = arr.length;
  while (lo < hi) {
    const mid = (lo + hi) >>> 1;
    if (pred(arr[mid])) hi = mid;
    else lo = mid + 1;
  }
  return lo;
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/* ------------------------------------------------------------------------------------------------ */
/* Partial document update (Cosmos "patch"): add, set, replace, remove, incr, move                   */
/* ------------------------------------------------------------------------------------------------ */

function splitPointer(p) {
  if (typeof p !== "string" || !p.startsWith("/") || p === "/") throw badRequest(`Invalid patch path '${p}'.`);
  return p.slice(1).split("/").map((s) => s.replace(/~1/g, "/").replace(/~0/g, "~"));
}

function parentOf(doc, segs, p) {
  let cur = doc;
  for (const s of segs.slice(0, -1)) {
    if (cur === null || typeof cur !== "object" || !(s in cur)) {
      throw badRequest(`Patch path '${p}' does not exist.`);
    }
    cur = cur[s];
  }
  if (cur === null || typeof cur !== "object") throw badRequest(`Patch path '${p}' does not exist.`);
  return cur;
}

function applyPatch(doc, ops, pkPaths) {
  const protectedPaths = new Set(["/id", ...pkPaths]);
  for (const op of ops) {
    const p = op.path;
    if (protectedPaths.has(p) || (typeof p === "string" && SYSTEM_PROPERTIES.has(p.slice(1).split("/")[0]))) {
      throw badRequest(`Patch on '${p}' is not allowed (id, partition key and system properties are immutable).`);
    }
    const segs = splitPointer(p);
    const key = segs[segs.length - 1];
    const parent = parentOf(doc, segs, p);
    const isArr = Array.isArray(parent);
    const idx = isArr ? (key === "-" ? parent.length : parseInt(key, 10)) : null;
    switch (op.op) {
      case "add":
        if (isArr) parent.splice(idx, 0, op.value);
        else parent[key] = op.value;
        break;
      case "set":
        if (isArr) parent[idx] = op.value;
        else parent[key] = op.value;
        break;
      case "replace":
        if (isArr ? idx >= parent.length : !(key in parent)) throw badRequest(`Patch path '${p}' does not exist.`);
        parent[isArr ? idx : key] = op.value;
        break;
      case "remove":
        if (isArr ? idx >= parent.length : !(key in parent)) throw badRequest(`Patch path '${p}' does not exist.`);
        if (isArr) parent.splice(idx, 1);
        else delete parent[key];
        break;
      case "incr": {
        const cur = isArr ? parent[idx] : parent[key];
        if (typeof op.value !== "number") throw badRequest("incr needs a number.");
        if (cur === undefined) parent[isArr ? idx : key] = op.value;
        else if (typeof cur !== "number") throw badRequest(`Patch path '${p}' is not a number.`);
        else parent[isArr ? idx : key] = cur + op.value;
        break;
      }
      case "move": {
        const fromSegs = splitPointer(op.from);
        const fromParent = parentOf(doc, fromSegs, op.from);
        const fromKey = fromSegs[fromSegs.length - 1];
        if (!(fromKey in fromParent)) throw badRequest(`Patch path '${op.from}' does not exist.`);
        const v = fromParent[fromKey];
        if (Array.isArray(fromParent)) fromParent.splice(parseInt(fromKey, 10), 1);
        else delete fromParent[fromKey];
        parent[key] = v;
        break;
      }
      default:
        throw badRequest(`Unknown patch operation '${op.op}'.`);
    }
  }
  return doc;
}

if (require.main === module) {
  const args = parseArgs(process.argv.slice(2));
  if (args.exitWithStdin) {
    // The test process holds our stdin; when it dies, so do we, even if its teardown never ran.
    process.stdin.on("end", () => process.exit(0));
    process.stdin.on("error", () => process.exit(0));
    process.stdin.resume();
  }
  process.on("SIGTERM", () => process.exit(0));
  new Server(args).listen();
}

module.exports = { Server, parseArgs };
