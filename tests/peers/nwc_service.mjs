#!/usr/bin/env node
// nwc_service.mjs — an independent NIP-47 (Nostr Wallet Connect) wallet service for dvmd's
// tests: @getalby/sdk's NWCWalletService on a Nostr relay, backed by an LNbits wallet.
//
//   node tests/peers/nwc_service.mjs --relay ws://127.0.0.1:PORT --lnbits http://127.0.0.1:P \
//        --adminkey KEY --inkey KEY
//
// It makes a fresh wallet-service key and client secret (or takes them from --service-secret /
// --client-secret), subscribes to kind 23194 requests for that pair, publishes the kind 13194
// info event, and then prints exactly one line on stdout:
//
//   nwc ready uri=nostr+walletconnect://<service pubkey>?relay=<urlencoded relay>&secret=<client secret hex>
//
// Everything else goes to stderr. SIGTERM/SIGINT close the relay and LNbits connections and exit 0.
//
// Methods (each a call to LNbits' API v1): make_invoice, lookup_invoice, pay_invoice,
// get_balance, get_info; anything else is answered NOT_IMPLEMENTED by the SDK. Requests are
// answered in the encryption they came in (the SDK reads the request's `encryption` tag: none
// or "nip04" -> NIP-04, "nip44_v2" -> NIP-44); the info event (re-published whenever the relay
// connection comes back) advertises `encryption: nip04 nip44_v2`. The Rust nwc 0.44 crate sends
// NIP-04 without a tag and reads only kind 23196 notifications; @getalby/sdk's NWCClient picks
// NIP-44 from the info event and reads kind 23197. Notifications payment_received and
// payment_sent are therefore published as both kind 23196 (NIP-04) and kind 23197 (NIP-44),
// from LNbits' payment websocket, from polling the invoices made through make_invoice, and
// after a successful pay_invoice; each (type, payment hash) is notified once. NWCWalletService
// has no notification API, so those events are signed, encrypted and published here through
// the service's own signEvent/encrypt/pool. The shared secret with the one client is computed
// once (node's OpenSSL ECDH) instead of per message in pure JS, after a self-check against
// nostr-tools.
//
// Options (keys may also come from LNBITS_ADMIN_KEY / LNBITS_INVOICE_KEY):
//   --relay URL            relay to use (repeatable; at least one)
//   --lnbits URL           LNbits base URL
//   --adminkey KEY         LNbits admin key (pay_invoice)
//   --inkey KEY            LNbits invoice/read key (make_invoice, lookup_invoice, get_balance)
//   --service-secret HEX   wallet-service secret key (default: random; env NWC_SERVICE_SECRET)
//   --client-secret HEX    client secret put in the URI (default: random; env NWC_CLIENT_SECRET)
//   --methods LIST         methods to serve and advertise, comma/space separated
//                          (default "pay_invoice make_invoice lookup_invoice get_balance get_info");
//                          others are answered NOT_IMPLEMENTED
//   --notifications MODE   both (default) | nip04 | nip44 | none
//   --poll-ms N            how often pending make_invoice invoices are polled (default 1000)
//   --delay-ms N           wait N ms before handling each request (default 0; for timeout tests)
//
// Packages (@getalby/sdk, @getalby/lightning-tools, nostr-tools, ws) are found through
// $DVMD_NODE_PEERS (the directory .ci/node-peers.sh prints), then
// ${DVMD_CACHE:-$HOME/.cache/dvmd}/node-peers, then NODE_PATH / a node_modules next to this file.
//
// Mapping notes:
// - NIP-47 amounts are msat, LNbits invoices are whole sats: make_invoice asks LNbits for
//   ceil(amount / 1000) sats and reports the invoice's real amount (a multiple of 1000 msat).
// - description_hash is passed to LNbits as `description_hash` (LNbits 1.6.2 accepts the bare
//   hash and puts it in the invoice's `h` tag; the memo is then dropped); otherwise
//   `description` is the memo (LNbits substitutes its site title "LNbits" for an empty one).
// - LNbits' status -> NIP-47 state: success -> settled; pending -> pending, or expired for an
//   incoming invoice past its expiry; failed -> expired for an incoming invoice past its expiry,
//   else failed. settled_at is LNbits' updated_at of a settled payment; the preimage is only
//   reported once settled (LNbits shows it for unpaid invoices too). fees_paid and created_at
//   are always present (the Rust crate requires them).
// - LNbits pays expired internal invoices; this service refuses them (PAYMENT_FAILED) like a
//   real node would.
// - Only error codes the Rust nwc 0.44 crate can parse are used: INSUFFICIENT_BALANCE,
//   PAYMENT_FAILED, NOT_FOUND, NOT_IMPLEMENTED, INTERNAL, OTHER.

import { peersRequire } from "./peers.mjs";
import { createCipheriv, createDecipheriv, createECDH, createHmac, randomBytes } from "node:crypto";

const NAME = "nwc_service";
const log = (...args) => console.error(`${NAME}: ${new Date().toISOString()}`, ...args);
// Promise.any over relays rejects with an AggregateError whose message says nothing.
const why = (e) => (e instanceof AggregateError ? `${e.message}: ${e.errors.map(String).join("; ")}` : e && e.stack ? e.stack : String(e));
// Nothing but the ready line may reach stdout.
console.log = (...args) => console.error(...args);
console.info = (...args) => console.error(...args);
process.stdout.on("error", () => {});

function die(msg, code = 2) {
  log(`error: ${msg}`);
  process.exit(code);
}

// ---------------------------------------------------------------- packages
const req = peersRequire("@getalby/sdk/nwc", "nwc_service");
const WS = req("ws");
// @getalby/sdk bundles nostr-tools, whose Relay captures globalThis.WebSocket when the module is
// loaded; node 20 has none (node >= 22 does), so install ws before loading the SDK.
if (typeof globalThis.WebSocket === "undefined") globalThis.WebSocket = WS;
const { NWCWalletService, NWCWalletServiceKeyPair } = req("@getalby/sdk/nwc");
const { decodeInvoice } = req("@getalby/lightning-tools/bolt11");
const { getPublicKey } = req("nostr-tools/pure");
const nip04 = req("nostr-tools/nip04");
const nip44 = req("nostr-tools/nip44");

// ---------------------------------------------------------------- arguments
const ALL_METHODS = ["pay_invoice", "make_invoice", "lookup_invoice", "get_balance", "get_info"];

function parseArgs(argv) {
  const o = {
    relays: [],
    lnbits: undefined,
    adminkey: process.env.LNBITS_ADMIN_KEY,
    inkey: process.env.LNBITS_INVOICE_KEY,
    serviceSecret: process.env.NWC_SERVICE_SECRET,
    clientSecret: process.env.NWC_CLIENT_SECRET,
    methods: ALL_METHODS,
    notifications: "both",
    pollMs: 1000,
    delayMs: 0,
  };
  for (let i = 0; i < argv.length; i++) {
    let arg = argv[i];
    let value;
    const eq = arg.indexOf("=");
    if (arg.startsWith("--") && eq > 0) {
      value = arg.slice(eq + 1);
      arg = arg.slice(0, eq);
    }
    const next = () => {
      if (value !== undefined) return value;
      if (i + 1 >= argv.length) die(`${arg} needs a value`);
      return argv[++i];
    };
    switch (arg) {
      case "--relay": o.relays.push(next()); break;
      case "--lnbits": o.lnbits = next().replace(/\/+$/, ""); break;
      case "--adminkey": o.adminkey = next(); break;
      case "--inkey": o.inkey = next(); break;
      case "--service-secret": o.serviceSecret = next(); break;
      case "--client-secret": o.clientSecret = next(); break;
      case "--methods": o.methods = next().split(/[\s,]+/).filter(Boolean); break;
      case "--notifications": o.notifications = next(); break;
      case "--poll-ms": o.pollMs = Number(next()); break;
      case "--delay-ms": o.delayMs = Number(next()); break;
      case "-h":
      case "--help":
        process.stderr.write(
          "usage: node nwc_service.mjs --relay ws://127.0.0.1:PORT --lnbits http://127.0.0.1:P " +
            "--adminkey KEY --inkey KEY [--service-secret HEX] [--client-secret HEX] " +
            "[--methods LIST] [--notifications both|nip04|nip44|none] [--poll-ms N] [--delay-ms N]\n",
        );
        process.exit(0);
      default: die(`unknown argument ${arg}`);
    }
  }
  if (!o.relays.length) die("--relay is required");
  if (!o.lnbits) die("--lnbits is required");
  if (!o.adminkey) die("--adminkey (or LNBITS_ADMIN_KEY) is required");
  if (!o.inkey) die("--inkey (or LNBITS_INVOICE_KEY) is required");
  for (const m of o.methods) if (!ALL_METHODS.includes(m)) die(`unsupported method ${m} (have: ${ALL_METHODS.join(" ")})`);
  if (!["both", "nip04", "nip44", "none"].includes(o.notifications)) die("--notifications must be both, nip04, nip44 or none");
  if (!(o.pollMs > 0)) die("--poll-ms must be > 0");
  if (!(o.delayMs >= 0)) die("--delay-ms must be >= 0");
  for (const k of ["serviceSecret", "clientSecret"]) {
    if (o[k] !== undefined && !/^[0-9a-f]{64}$/.test(o[k])) die(`${k} must be 64 lowercase hex chars`);
  }
  return o;
}

const opts = parseArgs(process.argv.slice(2));
const secretHex = () => {
  for (;;) {
    const sk = randomBytes(32).toString("hex");
    try {
      getPublicKey(Buffer.from(sk, "hex")); // rejects 0 and >= n
      return sk;
    } catch {
      // astronomically unlikely; draw again
    }
  }
};
const serviceSecret = opts.serviceSecret || secretHex();
const clientSecret = opts.clientSecret || secretHex();
const clientPubkey = getPublicKey(Buffer.from(clientSecret, "hex"));
const keypair = new NWCWalletServiceKeyPair(serviceSecret, clientPubkey);
const notificationTypes = opts.notifications === "none" ? [] : ["payment_received", "payment_sent"];
const notificationKinds = {
  both: [[23196, "nip04"], [23197, "nip44_v2"]],
  nip04: [[23196, "nip04"]],
  nip44: [[23197, "nip44_v2"]],
  none: [],
}[opts.notifications];

// ---------------------------------------------------------------- LNbits
async function lnbits(method, urlPath, key, body, timeoutMs = 15000) {
  const res = await fetch(opts.lnbits + urlPath, {
    method,
    headers: { "X-Api-Key": key, ...(body ? { "content-type": "application/json" } : {}) },
    body: body ? JSON.stringify(body) : undefined,
    redirect: "manual",
    signal: AbortSignal.timeout(timeoutMs),
  });
  const text = await res.text();
  let json = null;
  try {
    json = JSON.parse(text);
  } catch {
    // not JSON
  }
  return { status: res.status, ok: res.status >= 200 && res.status < 300, json, text };
}
const detail = (r) => (r.json && (r.json.detail || r.json.message)) || r.text.slice(0, 200) || `HTTP ${r.status}`;

const nowSec = () => Math.floor(Date.now() / 1000);
// LNbits returns ISO times, some without a zone (they are UTC).
function unix(s) {
  if (s === undefined || s === null || s === "") return undefined;
  if (typeof s === "number") return Math.floor(s);
  const t = Date.parse(/(Z|[+-]\d\d:?\d\d)$/i.test(s) ? s : `${s}Z`);
  return Number.isFinite(t) ? Math.floor(t / 1000) : undefined;
}

// payment_hash -> { description, description_hash } for invoices made through make_invoice
const madeInvoices = new Map();
// payment_hash -> expires_at, invoices to poll for payment_received
const pendingIncoming = new Map();

function transaction(p) {
  const incoming = p.amount > 0;
  const createdAt = unix(p.time) ?? unix(p.created_at) ?? nowSec();
  const expiresAt = unix(p.expiry);
  const expired = expiresAt !== undefined && expiresAt <= nowSec();
  let state;
  if (p.status === "success") state = "settled";
  else if (p.status === "failed") state = incoming && expired ? "expired" : "failed";
  else state = incoming && expired ? "expired" : "pending";
  const made = madeInvoices.get(p.payment_hash) || {};
  const tx = {
    type: incoming ? "incoming" : "outgoing",
    state,
    invoice: p.bolt11 || p.payment_request,
    description: made.description ?? (p.memo || undefined),
    description_hash: made.description_hash,
    preimage: state === "settled" && p.preimage ? p.preimage : undefined,
    payment_hash: p.payment_hash,
    amount: Math.abs(Number(p.amount) || 0),
    fees_paid: Math.abs(Number(p.fee) || 0),
    created_at: createdAt,
    expires_at: expiresAt,
    settled_at: state === "settled" ? unix(p.updated_at) ?? nowSec() : undefined,
  };
  for (const k of Object.keys(tx)) if (tx[k] === undefined) delete tx[k];
  return tx;
}

// ---------------------------------------------------------------- handlers
const ok = (result) => ({ result, error: undefined });
const fail = (code, message) => ({ result: undefined, error: { code, message } });
const isHex64 = (s) => typeof s === "string" && /^[0-9a-fA-F]{64}$/.test(s);

async function makeInvoice(params) {
  const { amount, description, description_hash: descriptionHash, expiry } = params;
  if (!Number.isSafeInteger(amount) || amount <= 0) return fail("OTHER", "amount must be a positive integer (msat)");
  if (descriptionHash !== undefined && descriptionHash !== null && !isHex64(descriptionHash)) {
    return fail("OTHER", "description_hash must be 32 bytes of hex");
  }
  if (expiry !== undefined && expiry !== null && (!Number.isSafeInteger(expiry) || expiry <= 0)) {
    return fail("OTHER", "expiry must be a positive integer (seconds)");
  }
  const body = { out: false, amount: Math.ceil(amount / 1000), memo: description || "" };
  if (descriptionHash) body.description_hash = descriptionHash.toLowerCase();
  if (expiry) body.expiry = expiry;
  const r = await lnbits("POST", "/api/v1/payments", opts.inkey, body);
  if (!r.ok || !r.json || !r.json.payment_hash) return fail("INTERNAL", `LNbits: ${detail(r)}`);
  const p = r.json;
  madeInvoices.set(p.payment_hash, {
    description: descriptionHash ? description || undefined : description || p.memo || undefined,
    description_hash: descriptionHash ? descriptionHash.toLowerCase() : undefined,
  });
  const tx = transaction(p);
  if (notificationKinds.length) pendingIncoming.set(p.payment_hash, tx.expires_at ?? nowSec() + 3600);
  return ok(tx);
}

async function lookupInvoice(params) {
  let hash = params.payment_hash;
  if (!hash && params.invoice) {
    const dec = decodeInvoice(params.invoice);
    if (!dec) return fail("OTHER", "could not decode invoice");
    hash = dec.paymentHash;
  }
  if (!isHex64(hash)) return fail("OTHER", "payment_hash (32 bytes of hex) or invoice required");
  const r = await lnbits("GET", `/api/v1/payments/${hash.toLowerCase()}`, opts.inkey);
  if (r.status === 404) return fail("NOT_FOUND", "invoice not found");
  if (!r.ok || !r.json || !r.json.details) return fail("INTERNAL", `LNbits: ${detail(r)}`);
  return ok(transaction(r.json.details));
}

async function payInvoice(params) {
  const { invoice, amount } = params;
  if (typeof invoice !== "string" || !invoice) return fail("OTHER", "invoice required");
  const dec = decodeInvoice(invoice);
  if (!dec) return fail("OTHER", "could not decode invoice");
  if (!dec.millisatoshi) {
    // NIP-47 takes `amount` for such an invoice; LNbits pays none (it wants the invoice's own).
    return fail("NOT_IMPLEMENTED", `amountless invoices are not supported by LNbits (asked to pay ${amount ?? "no amount"} msat)`);
  }
  if (amount !== undefined && amount !== null && amount !== dec.millisatoshi) {
    return fail("OTHER", `amount ${amount} msat does not match the invoice's ${dec.millisatoshi} msat`);
  }
  if (dec.timestamp + (dec.expiry ?? 3600) <= nowSec()) return fail("PAYMENT_FAILED", "invoice expired");
  const r = await lnbits("POST", "/api/v1/payments", opts.adminkey, { out: true, bolt11: invoice }, 60000);
  if (!r.ok || !r.json) {
    const msg = detail(r);
    if (/insufficient balance/i.test(msg)) return fail("INSUFFICIENT_BALANCE", msg);
    if (r.status === 401 || r.status === 403) return fail("INTERNAL", `LNbits rejected the admin key: ${msg}`);
    return fail("PAYMENT_FAILED", msg);
  }
  let p = r.json;
  // A payment through a real funding source may be pending for a while.
  const deadline = Date.now() + 60000;
  while (p.status === "pending" && Date.now() < deadline) {
    await new Promise((res) => setTimeout(res, 200));
    const s = await lnbits("GET", `/api/v1/payments/${dec.paymentHash}`, opts.adminkey);
    if (s.ok && s.json && s.json.details) p = s.json.details;
  }
  if (p.status === "pending") return fail("PAYMENT_FAILED", "payment still pending after 60 s");
  if (p.status !== "success" || !p.preimage) return fail("PAYMENT_FAILED", `payment ${p.status}`);
  setTimeout(() => notifyPayment(p), 10); // after the response is on its way
  return ok({ preimage: p.preimage, fees_paid: Math.abs(Number(p.fee) || 0) });
}

async function getBalance() {
  const r = await lnbits("GET", "/api/v1/wallet", opts.inkey);
  if (!r.ok || !r.json || typeof r.json.balance !== "number") return fail("INTERNAL", `LNbits: ${detail(r)}`);
  return ok({ balance: Math.max(0, Math.floor(r.json.balance)) });
}

async function getInfo() {
  return ok({
    alias: "dvmd-test-lnbits",
    color: "#f7931a",
    pubkey: keypair.walletPubkey,
    network: "mainnet",
    block_height: 0,
    block_hash: "0".repeat(64),
    methods: opts.methods,
    notifications: notificationTypes,
  });
}

function summarize(method, params) {
  switch (method) {
    case "make_invoice": return `amount=${params.amount}${params.description_hash ? " with description_hash" : ""}`;
    case "pay_invoice": return `invoice=${String(params.invoice).slice(0, 24)}...`;
    case "lookup_invoice": return params.payment_hash ? `payment_hash=${params.payment_hash}` : `invoice=${String(params.invoice).slice(0, 24)}...`;
    default: return "";
  }
}

function wrap(method, fn) {
  return async (params) => {
    const started = Date.now();
    params = params || {};
    try {
      if (opts.delayMs) await new Promise((res) => setTimeout(res, opts.delayMs));
      const r = await fn(params);
      const outcome = r.error ? `error ${r.error.code}: ${r.error.message}` : "ok";
      log(`${method} ${summarize(method, params)} -> ${outcome} (${Date.now() - started} ms)`);
      return r;
    } catch (e) {
      log(`${method} ${summarize(method, params)} -> INTERNAL: ${e && e.stack ? e.stack : e}`);
      return fail("INTERNAL", String((e && e.message) || e));
    }
  };
}

const impl = {
  make_invoice: ["makeInvoice", makeInvoice],
  lookup_invoice: ["lookupInvoice", lookupInvoice],
  pay_invoice: ["payInvoice", payInvoice],
  get_balance: ["getBalance", getBalance],
  get_info: ["getInfo", getInfo],
};
const handler = {};
for (const m of opts.methods) handler[impl[m][0]] = wrap(m, impl[m][1]);

// ---------------------------------------------------------------- service
let connectedResolve;
const connected = new Promise((res) => (connectedResolve = res));
let infoPublished = false;
const sdkLogger = {
  debug(...args) {
    if (args[0] === "relay connected" || args[0] === "relay disconnected") log(...args);
    if (args[0] !== "relay connected") return;
    connectedResolve(args[1]);
    // A restarted relay has lost the (replaceable) info event: publish it again.
    if (infoPublished && !stopping) publishInfo().catch((e) => log(`republishing the info event failed: ${why(e)}`));
  },
};
const publishInfo = () => service.publishWalletServiceInfoEvent(serviceSecret, opts.methods, notificationTypes);
const service = new NWCWalletService({ relayUrls: opts.relays, logger: sdkLogger });

// The SDK redoes the ECDH in pure JS (~5 ms) for every encrypt and decrypt. There is one
// client, so compute the shared secret once (OpenSSL) and reuse it: NIP-04 keys AES-256-CBC
// with the shared point's x; NIP-44 v2's conversation key is HKDF-extract("nip44-v2", x).
const sharedX = createECDH("secp256k1");
sharedX.setPrivateKey(Buffer.from(keypair.walletSecret, "hex"));
const nip04Key = sharedX.computeSecret(Buffer.from(`02${keypair.clientPubkey}`, "hex"));
const nip44Key = createHmac("sha256", "nip44-v2").update(nip04Key).digest();
const fastCrypto = {
  encrypt(content, encryption) {
    if (encryption !== "nip04") return nip44.v2.encrypt(content, nip44Key);
    const iv = randomBytes(16);
    const c = createCipheriv("aes-256-cbc", nip04Key, iv);
    return `${Buffer.concat([c.update(content, "utf8"), c.final()]).toString("base64")}?iv=${iv.toString("base64")}`;
  },
  decrypt(content, encryption) {
    if (encryption !== "nip04") return nip44.v2.decrypt(content, nip44Key);
    const [ct, iv] = content.split("?iv=");
    const d = createDecipheriv("aes-256-cbc", nip04Key, Buffer.from(iv || "", "base64"));
    return Buffer.concat([d.update(Buffer.from(ct, "base64")), d.final()]).toString("utf8");
  },
};
async function installFastCrypto() {
  // Only if it agrees with nostr-tools both ways; otherwise keep the SDK's own.
  try {
    const sk = Buffer.from(clientSecret, "hex");
    const wp = keypair.walletPubkey;
    const a = await nip04.decrypt(sk, wp, fastCrypto.encrypt("check 04", "nip04"));
    const b = fastCrypto.decrypt(await nip04.encrypt(sk, wp, "check 04b"), "nip04");
    const ck = nip44.getConversationKey(sk, wp);
    const c = nip44.v2.decrypt(fastCrypto.encrypt("check 44", "nip44_v2"), ck);
    const d = fastCrypto.decrypt(nip44.v2.encrypt("check 44b", ck), "nip44_v2");
    if (a !== "check 04" || b !== "check 04b" || c !== "check 44" || d !== "check 44b") throw new Error("mismatch");
  } catch (e) {
    log(`cached-key encryption disagrees with nostr-tools (${e}); using the SDK's`);
    return;
  }
  service.encrypt = async (kp, content, encryption) =>
    kp.clientPubkey === keypair.clientPubkey ? fastCrypto.encrypt(content, encryption) : NWCWalletService.prototype.encrypt.call(service, kp, content, encryption);
  service.decrypt = async (kp, content, encryption) =>
    kp.clientPubkey === keypair.clientPubkey ? fastCrypto.decrypt(content, encryption) : NWCWalletService.prototype.decrypt.call(service, kp, content, encryption);
}

const notified = new Set();
async function notify(type, tx) {
  if (!notificationKinds.length) return;
  const key = `${type}:${tx.payment_hash}`;
  if (notified.has(key)) return;
  notified.add(key);
  const content = JSON.stringify({ notification_type: type, notification: tx });
  for (const [kind, encryption] of notificationKinds) {
    try {
      const event = await service.signEvent(
        {
          kind,
          created_at: nowSec(),
          tags: [["p", keypair.clientPubkey]],
          content: await service.encrypt(keypair, content, encryption),
        },
        keypair.walletSecret,
      );
      await Promise.any(service.pool.publish(opts.relays, event));
    } catch (e) {
      log(`publishing ${type} notification (kind ${kind}) failed: ${why(e)}`);
    }
  }
  log(`notified ${type} ${tx.payment_hash} amount=${tx.amount}`);
}

function notifyPayment(p) {
  if (!p || p.status !== "success" || !p.payment_hash) return;
  const tx = transaction(p);
  if (tx.type === "incoming") pendingIncoming.delete(p.payment_hash);
  notify(tx.type === "incoming" ? "payment_received" : "payment_sent", tx).catch((e) => log(`notify: ${e}`));
}

// LNbits pushes {wallet_balance, payment} on /api/v1/ws/<inkey> when a payment of the wallet settles.
let lnbitsWs;
let stopping = false;
function watchLnbits() {
  if (!notificationKinds.length || stopping) return;
  const url = `${opts.lnbits.replace(/^http/, "ws")}/api/v1/ws/${opts.inkey}`;
  const ws = new WS(url);
  lnbitsWs = ws;
  ws.on("open", () => {
    log("LNbits payment websocket connected");
    pollPending();
  });
  ws.on("message", (data) => {
    try {
      const msg = JSON.parse(String(data));
      if (msg && msg.payment) notifyPayment(msg.payment);
    } catch (e) {
      log(`LNbits websocket message: ${e}`);
    }
  });
  ws.on("error", (e) => log(`LNbits websocket: ${e.message || e}`));
  ws.on("close", () => {
    if (!stopping) setTimeout(watchLnbits, 1000);
  });
}

// Belt and braces: poll the invoices made here until they settle or expire.
let polling = false;
async function pollPending() {
  if (polling || stopping) return;
  polling = true;
  try {
    for (const [hash, expiresAt] of [...pendingIncoming]) {
      const r = await lnbits("GET", `/api/v1/payments/${hash}`, opts.inkey);
      if (r.ok && r.json && r.json.details) {
        if (r.json.details.status === "success") notifyPayment(r.json.details);
        else if (r.json.details.status === "failed" || expiresAt + 60 < nowSec()) pendingIncoming.delete(hash);
      } else if (r.status === 404) {
        pendingIncoming.delete(hash);
      }
    }
  } catch (e) {
    log(`poll: ${e}`);
  } finally {
    polling = false;
  }
}

async function main() {
  // Fail fast on a wrong URL or keys.
  let r;
  try {
    r = await lnbits("GET", "/api/v1/wallet", opts.inkey);
  } catch (e) {
    die(`LNbits at ${opts.lnbits} unreachable: ${e.cause?.message || e.message}`);
  }
  if (!r.ok || !r.json) die(`LNbits /api/v1/wallet with the invoice key: ${detail(r)}`);
  const admin = await lnbits("GET", "/api/v1/wallet", opts.adminkey);
  if (!admin.ok) die(`LNbits /api/v1/wallet with the admin key: ${detail(admin)}`);
  log(`LNbits wallet "${r.json.name}" balance ${r.json.balance} msat`);

  await installFastCrypto();
  const unsubscribe = await service.subscribe(keypair, handler);
  const timeout = new Promise((_, rej) => setTimeout(() => rej(new Error("no relay connected within 15 s")), 15000));
  await Promise.race([connected, timeout]).catch((e) => die(e.message));
  // Published on the same relay connection as the REQ above and awaited (OK): once it is
  // accepted the relay has processed the subscription, so requests sent after the ready line
  // cannot slip past it.
  await publishInfo();
  infoPublished = true;

  watchLnbits();
  const poller = setInterval(pollPending, opts.pollMs);

  const shutdown = (signal) => {
    if (stopping) return;
    stopping = true;
    log(`${signal}: stopping`);
    clearInterval(poller);
    try { unsubscribe(); } catch { /* closing anyway */ }
    try { service.close(); } catch { /* closing anyway */ }
    try { lnbitsWs?.terminate(); } catch { /* closing anyway */ }
    setTimeout(() => process.exit(0), 50);
  };
  process.on("SIGTERM", () => shutdown("SIGTERM"));
  process.on("SIGINT", () => shutdown("SIGINT"));

  const query = opts.relays.map((u) => `relay=${encodeURIComponent(u)}`).join("&");
  const uri = `nostr+walletconnect://${keypair.walletPubkey}?${query}&secret=${clientSecret}`;
  log(`service pubkey ${keypair.walletPubkey}, client pubkey ${keypair.clientPubkey}, methods ${opts.methods.join(" ")}, notifications ${opts.notifications}`);
  process.stdout.write(`nwc ready uri=${uri}\n`);
}

// The SDK publishes responses without awaiting them: a relay that refuses one ends up here.
process.on("unhandledRejection", (e) => log(`unhandled rejection (a response the relay refused?): ${why(e)}`));
main().catch((e) => die(e && e.stack ? e.stack : String(e)));
