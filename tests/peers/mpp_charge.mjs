// Call a dvmd URL as an HTTP `Payment` client built on npm `mppx` (the reference TypeScript
// implementation of draft-httpauth-payment). mppx has no Lightning method of its own, so this
// declares the Lightning `charge` method with mppx's `Method.from` (schema as in tempoxyz/
// mpp-specs `draft-lightning-charge-00`); mppx reads the 402's challenges, picks ours, and
// serializes the credential and echo itself. The invoice is paid through dvmd's dev wallet
// (POST /dev/pay), which answers with the preimage.
//
// Usage: node mpp_charge.mjs --url URL --body JSON --pay HTTP_URL
// Prints one JSON line: {"offered", "status", "receipt", "body"}: `offered` is the challenges
// mppx read from a first, unauthenticated call (its own parser), `receipt` the Payment-Receipt
// of the paid call as mppx reads it.

import { parseArgs } from "node:util";
import { peersRequire } from "./peers.mjs";

const req = peersRequire("mppx", "mpp_charge.mjs");
const { Method, Credential, Challenge, Receipt, z } = req("mppx");
const { Mppx } = req("mppx/client");

const { values } = parseArgs({
  options: {
    url: { type: "string" },
    body: { type: "string" },
    pay: { type: "string" },
  },
});
const init = () => ({
  method: "POST",
  headers: { "Content-Type": "application/json" },
  body: values.body,
});

// What a client sees first: the 402's challenges, parsed by mppx.
const first = await fetch(values.url, init());
const offered = Challenge.fromResponseList(first).map((c) => ({
  id: c.id,
  realm: c.realm,
  method: c.method,
  intent: c.intent,
  request: c.request,
  expires: c.expires ?? null,
}));
await first.text();

const lightningCharge = Method.from({
  name: "lightning",
  intent: "charge",
  schema: {
    credential: { payload: z.object({ preimage: z.string() }) },
    request: z.looseObject({
      amount: z.string(),
      currency: z.string(),
      methodDetails: z.looseObject({ invoice: z.string() }),
    }),
  },
});

const lightning = Method.toClient(lightningCharge, {
  async createCredential({ challenge }) {
    const paid = await fetch(`${values.pay}/dev/pay`, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ bolt11: challenge.request.methodDetails.invoice }),
    });
    if (!paid.ok) throw new Error(`dev wallet refused to pay: ${paid.status}`);
    const { preimage } = await paid.json();
    return Credential.serialize({ challenge, payload: { preimage } });
  },
});

const mppx = Mppx.create({ methods: [lightning], polyfill: false });
const response = await mppx.fetch(values.url, init());
let receipt = null;
try {
  receipt = Receipt.fromResponse(response);
} catch (e) {
  receipt = { error: String(e) };
}
const text = await response.text();
let body;
try {
  body = JSON.parse(text);
} catch {
  body = text;
}
console.log(JSON.stringify({ offered, status: response.status, receipt, body }));
