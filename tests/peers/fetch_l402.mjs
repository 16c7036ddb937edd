// Call a dvmd URL with @getalby/lightning-tools `fetchWithL402`, which reads the 402's
// WWW-Authenticate challenge, pays the invoice and retries with `Authorization: L402`.
// The wallet pays from an LNbits wallet over LNbits' own API (POST /api/v1/payments with
// the wallet's admin key) and reads the preimage back (GET /api/v1/payments/{hash}).
//
// Usage: node fetch_l402.mjs --url URL --body JSON --lnbits URL --adminkey KEY
// Prints one JSON line: {"status", "body", "paid", "amount_sats", "preimage"}.

import { parseArgs } from "node:util";
import { peersRequire } from "./peers.mjs";

const req = peersRequire("@getalby/lightning-tools", "fetch_l402.mjs");
const { fetchWithL402 } = req("@getalby/lightning-tools");

const { values } = parseArgs({
  options: {
    url: { type: "string" },
    body: { type: "string" },
    lnbits: { type: "string" },
    adminkey: { type: "string" },
  },
});

const wallet = {
  async payInvoice({ invoice }) {
    const headers = { "X-Api-Key": values.adminkey, "Content-Type": "application/json" };
    const paid = await fetch(`${values.lnbits}/api/v1/payments`, {
      method: "POST",
      headers,
      body: JSON.stringify({ out: true, bolt11: invoice }),
    });
    const payment = await paid.json();
    if (!paid.ok) throw new Error(`LNbits refused the payment: ${JSON.stringify(payment)}`);
    const looked = await fetch(`${values.lnbits}/api/v1/payments/${payment.payment_hash}`, { headers });
    const status = await looked.json();
    if (!status.paid || !status.preimage) throw new Error(`not paid: ${JSON.stringify(status)}`);
    return { preimage: status.preimage };
  },
};

const response = await fetchWithL402(
  values.url,
  { method: "POST", headers: { "Content-Type": "application/json" }, body: values.body },
  { wallet },
);
const text = await response.text();
let body;
try {
  body = JSON.parse(text);
} catch {
  body = text;
}
const payment = response.payment ?? {};
console.log(JSON.stringify({
  status: response.status,
  body,
  paid: payment.paid ?? false,
  amount_sats: payment.amount ?? 0,
  preimage: payment.preimage ?? null,
}));
