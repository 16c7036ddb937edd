#!/usr/bin/env node
// browser.mjs — a person at dvmd's sign-in page, in a real headless Chromium driven by npm
// playwright-core, with a NIP-07 `window.nostr` backed by a real key (nostr-tools signs).
//
//   node tests/peers/browser.mjs --url http://127.0.0.1:PORT/ --secret <hex> \
//        --screenshot out.png [--chromium /usr/bin/chromium]
//
// Talks to the test over stdio, one JSON line per step on stdout; where the test must act (pay
// an invoice, make one to withdraw to) it waits for one line on stdin:
//   {"step":"signed_in","ms":..,"balance_msat":..}
//   {"step":"invoice","bolt11":".."}                     <- stdin: "paid"
//   {"step":"topped_up","balance_msat":..}
//   {"step":"chatted","text":"..","cost":"..","first_answer_ms":..}
//   {"step":"jobs","rows":[[..cells..], ..]}
//   {"step":"withdraw"}                                   <- stdin: a BOLT11 invoice
//   {"step":"withdrawn","result":"..","balance_msat":..}
//   {"step":"done","screenshot":".."}
// Exit status 1 with the page's text on stderr when a step times out.

import { peersRequire } from "./peers.mjs";
import readline from "node:readline";

const req = peersRequire("playwright-core", "browser.mjs");
const { chromium } = req("playwright-core");
const { finalizeEvent, getPublicKey } = req("nostr-tools/pure");

const args = { chromium: process.env.DVMD_CHROMIUM || "/usr/bin/chromium" };
const argv = process.argv.slice(2);
for (let i = 0; i < argv.length; i += 2) args[argv[i].replace(/^--/, "")] = argv[i + 1];
for (const needed of ["url", "secret", "screenshot"]) {
  if (!args[needed]) {
    process.stderr.write(`browser.mjs: --${needed} is required\n`);
    process.exit(2);
  }
}
const secret = Uint8Array.from(Buffer.from(args.secret, "hex"));
const say = (line) => process.stdout.write(JSON.stringify(line) + "\n");
const lines = readline.createInterface({ input: process.stdin })[Symbol.asyncIterator]();
const hear = async () => (await lines.next()).value.trim();

const browser = await chromium.launch({
  executablePath: args.chromium,
  args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
});
const page = await browser.newPage({ viewport: { width: 1100, height: 1400 } });
const fail = async (why) => {
  process.stderr.write(`browser.mjs: ${why}\n--- page ---\n${await page.innerText("body").catch(() => "")}\n`);
  await browser.close();
  process.exit(1);
};
page.on("pageerror", (e) => process.stderr.write(`browser.mjs: page error: ${e.message}\n`));

// The extension: a NIP-07 provider whose key lives here, outside the page.
await page.exposeFunction("__dvmdPublicKey", () => getPublicKey(secret));
await page.exposeFunction("__dvmdSign", (event) => finalizeEvent(event, secret));
await page.addInitScript(() => {
  window.nostr = {
    getPublicKey: () => window.__dvmdPublicKey(),
    signEvent: (event) => window.__dvmdSign(event),
  };
});
const number = async (id) => Number(await page.textContent(`#${id}`));
const until = async (what, check, ms = 30000) => {
  const deadline = Date.now() + ms;
  while (Date.now() < deadline) {
    if (await check()) return;
    await page.waitForTimeout(100);
  }
  await fail(`timed out waiting for ${what}`);
};

const started = Date.now();
await page.goto(args.url);
await page.click("#signin");
await until("the account", () => page.isVisible("#app"));
say({ step: "signed_in", ms: Date.now() - started, balance_msat: await number("balance") });

await page.fill("#topup-amount", "50000");
await page.click("#topup");
await until("the invoice", async () => (await page.textContent("#invoice")).startsWith("ln"));
const qr = await page.$eval("#qr", (img) => img.complete && img.naturalWidth > 0);
if (!qr) await fail("the QR code did not load");
say({ step: "invoice", bolt11: await page.textContent("#invoice") });
if ((await hear()) !== "paid") await fail("the test did not pay");
await until("the balance", async () => (await number("balance")) >= 50000);
say({ step: "topped_up", balance_msat: await number("balance") });

await page.fill("#chat-input", "Say hello in five words.");
const asked = Date.now();
await page.click("#chat-send");
await until("the first words", async () => (await page.textContent("#chat-output")).length > 0);
const firstAnswer = Date.now() - asked;
await until("the end of the answer", () => page.isVisible("#chat-done"), 120000);
say({
  step: "chatted",
  text: await page.textContent("#chat-output"),
  cost: await page.textContent("#chat-cost"),
  first_answer_ms: firstAnswer,
  sign_in_to_first_answer_ms: asked - started + firstAnswer,
});
const rows = await page.$$eval("#jobs tr", (trs) => trs.map((tr) => Array.from(tr.children, (td) => td.textContent)));
say({ step: "jobs", rows });

await page.check("#auto-payout");
await page.waitForTimeout(300);

say({ step: "withdraw" });
await page.fill("#withdraw-bolt11", await hear());
await page.click("#withdraw");
await until("the payout", async () => (await page.textContent("#withdraw-result")).length > 0);
say({
  step: "withdrawn",
  result: await page.textContent("#withdraw-result"),
  balance_msat: await number("balance"),
});

await page.screenshot({ path: args.screenshot, fullPage: true });
say({ step: "done", screenshot: args.screenshot });
await browser.close();
process.exit(0);
