#!/usr/bin/env bash
# .ci/node-peers.sh — install the Node test peers (tests/peers/package.json:
# @getalby/sdk's NWCWalletService and friends) into the dvmd cache, OUTSIDE the
# repo, and print the directory that holds their node_modules/ on stdout.
# Everything else (npm output, progress) goes to stderr or to a log file.
#
#   NODE_PEERS=$(bash .ci/node-peers.sh)
#   DVMD_NODE_PEERS=$NODE_PEERS node tests/peers/nwc_service.mjs --relay ... --lnbits ...
#
# (nwc_service.mjs finds its packages through $DVMD_NODE_PEERS, then
# ${DVMD_CACHE:-$HOME/.cache/dvmd}/node-peers, then NODE_PATH / a node_modules
# next to it.)
#
# Idempotent: package.json + package-lock.json are copied to
# $CACHE/node-peers and `npm ci` runs there (npm's own cache in
# $CACHE/npm-cache); the stamp is the sha256 of both files, so the next run
# with the same lock file prints the path without running npm. A lock
# serializes concurrent first runs.
#
# The packages are pure JavaScript (no native builds, no downloads at install
# time). mppx (the HTTP Payment scheme's reference client) is ESM; the peers
# load it with require(), which node >= 20.19 does. @getalby/sdk 8.x declares engines.node >=22; it works on node 20 when
# a WebSocket implementation is provided (nwc_service.mjs installs `ws` as
# globalThis.WebSocket before loading the SDK), so npm's EBADENGINE warning is
# expected and harmless on node 20.
#
# Env:
#   DVMD_CACHE  cache root (default $HOME/.cache/dvmd)
#   NODE, NPM   node and npm executables (default: from PATH)
set -euo pipefail

log() { printf 'node-peers.sh: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SRC="$ROOT/tests/peers"
CACHE="${DVMD_CACHE:-$HOME/.cache/dvmd}"
DIR="$CACHE/node-peers"
STAMP="$DIR/.dvmd-node-peers"
LOCK="$CACHE/.node-peers.lock"
LOG="$CACHE/node-peers-install.log"
NODE="${NODE:-node}"
NPM="${NPM:-npm}"

[[ -f "$SRC/package.json" && -f "$SRC/package-lock.json" ]] \
    || die "$SRC/package.json or package-lock.json missing"
SPEC="$(cat "$SRC/package.json" "$SRC/package-lock.json" | sha256sum | cut -d' ' -f1)"

fast_path() {
    [[ -f "$STAMP" ]] || return 1
    [[ "$(<"$STAMP")" == "$SPEC" ]] || return 1
    [[ -f "$DIR/node_modules/@getalby/sdk/package.json" && -f "$DIR/node_modules/ws/package.json" \
        && -f "$DIR/node_modules/mppx/package.json" ]] || return 1
    printf '%s\n' "$DIR"
}

if fast_path; then
    exit 0
fi

command -v "$NODE" >/dev/null || die "node not found (apt-get install nodejs npm)"
command -v "$NPM" >/dev/null || die "npm not found (apt-get install npm)"
node_major="$("$NODE" -p 'process.versions.node.split(".")[0]')"
(( node_major >= 20 )) || die "node $("$NODE" --version) is too old: nwc_service.mjs needs node >= 20"

mkdir -p "$CACHE"
exec 9>"$LOCK"
if ! flock -n 9; then
    log "another install holds $LOCK; waiting"
    flock 9
fi
if fast_path; then
    exit 0
fi

rm -f "$STAMP"
mkdir -p "$DIR"
cp "$SRC/package.json" "$SRC/package-lock.json" "$DIR/"

log "npm ci in $DIR (node $("$NODE" --version), npm $("$NPM" --version)); log: $LOG"
start=$(date +%s)
if ! (cd "$DIR" && npm_config_cache="$CACHE/npm-cache" "$NPM" ci \
        --no-audit --no-fund --no-update-notifier --loglevel=warn) >"$LOG" 2>&1; then
    tail -n 40 "$LOG" >&2
    die "npm ci failed (full log: $LOG)"
fi
log "npm ci finished in $(( $(date +%s) - start ))s"

# The service must load: the SDK, the bolt11 decoder and ws.
if ! out="$(cd "$DIR" && "$NODE" -e '
    require("@getalby/sdk/nwc"); require("@getalby/lightning-tools/bolt11"); require("ws");
    require("mppx"); require("mppx/client");
    console.log(JSON.parse(require("fs").readFileSync("node_modules/@getalby/sdk/package.json", "utf8")).version)' 2>&1)"; then
    printf '%s\n' "$out" >&2
    die "the installed packages do not load (rm -rf $DIR to reinstall)"
fi
log "installed @getalby/sdk $out in $DIR/node_modules"

printf '%s\n' "$SPEC" >"$STAMP.tmp"
mv -f "$STAMP.tmp" "$STAMP"
printf '%s\n' "$DIR"
