#!/usr/bin/env python3
"""Call dvmd's /v1/chat/completions with the official OpenAI SDK (PyPI `openai`),
signing every request with NIP-98 made by rust-nostr's Python bindings (PyPI
`nostr-sdk`) and hashlib: nothing here is shared with dvmd.

The SDK's HTTP client gets an `Auth` that replaces the API key with
`Authorization: Nostr <base64 kind 27235 event>` naming the request's URL,
method and sha256 of its body, plus a random `nonce` tag so two identical
requests in one second are two events.

Usage: openai_chat.py --base-url URL (--secret HEX | --api-key KEY) [--stream]
                      [--max-tokens N] [--model NAME] [--prompt TEXT] [--calls N]

With --api-key (an L402 token, `<macaroon>:<preimage>`) the SDK sends it as
`Authorization: Bearer <key>`, as it sends any API key; nothing is signed.
Prints one JSON line per call: {"status": 200, "content", "finish_reason",
"usage", "dvmd"} or {"status": <HTTP status>, "error": <the SDK's error body>,
"response": <the whole JSON answer>}.
"""

import argparse
import base64
import hashlib
import json
import secrets
import sys

import httpx2
import openai
from nostr_sdk import EventBuilder, Keys, Kind, SecretKey, Tag


class Nip98(httpx2.Auth):
    """NIP-98 for every request the SDK sends."""

    requires_request_body = True

    def __init__(self, keys):
        self.keys = keys

    def auth_flow(self, request):
        tags = [
            Tag.parse(["u", str(request.url)]),
            Tag.parse(["method", request.method]),
            Tag.parse(["nonce", secrets.token_hex(16)]),
        ]
        if request.content:
            tags.append(Tag.parse(["payload", hashlib.sha256(request.content).hexdigest()]))
        event = EventBuilder(Kind(27235), "").tags(tags).finalize(self.keys)
        token = base64.b64encode(event.as_json().encode()).decode()
        request.headers["Authorization"] = f"Nostr {token}"
        yield request


def call(client, args):
    messages = [{"role": "user", "content": args.prompt}]
    if not args.stream:
        done = client.chat.completions.create(
            model=args.model, messages=messages, max_tokens=args.max_tokens
        )
        return {
            "status": 200,
            "content": done.choices[0].message.content,
            "finish_reason": done.choices[0].finish_reason,
            "usage": done.usage.model_dump() if done.usage else None,
            "dvmd": (done.model_extra or {}).get("dvmd"),
        }
    content, finish, usage, dvmd, chunks = "", None, None, None, 0
    stream = client.chat.completions.create(
        model=args.model,
        messages=messages,
        max_tokens=args.max_tokens,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        chunks += 1
        for choice in chunk.choices:
            content += choice.delta.content or ""
            finish = choice.finish_reason or finish
        if chunk.usage:
            usage = chunk.usage.model_dump()
            dvmd = (chunk.model_extra or {}).get("dvmd")
    return {
        "status": 200,
        "content": content,
        "finish_reason": finish,
        "usage": usage,
        "dvmd": dvmd,
        "chunks": chunks,
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--secret")
    parser.add_argument("--api-key")
    parser.add_argument("--model", default="dvmd")
    parser.add_argument("--prompt", default="Say hello.")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--calls", type=int, default=1)
    args = parser.parse_args()
    if args.api_key:
        client = openai.OpenAI(
            base_url=args.base_url, api_key=args.api_key, max_retries=0, timeout=120
        )
    else:
        keys = Keys(SecretKey.parse(args.secret))
        client = openai.OpenAI(
            base_url=args.base_url,
            api_key="unused: NIP-98 signs each request",
            max_retries=0,
            timeout=120,
            http_client=httpx2.Client(auth=Nip98(keys), timeout=120),
        )
    for _ in range(args.calls):
        try:
            line = call(client, args)
        except openai.APIStatusError as e:
            try:
                response = e.response.json()
            except ValueError:
                response = None
            line = {"status": e.status_code, "error": e.body, "response": response}
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    sys.exit(main())
