#!/usr/bin/env bash
# .ci/lnbits.sh — make sure LNbits 1.6.2 is installed in a venv in the dvmd
# cache, and print the absolute path of its `lnbits` executable on stdout.
# Everything else (progress, pip output) goes to stderr or to a log file.
#
# The integration tests start it with the FakeWallet funding source (no
# Lightning node, no network); see tests/integration/lnbits.rs, which reads
# the path from $DVMD_LNBITS.
#
# Idempotent: the first run creates $VENV and pip-installs LNbits (30-60 s);
# every later run finds the stamp file, checks that it was written for the same
# pins and that the executable is still there, and prints the path without
# running pip or python. A lock serializes concurrent first runs.
#
# Pins: `pip install lnbits==1.6.2` alone resolves bitstring 5.0.0, which
# removed ConstBitStream and breaks `import bolt11` (so LNbits cannot start).
# Several of LNbits' requirements are open-ended (wasmtime>=45, pyinstrument,
# urllib3), so the whole tree is pinned through a constraints file: the exact
# set that was verified to work (Python 3.11, Linux x86_64). Changing any pin
# changes the stamp and reinstalls.
#
# Env:
#   DVMD_CACHE  cache root (default $HOME/.cache/dvmd)
#   PYTHON      interpreter for the venv (default: the first of python3,
#               python3.12, python3.11, python3.10 that is >=3.10,<3.13,
#               which LNbits 1.6.2 requires)
set -euo pipefail

LNBITS_VERSION=1.6.2

log() { printf 'lnbits.sh: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# Direct requirements, then the full verified tree as constraints.
REQUIREMENTS=("lnbits==$LNBITS_VERSION" "bitstring<5")
CONSTRAINTS='aiohappyeyeballs==2.7.1
aiohttp==3.14.5
aiosignal==1.4.0
aiosqlite==0.22.1
annotated-doc==0.0.7
anyio==4.14.2
asn1crypto==1.5.1
asyncpg==0.31.0
attrs==26.1.0
base58==2.1.1
bcrypt==5.0.0
bech32==1.2.0
bip32==5.0.0
bitarray==3.12.3
bitstring==4.4.0
bolt11==2.1.1
certifi==2026.10.19.post1
cffi==2.1.1
charset-normalizer==3.5.3
click==8.3.3
coincurve==20.0.0
coincurve-cp314-fix==22.0.1
cryptography==50.0.2
Deprecated==1.3.1
dnspython==2.9.2
email-validator==2.4.0
embit==0.8.0
fastapi==0.116.2
fastapi-sso==0.19.0
filetype==1.2.0
frozenlist==1.8.0
greenlet==3.3.2
grpcio==1.76.0
h11==0.16.0
http_ece==1.2.1
httpcore==1.0.9
httpx==0.27.2
idna==3.20
itsdangerous==2.2.0
Jinja2==3.1.6
jsonpath-ng==1.7.0
limits==5.8.0
lnbits==1.6.2
lnurl==0.10.4
loguru==0.7.3
markdown-it-py==4.3.0
MarkupSafe==3.0.4
mdurl==0.1.2
multidict==7.2.1
nostr-sdk==0.44.8
oauthlib==4.0.1
packaging==25.0
pillow==12.3.0
ply==3.11
propcache==0.5.4
protobuf==6.33.6
py-vapid==1.9.6
pycparser==3.12
pycryptodomex==3.23.0
pydantic==1.10.27
Pygments==2.21.0
pyinstrument==5.1.3
PyJWT==2.12.1
pyln-bolt7==1.0.246
pyln-client==25.12
pyln-proto==26.6.9
pynostr==0.7.0
PyQRCode==1.2.1
PySocks==1.7.1
python-crontab==3.3.0
python-dotenv==1.2.4
python-multipart==0.0.34
pywebpush==2.2.1
random-username==1.0.2
requests==2.34.2
rich==15.0.0
shellingham==1.5.4
shortuuid==1.0.13
slowapi==0.1.10
sniffio==1.3.1
socksio==1.0.0
SQLAlchemy==1.4.54
sse-starlette==2.3.6
starlette==0.48.0
tibs==0.5.7
tlv8==0.10.0
tornado==6.6.1
typer==0.28.0
typing_extensions==4.15.0
urllib3==2.8.0
uvicorn==0.40.0
uvloop==0.22.1
wasmtime==50.0.1
websocket-client==1.9.2
websockets==15.0.1
wrapt==2.5.2
yarl==1.25.1'

CACHE="${DVMD_CACHE:-$HOME/.cache/dvmd}"
VENV="$CACHE/venv-lnbits-$LNBITS_VERSION"
STAMP="$VENV/.dvmd-lnbits"
LOCK="$CACHE/.lnbits.lock"
INSTALL_LOG="$CACHE/lnbits-install-$LNBITS_VERSION.log"
BIN="$VENV/bin/lnbits"

# The stamp records what was installed: a change of pins invalidates it.
SPEC="$(printf '%s\n' "${REQUIREMENTS[@]}" "$CONSTRAINTS" | sha256sum | cut -d' ' -f1)"

# Fast path: no pip, no python. The stamp holds the spec hash and the path.
fast_path() {
    [[ -f "$STAMP" ]] || return 1
    local spec bin
    { read -r spec && read -r bin; } <"$STAMP" || return 1
    [[ "$spec" == "$SPEC" && "$bin" == "$BIN" ]] || return 1
    # -x follows symlinks: bin/python must still point at a live interpreter.
    [[ -x "$bin" && -x "$VENV/bin/python" ]] || return 1
    printf '%s\n' "$bin"
}

if fast_path; then
    exit 0
fi

mkdir -p "$CACHE"
exec 9>"$LOCK"
if ! flock -n 9; then
    log "another install holds $LOCK; waiting"
    flock 9
fi
# Someone else may have finished the install while we waited.
if fast_path; then
    exit 0
fi
rm -f "$STAMP"

python_ok() {
    "$1" -c 'import sys, venv; sys.exit(0 if (3, 10) <= sys.version_info[:2] < (3, 13) else 1)' >/dev/null 2>&1
}
PY=""
if [[ -n "${PYTHON:-}" ]]; then
    python_ok "$PYTHON" || die "PYTHON=$PYTHON is not a Python >=3.10,<3.13 with venv (LNbits $LNBITS_VERSION needs one)"
    PY="$PYTHON"
else
    for candidate in python3 python3.12 python3.11 python3.10; do
        if command -v "$candidate" >/dev/null && python_ok "$candidate"; then
            PY="$candidate"
            break
        fi
    done
    [[ -n "$PY" ]] || die "no Python >=3.10,<3.13 with the venv module found (LNbits $LNBITS_VERSION needs one; set PYTHON=...)"
fi

# A venv from an interrupted run or another interpreter is rebuilt from scratch.
if [[ -d "$VENV" ]]; then
    log "removing incomplete or outdated venv $VENV"
    rm -rf "$VENV"
fi
log "creating venv $VENV with $("$PY" -c 'import sys; print(sys.executable, sys.version.split()[0])')"
"$PY" -m venv "$VENV" >&2

CONSTRAINTS_FILE="$VENV/dvmd-constraints.txt"
printf '%s\n' "$CONSTRAINTS" >"$CONSTRAINTS_FILE"

log "pip install ${REQUIREMENTS[*]} (pinned tree, ~1 min); log: $INSTALL_LOG"
start=$(date +%s)
if ! "$VENV/bin/python" -m pip install --disable-pip-version-check --no-input \
        -c "$CONSTRAINTS_FILE" "${REQUIREMENTS[@]}" >"$INSTALL_LOG" 2>&1; then
    tail -n 40 "$INSTALL_LOG" >&2
    die "pip install lnbits==$LNBITS_VERSION failed (full log: $INSTALL_LOG)"
fi
log "pip install finished in $(( $(date +%s) - start ))s"

[[ -x "$BIN" ]] || die "lnbits executable not found at $BIN"
# The FakeWallet imports bolt11, the import a wrong bitstring breaks; the
# harness needs static/ and templates/ from the package. Importing LNbits'
# settings writes $LNBITS_DATA_FOLDER/.lnbits_auth_key (default ./data): run
# the check in a scratch directory so nothing lands in the caller's tree.
check_dir="$(mktemp -d)"
trap 'rm -rf "$check_dir"' EXIT
if ! pkg="$(cd "$check_dir" && LNBITS_DATA_FOLDER="$check_dir/data" "$VENV/bin/python" -c \
        'import bolt11, lnbits.wallets.fake, os, lnbits; print(os.path.dirname(lnbits.__file__))' 2>&1)"; then
    printf '%s\n' "$pkg" >&2
    die "LNbits does not import (rm -rf $VENV to reinstall)"
fi
[[ -d "$pkg/static" && -d "$pkg/templates" ]] || die "LNbits package at $pkg lacks static/ or templates/"

printf '%s\n%s\n' "$SPEC" "$BIN" >"$STAMP.tmp"
mv -f "$STAMP.tmp" "$STAMP"
log "installed LNbits $LNBITS_VERSION at $BIN"
printf '%s\n' "$BIN"
