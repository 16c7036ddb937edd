#!/usr/bin/env python3
"""An independent NIP-90 customer, written against rust-nostr's Python bindings
(PyPI `nostr-sdk`, pinned in requirements.txt), used to check dvmd end to end
with code that shares nothing with dvmd itself.

Flow: fresh key -> connect to the relay -> subscribe to kinds 7000/6050 tagged
`#e` = our request id -> publish a kind 5050 job request -> on
`payment-required` feedback, pay the bolt11 through dvmd's dev-pay endpoint ->
on the kind 6050 result, verify it and print its content.

Exit status: 0 on a valid result, 1 on error feedback, an invalid result,
a failed payment, a relay problem or timeout, 2 on bad usage.
Every step prints one line on stdout prefixed with `customer.py:`.
"""

import argparse
import asyncio
import json
import sys
import time
import urllib.error
import urllib.request
from datetime import timedelta

from nostr_sdk import (
    Client,
    EventBuilder,
    Filter,
    Keys,
    Kind,
    PublicKey,
    RelayUrl,
    ReqTarget,
    Tag,
)

REQUEST_KIND = 5050
RESULT_KIND = REQUEST_KIND + 1000
FEEDBACK_KIND = 7000


class Fail(Exception):
    """Ends the run with exit status 1; the message has already been explained."""


def say(msg: str) -> None:
    print(f"customer.py: {msg}", flush=True)


def tag_map(event) -> dict:
    """First occurrence of each tag name -> its full value list (name included)."""
    out = {}
    for tag in event.tags():
        vec = tag.to_vec()
        if vec and vec[0] not in out:
            out[vec[0]] = vec
    return out


def dev_pay(url: str, bolt11: str, timeout: float) -> dict:
    """POST {"bolt11": ...} to dvmd's dev-pay endpoint; expect 200 + JSON with a preimage."""
    body = json.dumps({"bolt11": bolt11}).encode()
    req = urllib.request.Request(
        url, data=body, method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status = resp.status
            raw = resp.read()
    except urllib.error.HTTPError as e:
        detail = e.read()[:300].decode(errors="replace")
        raise Fail(f"dev-pay returned HTTP {e.code}: {detail}") from None
    except (urllib.error.URLError, OSError) as e:
        raise Fail(f"dev-pay request failed: {e}") from None
    if status != 200:
        raise Fail(f"dev-pay returned HTTP {status}")
    try:
        data = json.loads(raw)
    except ValueError:
        raise Fail(f"dev-pay answer is not JSON: {raw[:300]!r}") from None
    if not isinstance(data, dict) or not data.get("preimage"):
        raise Fail(f"dev-pay answer has no preimage: {data!r}")
    return data


async def connect(client: Client, relay: str, deadline: float) -> None:
    url = RelayUrl.parse(relay)
    await client.add_relay(url)
    while True:
        left = deadline - time.monotonic()
        out = await client.try_connect(timedelta(seconds=max(1.0, min(5.0, left))))
        if out.success:
            return
        if time.monotonic() >= deadline:
            reasons = "; ".join(f"{u}: {r}" for u, r in out.failed.items())
            raise Fail(f"could not connect to {relay}: {reasons or 'timeout'}")
        await asyncio.sleep(0.5)


async def run(args) -> int:
    deadline = time.monotonic() + args.timeout
    keys = Keys.generate()
    me = keys.public_key()
    say(f"customer pubkey {me.to_hex()}")

    service = None
    if args.service_pubkey:
        try:
            service = PublicKey.parse(args.service_pubkey)
        except Exception as e:  # noqa: BLE001 - SDK raises NostrSdkError subclasses
            say(f"bad --service-pubkey: {e}")
            return 2

    tags = [
        Tag.parse(["i", args.prompt, "text"]),
        Tag.parse(["param", "max_tokens", str(args.max_tokens)]),
        Tag.parse(["bid", str(args.bid)]),
    ]
    if service is not None:
        tags.append(Tag.parse(["p", service.to_hex()]))
    # Signed locally: in nostr-sdk 0.45 the Client has no signer of its own.
    request = EventBuilder(Kind(REQUEST_KIND), "").tags(tags).finalize(keys)
    req_id = request.id().to_hex()

    client = Client()
    try:
        await connect(client, args.relay, deadline)
        say(f"connected to {args.relay}")

        # Take the notification stream before subscribing: it only carries
        # what arrives after it was created.
        stream = client.notifications()
        flt = (
            Filter()
            .kinds([Kind(FEEDBACK_KIND), Kind(RESULT_KIND)])
            .event(request.id())
        )
        sub = await client.subscribe(ReqTarget.auto([flt]))
        if not sub.success:
            raise Fail(f"subscribe failed: {dict(sub.failed)}")
        say(f"subscribed to kinds {FEEDBACK_KIND},{RESULT_KIND} #e={req_id}")

        sent = await client.send_event(request)
        if not sent.success:
            reasons = "; ".join(f"{u}: {r}" for u, r in sent.failed.items())
            raise Fail(f"relay rejected request {req_id}: {reasons}")
        say(f"published kind {REQUEST_KIND} request {req_id} bid={args.bid}msat")

        paid = set()
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise Fail(f"timeout after {args.timeout}s waiting for the result")
            try:
                note = await asyncio.wait_for(stream.next(), timeout=left)
            except asyncio.TimeoutError:
                raise Fail(f"timeout after {args.timeout}s waiting for the result") from None
            if note is None or note.is_shutdown():
                raise Fail("client notification stream ended")
            if not note.is_new_event():
                continue
            event = note.event
            kind = event.kind().as_u16()
            if kind not in (FEEDBACK_KIND, RESULT_KIND):
                continue
            t = tag_map(event)
            e_tag = t.get("e")
            if not e_tag or len(e_tag) < 2 or e_tag[1] != req_id:
                say(f"ignoring kind {kind} {event.id().to_hex()}: e tag {e_tag} is not our request")
                continue
            author = event.author().to_hex()
            if service is not None and author != service.to_hex():
                say(f"ignoring kind {kind} from {author}: not --service-pubkey")
                continue
            if not event.verify():
                raise Fail(f"kind {kind} {event.id().to_hex()} has a bad id or signature")

            if kind == FEEDBACK_KIND:
                status_tag = t.get("status")
                if not status_tag or len(status_tag) < 2:
                    say(f"feedback {event.id().to_hex()} without status tag: {event.as_json()}")
                    continue
                status = status_tag[1]
                info = status_tag[2] if len(status_tag) > 2 else ""
                say(f"feedback status={status}" + (f" info={info}" if info else ""))
                if status == "error":
                    raise Fail(f"service reported error: {info or event.content()}")
                if status == "payment-required":
                    amount = t.get("amount")
                    if not amount or len(amount) < 3 or not amount[2]:
                        raise Fail(f"payment-required without [amount, msat, bolt11]: {amount}")
                    msat, bolt11 = amount[1], amount[2]
                    if bolt11 in paid:
                        say("invoice already paid; ignoring repeated payment-required")
                        continue
                    try:
                        if int(msat) > args.bid:
                            raise Fail(f"asked for {msat} msat, more than our bid {args.bid}")
                    except ValueError:
                        raise Fail(f"amount tag has a non-integer msat value: {msat!r}") from None
                    say(f"paying {msat} msat via {args.dev_pay_url}")
                    left = max(1.0, deadline - time.monotonic())
                    data = await asyncio.to_thread(dev_pay, args.dev_pay_url, bolt11, left)
                    paid.add(bolt11)
                    say(f"paid, preimage={data['preimage']}")
                continue

            # kind 6050: the job result
            missing = [name for name in ("request", "e", "p", "i") if name not in t]
            if missing:
                raise Fail(f"result {event.id().to_hex()} lacks tags {missing}: {event.as_json()}")
            if t["p"][1] != me.to_hex():
                raise Fail(f"result p tag {t['p'][1]} is not our pubkey")
            try:
                echoed = json.loads(t["request"][1])
            except (ValueError, IndexError):
                raise Fail("result request tag is not the stringified request event") from None
            if not isinstance(echoed, dict) or echoed.get("id") != req_id:
                raise Fail("result request tag does not hold our request event")
            say(f"result {event.id().to_hex()} from {author} verified (signature, request/e/p/i tags)")
            # json.dumps keeps a multi-line completion on one line.
            say("content " + json.dumps(event.content(), ensure_ascii=False))
            return 0
    finally:
        try:
            await asyncio.wait_for(client.shutdown(), timeout=5)
        except Exception:  # noqa: BLE001 - best effort on the way out
            pass


def main() -> int:
    ap = argparse.ArgumentParser(description="NIP-90 kind 5050 customer for testing dvmd")
    ap.add_argument("--relay", required=True, help="relay URL, e.g. ws://127.0.0.1:7777")
    ap.add_argument("--dev-pay-url", required=True, help="dvmd dev-pay endpoint, e.g. http://127.0.0.1:8080/dev/pay")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--timeout", type=float, default=60.0, help="overall seconds (default 60)")
    ap.add_argument("--service-pubkey", help="hex pubkey of the DVM: p-tag the request, ignore other authors")
    ap.add_argument("--bid", type=int, default=10_000_000, help="bid in msat (default 10000000)")
    ap.add_argument("--max-tokens", type=int, default=32, help=argparse.SUPPRESS)
    args = ap.parse_args()
    try:
        return asyncio.run(run(args))
    except Fail as e:
        say(f"FAIL: {e}")
        return 1
    except KeyboardInterrupt:
        return 1


if __name__ == "__main__":
    sys.exit(main())
