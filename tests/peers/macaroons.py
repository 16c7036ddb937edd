#!/usr/bin/env python3
"""Macaroons read and made by PyPI `pymacaroons` (libmacaroons' format in pure
Python), to check dvmd's L402 macaroons against an implementation that shares
nothing with dvmd.

  macaroons.py inspect --macaroon B64 --root-key HEX
      One JSON line: {"location", "identifier" (hex), "caveats": [text],
      "signature" (hex), "verified": whether pymacaroons' Verifier accepts it
      under that root key (every first-party caveat satisfied)}.
  macaroons.py mint --root-key HEX --identifier HEX [--caveat TEXT]...
      One JSON line: {"macaroon": version 2 binary, base64 as pymacaroons
      writes it (URL-safe, unpadded)}.
"""

import argparse
import json

from pymacaroons import MACAROON_V2, Macaroon, Verifier
from pymacaroons.serializers import BinarySerializer


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["inspect", "mint"])
    parser.add_argument("--root-key", required=True)
    parser.add_argument("--macaroon")
    parser.add_argument("--identifier")
    parser.add_argument("--caveat", action="append", default=[])
    args = parser.parse_args()
    key = bytes.fromhex(args.root_key)
    if args.mode == "inspect":
        mac = Macaroon.deserialize(args.macaroon, serializer=BinarySerializer())
        verifier = Verifier()
        verifier.satisfy_general(lambda caveat: True)
        try:
            verified = verifier.verify(mac, key)
        except Exception:  # pymacaroons raises its own failure types
            verified = False
        text = lambda v: v.decode() if isinstance(v, bytes) else v
        print(json.dumps({
            "location": text(mac.location),
            "identifier": mac.identifier_bytes.hex(),
            "caveats": [text(c.caveat_id) for c in mac.caveats],
            "signature": text(mac.signature),
            "verified": verified,
        }))
    else:
        mac = Macaroon(
            location="dvmd",
            identifier=bytes.fromhex(args.identifier),
            key=key,
            version=MACAROON_V2,
        )
        for caveat in args.caveat:
            mac.add_first_party_caveat(caveat)
        print(json.dumps({"macaroon": mac.serialize(serializer=BinarySerializer())}))


if __name__ == "__main__":
    main()
