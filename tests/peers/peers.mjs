// peers.mjs — how the test peers find their npm packages: $DVMD_NODE_PEERS (the directory
// .ci/node-peers.sh prints), then ${DVMD_CACHE:-~/.cache/dvmd}/node-peers, then a node_modules
// next to these scripts.

import { createRequire } from "node:module";
import { fileURLToPath } from "node:url";
import os from "node:os";
import path from "node:path";

/** A `require` that resolves `probe` (a package path), or exit 2 with where it looked. */
export function peersRequire(probe, name) {
  const bases = [];
  if (process.env.DVMD_NODE_PEERS) bases.push(process.env.DVMD_NODE_PEERS);
  bases.push(path.join(process.env.DVMD_CACHE || path.join(os.homedir(), ".cache", "dvmd"), "node-peers"));
  bases.push(path.dirname(fileURLToPath(import.meta.url)));
  for (const base of bases) {
    const req = createRequire(path.join(base, "__peers__.js"));
    try {
      req.resolve(probe);
      return req;
    } catch {
      // next
    }
  }
  process.stderr.write(
    `${name}: error: ${probe} not found (looked in ${bases.join(", ")}): run .ci/node-peers.sh and set DVMD_NODE_PEERS\n`,
  );
  process.exit(2);
}
