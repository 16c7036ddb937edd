#!/usr/bin/env node
// nip98_token.mjs — a NIP-98 Authorization header as npm nostr-tools makes it
// (`nip98.getToken`, with its own payload hashing), for dvmd's tests.
//
//   node tests/peers/nip98_token.mjs --url URL --method POST [--payload '{"json": 1}'] [--secret HEX]
//
// Prints one JSON line: {"header": "Nostr <base64>", "pubkey": "<hex>"}, signed with --secret
// (hex) or a fresh key.
// Packages are found by peers.mjs ($DVMD_NODE_PEERS, then the dvmd cache).

import { peersRequire } from "./peers.mjs";

function die(msg) {
  process.stderr.write(`nip98_token.mjs: error: ${msg}\n`);
  process.exit(2);
}

const req = peersRequire("nostr-tools/nip98", "nip98_token.mjs");
const nip98 = req("nostr-tools/nip98");
const { generateSecretKey, getPublicKey, finalizeEvent } = req("nostr-tools/pure");

const args = { url: undefined, method: undefined, payload: undefined, secret: undefined };
const argv = process.argv.slice(2);
for (let i = 0; i < argv.length; i += 2) {
  const value = argv[i + 1];
  switch (argv[i]) {
    case "--url": args.url = value; break;
    case "--method": args.method = value; break;
    case "--payload": args.payload = JSON.parse(value); break;
    case "--secret": args.secret = Uint8Array.from(Buffer.from(value, "hex")); break;
    default: die(`unknown argument ${argv[i]}`);
  }
}
if (!args.url || !args.method) die("--url and --method are required");

const secret = args.secret ?? generateSecretKey();
const header = await nip98.getToken(args.url, args.method, (e) => finalizeEvent(e, secret), true, args.payload);
process.stdout.write(JSON.stringify({ header, pubkey: getPublicKey(secret) }) + "\n");
