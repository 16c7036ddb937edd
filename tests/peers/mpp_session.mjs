// Open and close an HTTP `Payment` session (draft-lightning-session-00) on a dvmd URL as a
// client built on npm `mppx` (the reference TypeScript implementation of draft-httpauth-payment).
// mppx's own session client is Tempo's (payment channels), so this declares the Lightning
// `session` method with mppx's `Method.from` (schema as in tempoxyz/mpp-specs); mppx reads the
// 402's challenges, picks ours among the offered ones, and serializes the `open` credential and
// its echo itself. The deposit is paid through dvmd's dev wallet (POST /dev/pay), and the
// return invoice, which names no amount, comes from it too (POST /dev/invoice).
//
// Usage: node mpp_session.mjs --url URL --body JSON --pay HTTP_URL
// Prints one JSON line: {"offered", "status", "receipt", "body", "session", "closed"}: `offered`
// is what mppx read of a first, unauthenticated call; `receipt` the open call's Payment-Receipt
// as mppx reads it; `closed` the close action's {status, receipt, body}, with a credential mppx
// serialized for the same challenge.

import { parseArgs } from "node:util";
import { peersRequire } from "./peers.mjs";

const req = peersRequire("mppx", "mpp_session.mjs");
const { Method, Credential, Challenge, Receipt, z } = req("mppx");
const { Mppx } = req("mppx/client");

const { values } = parseArgs({
  options: {
    url: { type: "string" },
    body: { type: "string" },
    pay: { type: "string" },
  },
});
const init = (authorization) => ({
  method: "POST",
  headers: {
    "Content-Type": "application/json",
    ...(authorization ? { Authorization: authorization } : {}),
  },
  body: values.body,
});
const devPost = async (path, body) => {
  const response = await fetch(`${values.pay}${path}`, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
  });
  if (!response.ok) throw new Error(`${path}: ${response.status} ${await response.text()}`);
  return response.json();
};

const first = await fetch(values.url, init());
const offered = Challenge.fromResponseList(first).map((c) => ({
  id: c.id,
  method: c.method,
  intent: c.intent,
  request: c.request,
  expires: c.expires ?? null,
}));
await first.text();

const lightningSession = Method.from({
  name: "lightning",
  intent: "session",
  schema: {
    credential: {
      payload: z.looseObject({
        action: z.string(),
        preimage: z.optional(z.string()),
        returnInvoice: z.optional(z.string()),
        sessionId: z.optional(z.string()),
      }),
    },
    request: z.looseObject({
      amount: z.string(),
      currency: z.string(),
      depositInvoice: z.string(),
      paymentHash: z.string(),
    }),
  },
});

let opened = null;
const lightning = Method.toClient(lightningSession, {
  async createCredential({ challenge }) {
    const { preimage } = await devPost("/dev/pay", { bolt11: challenge.request.depositInvoice });
    const { bolt11 } = await devPost("/dev/invoice", { memo: "mppx session refund" });
    opened = { challenge, preimage, sessionId: challenge.request.paymentHash };
    return Credential.serialize({
      challenge,
      payload: { action: "open", preimage, returnInvoice: bolt11 },
    });
  },
});

const mppx = Mppx.create({ methods: [lightning], polyfill: false });
const response = await mppx.fetch(values.url, init());
const readReceipt = (r) => {
  try {
    return Receipt.fromResponse(r);
  } catch (e) {
    return { error: String(e) };
  }
};
const readBody = async (r) => {
  const text = await r.text();
  try {
    return JSON.parse(text);
  } catch {
    return text;
  }
};
const receipt = readReceipt(response);
const body = await readBody(response);

let closed = null;
if (opened) {
  const close = Credential.serialize({
    challenge: opened.challenge,
    payload: { action: "close", sessionId: opened.sessionId, preimage: opened.preimage },
  });
  const answer = await fetch(values.url, init(close));
  closed = { status: answer.status, receipt: readReceipt(answer), body: await readBody(answer) };
}
console.log(
  JSON.stringify({
    offered,
    status: response.status,
    receipt,
    body,
    session: opened && opened.sessionId,
    closed,
  }),
);
