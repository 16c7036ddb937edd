#!/usr/bin/env node
// query.mjs — read a relay the way an independent client does: npm nostr-tools' own Relay,
// filter matching and signature check, not dvmd's parser.
//
//   node tests/peers/query.mjs --relay ws://127.0.0.1:PORT --filter '{"kinds":[9735],"#p":["<hex>"]}'
//
// Subscribes with the filter, waits for EOSE (at most --timeout-ms, default 5000), and prints one
// JSON line per event the relay returned and nostr-tools' verifyEvent accepted:
//
//   {"event": {...}, "zap": {"request_error": null, "sats": 21}}
//
// `zap` is present for kind 9735 receipts: nostr-tools' NIP-57 validateZapRequest on the
// `description` tag (null when valid) and the `bolt11` tag's amount as @getalby/lightning-tools
// decodes it (nostr-tools' own getSatoshisAmountFromBolt11 reads no regtest `lnbcrt` amounts).
// `invoice` is present for events whose `amount` tag carries a bolt11 (NIP-90 payment-required
// feedback, a pay-after result): {"msat": <amount tag>, "bolt11_msat": N, "payment_hash": hex}
// as @getalby/lightning-tools decodes the invoice.
// Events that fail verifyEvent are reported on stderr and make the exit status 3.
// Packages are found by peers.mjs ($DVMD_NODE_PEERS, then the dvmd cache).

import { peersRequire } from "./peers.mjs";

function die(msg) {
  process.stderr.write(`query.mjs: error: ${msg}\n`);
  process.exit(2);
}

const req = peersRequire("nostr-tools/relay", "query.mjs");
const { Relay, useWebSocketImplementation } = req("nostr-tools/relay");
const { verifyEvent } = req("nostr-tools/pure");
const { validateZapRequest } = req("nostr-tools/nip57");
const { decodeInvoice } = req("@getalby/lightning-tools/bolt11");
useWebSocketImplementation(req("ws"));

const args = { relay: undefined, filter: undefined, timeoutMs: 5000 };
const argv = process.argv.slice(2);
for (let i = 0; i < argv.length; i++) {
  const value = argv[i + 1];
  switch (argv[i]) {
    case "--relay": args.relay = value; i++; break;
    case "--filter": args.filter = value; i++; break;
    case "--timeout-ms": args.timeoutMs = Number(value); i++; break;
    default: die(`unknown argument ${argv[i]}`);
  }
}
if (!args.relay || !args.filter) die("--relay and --filter are required");
let filter;
try {
  filter = JSON.parse(args.filter);
} catch (e) {
  die(`--filter is not JSON: ${e.message}`);
}

const tag = (event, name) => (event.tags.find((t) => t[0] === name) || [])[1];
let bad = 0;
const relay = await Relay.connect(args.relay);
await new Promise((resolve) => {
  const timer = setTimeout(resolve, args.timeoutMs);
  relay.subscribe([filter], {
    onevent(event) {
      if (!verifyEvent(event)) {
        bad++;
        process.stderr.write(`query.mjs: bad signature or id: ${event.id}\n`);
        return;
      }
      const line = { event };
      if (event.kind === 9735) {
        const bolt11 = tag(event, "bolt11");
        line.zap = {
          request_error: validateZapRequest(tag(event, "description") || ""),
          sats: bolt11 ? decodeInvoice(bolt11)?.satoshi ?? null : null,
        };
      }
      const amount = event.tags.find((t) => t[0] === "amount");
      if (amount && amount[2]) {
        const decoded = decodeInvoice(amount[2]);
        line.invoice = {
          msat: Number(amount[1]),
          bolt11_msat: decoded ? decoded.millisatoshi : null,
          payment_hash: decoded ? decoded.paymentHash : null,
        };
      }
      process.stdout.write(JSON.stringify(line) + "\n");
    },
    oneose() {
      clearTimeout(timer);
      resolve();
    },
  });
});
relay.close();
process.exit(bad ? 3 : 0);
