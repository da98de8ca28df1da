"use strict";
/*
 * Effective partition key (EPK) of a partition key value, as Cosmos and its SDKs compute it for hash
 * partitioning version 2 (the azure-cosmos default): MurmurHash3 x64 128 of a binary encoding of the
 * value, hex, top two bits cleared. The SDK scopes a change feed by partition key with an EPK range
 * (x-ms-start-epk / x-ms-end-epk), so the server must place items by the same function.
 */

const MASK64 = (1n << 64n) - 1n;

function rotl64(v, r) {
  return ((v << BigInt(r)) | (v >> BigInt(64 - r))) & MASK64;
}

function fmix64(k) {
  k ^= k >> 33n;
  k = (k * 0xff51afd7ed558ccdn) & MASK64;
  k ^= k >> 33n;
  k = (k * 0xc4ceb9fe1a85ec53n) & MASK64;
  k ^= k >> 33n;
  return k;
}

function readU64LE(buf, off) {
  return buf.readBigUInt64LE(off);
}

// Returns [h1, h2] (low, high) as BigInt.
function murmurhash3x64_128(buf) {
  const c1 = 0x87c37b91114253d5n;
  const c2 = 0x4cf5ad432745937fn;
  let h1 = 0n;
  let h2 = 0n;
  const len = buf.length;
  let pos = 0;
  // The two 64-bit lanes are spelled out step by step, as in the reference MurmurHash3_x64_128: the same
  // shape with other constants and rotations. Kept that way on purpose, so it reads against the reference.
  for (; pos + 16 <= len; pos += 16) {
    let k1 = readU64LE(buf, pos);
    let k2 = readU64LE(buf, pos + 8);
    k1 = (k1 * c1) & MASK64;
    k1 = rotl64(k1, 31);
    k1 = (k1 * c2) & MASK64;
    h1 ^= k1;
    h1 = rotl64(h1, 27);
    h1 = (h1 + h2) & MASK64;
    h1 = (h1 * 5n + 0x52dce729n) & MASK64;
    k2 = (k2 * c2) & MASK64;
    k2 = rotl64(k2, 33);
    k2 = (k2 * c1) & MASK64;
    h2 ^= k2;
    h2 = rotl64(h2, 31);
    h2 = (h2 + h1) & MASK64;
    h2 = (h2 * 5n + 0x38495ab5n) & MASK64;
  }
  let k1 = 0n;
  let k2 = 0n;
  const n = len & 15;
  for (let i = Math.min(n, 15); i >= 9; i -= 1) k2 ^= BigInt(buf[pos + i - 1]) << BigInt(8 * (i - 9));
  // The SDKs mix k2 even when the tail is shorter than 9 bytes (k2 is 0 then, so it is a no-op).
  k2 = (k2 * c2) & MASK64;
  k2 = rotl64(k2, 33);
  k2 = (k2 * c1) & MASK64;
  h2 ^= k2;
  for (let i = Math.min(n, 8); i >= 1; i -= 1) k1 ^= BigInt(buf[pos + i - 1]) << BigInt(8 * (i - 1));
  k1 = (k1 * c1) & MASK64;
  k1 = rotl64(k1, 31);
  k1 = (k1 * c2) & MASK64;
  h1 ^= k1;
  h1 ^= BigInt(len);
  h2 ^= BigInt(len);
  h1 = (h1 + h2) & MASK64;
  h2 = (h2 + h1) & MASK64;
  h1 = fmix64(h1);
  h2 = fmix64(h2);
  h1 = (h1 + h2) & MASK64;
  h2 = (h2 + h1) & MASK64;
  return [h1, h2];
}

const TYPE = { Undefined: 0x0, Null: 0x1, False: 0x2, True: 0x3, Number: 0x5, String: 0x8 };

// One partition key component in the "for hashing v2" encoding; {} is Undefined (an absent value).
function encodeComponent(value) {
  if (value === true) return Buffer.from([TYPE.True]);
  if (value === false) return Buffer.from([TYPE.False]);
  if (value === null) return Buffer.from([TYPE.Null]);
  if (typeof value === "number") {
    const b = Buffer.alloc(9);
    b[0] = TYPE.Number;
    b.writeDoubleLE(value, 1);
    return b;
  }
  if (typeof value === "string") {
    return Buffer.concat([Buffer.from([TYPE.String]), Buffer.from(value, "utf8"), Buffer.from([0xff])]);
  }
  if (value !== null && typeof value === "object" && !Array.isArray(value) && Object.keys(value).length === 0) {
    return Buffer.from([TYPE.Undefined]);
  }
  throw new Error(`unsupported partition key component ${JSON.stringify(value)}`);
}

function hashHex(buf) {
  const [low, high] = murmurhash3x64_128(buf);
  const bytes = Buffer.alloc(16);
  bytes.writeBigUInt64BE(high, 0);
  bytes.writeBigUInt64BE(low, 8);
  bytes[0] &= 0x3f;
  return bytes.toString("hex").toUpperCase();
}

/**
 * @param {Array} components partition key values, one per path ({} for an absent value)
 * @param {string} kind "Hash" or "MultiHash"
 * @param {number} version partition key definition version (only 2 is supported)
 * @returns {string} the EPK as upper-case hex
 */
function effectivePartitionKey(components, kind = "Hash", version = 2) {
  if (components.length === 0) return "";
  if (kind === "MultiHash") return components.map((c) => hashHex(encodeComponent(c))).join("");
  if (version !== 2) throw new Error(`hash partitioning version ${version} is not supported`);
  return hashHex(Buffer.concat(components.map(encodeComponent)));
}

module.exports = { effectivePartitionKey, murmurhash3x64_128 };
