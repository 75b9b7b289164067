# envd — run `make help` for the targets.
SHELL := /bin/bash
CARGO ?= cargo

MUSL := x86_64-unknown-linux-musl
STATIC_BIN := target/$(MUSL)/release/envd

SDK_VENV := .cache/sdk-venv
# Parallel test threads per test binary (each test starts its own envd).
TEST_THREADS ?= 4

.PHONY: help run test check deps sdk-deps bench build static qemu-deps qemu-test fuzz fuzz-deps

help: ## List the targets.
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-8s %s\n", $$1, $$2}'

run: ## Build and run envd on the default listener (tcp://127.0.0.1:49983).
	$(CARGO) run --locked --bin envd -- $(ARGS)

build: ## Build envd (debug).
	$(CARGO) build --locked --bin envd

deps: ## Install what the build and tests need: rustfmt, clippy, the musl target, and (as root, with apt) musl-tools.
	@command -v $(CARGO) >/dev/null || { echo "cargo is required (https://rustup.rs)"; exit 1; }
	@if command -v rustup >/dev/null; then rustup component add rustfmt clippy >/dev/null 2>&1 || true; fi
	@if command -v rustup >/dev/null && ! rustup target list --installed 2>/dev/null | grep -qx $(MUSL); then \
	  echo "deps: installing the Rust target $(MUSL)"; rustup target add $(MUSL); fi
	@if ! command -v musl-gcc >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "deps: installing musl-tools with apt-get (for the static build)"; \
	    apt-get update -qq && apt-get install -y -qq musl-tools; \
	  else echo "deps: musl-gcc not found; install musl-tools for 'make static'"; fi; fi

sdk-deps: ## Install the official E2B SDKs the tests drive envd with (Python venv, npm).
	@test -x $(SDK_VENV)/bin/python || python3 -m venv $(SDK_VENV)
	@$(SDK_VENV)/bin/python -c 'import e2b, grpc' 2>/dev/null || $(SDK_VENV)/bin/pip install -q -r tests/sdk/requirements.txt
	@if command -v npm >/dev/null; then \
	  test -d tests/sdk/js/node_modules/e2b || (cd tests/sdk/js && npm install --no-audit --no-fund --loglevel=error); \
	else echo "npm not found: the JS SDK suite will be skipped"; fi

check: deps ## Formatting and lints (warnings are errors).
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --locked --all-targets -- -D warnings

test: deps sdk-deps check ## Install what is needed, then run the whole suite (QEMU tests when root).
	@# As root (CI) everything must be there and nothing may skip
	@# (ENVD_REQUIRE_ALL_TESTS=1); without root the static build may lack
	@# musl-gcc, and the tests that need it, root or QEMU skip with a reason.
	@if [ "$$(id -u)" = 0 ]; then $(MAKE) --no-print-directory static; \
	 else $(MAKE) --no-print-directory static || echo "no static build: size and QEMU tests will skip"; fi
	@$(MAKE) --no-print-directory qemu-deps
	ENVD_REQUIRE_ALL_TESTS=$$(test "$$(id -u)" = 0 && echo 1) \
	  ENVD_STATIC=$$(test -x $(STATIC_BIN) && echo $(CURDIR)/$(STATIC_BIN)) \
	  $(CARGO) test --locked -- --test-threads=$(TEST_THREADS)

qemu-deps: ## Install QEMU, the guest kernel, busybox, vhost-device-vsock (root; cached in .cache/qemu).
	@bash tests/vm/setup.sh || echo "QEMU tests will be skipped (see above)"

qemu-test: static qemu-deps ## Boot envd in QEMU microVMs and drive it over vsock (skips with a reason without root/QEMU).
	ENVD_STATIC=$(CURDIR)/$(STATIC_BIN) $(CARGO) test --locked --test qemu --test size -- --nocapture --test-threads=1

static: ## Build the fully static release binary (musl) at target/x86_64-unknown-linux-musl/release/envd (`make deps` installs the musl toolchain).
	@command -v musl-gcc >/dev/null || { echo "static: musl-gcc not found; run 'make deps' (installs musl-tools)"; exit 1; }
	$(CARGO) build --locked --release --target $(MUSL) --bin envd
	@ls -l $(STATIC_BIN)

bench: deps static sdk-deps qemu-deps ## Benchmarks of the static binary: figures as ratios against baselines measured in the same run.
	ENVD_BIN=$(CURDIR)/$(STATIC_BIN) $(CARGO) bench --locked --bench efficiency
	ENVD_BIN=$(CURDIR)/$(STATIC_BIN) $(CARGO) bench --locked --bench process
	ENVD_BIN=$(CURDIR)/$(STATIC_BIN) $(CARGO) bench --locked --bench filesystem
	ENVD_BIN=$(CURDIR)/$(STATIC_BIN) $(CARGO) bench --locked --bench compat
	ENVD_BIN=$(CURDIR)/$(STATIC_BIN) $(CARGO) bench --locked --bench soak
	$(CARGO) build --locked --release --target $(MUSL) --example vsock_peer
	ENVD_STATIC=$(CURDIR)/$(STATIC_BIN) VSOCK_PEER=$(CURDIR)/target/$(MUSL)/release/examples/vsock_peer $(CARGO) bench --locked --bench vm

fuzz-deps: ## Install the nightly toolchain and cargo-fuzz (libFuzzer) for `make fuzz`.
	@rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
	@command -v cargo-fuzz >/dev/null || $(CARGO) install cargo-fuzz --locked

fuzz: fuzz-deps ## Fuzz every parser of untrusted input, FUZZ_SECONDS (default 60) per target; grows fuzz/corpus.
	FUZZ_SECONDS=$(or $(FUZZ_SECONDS),60) fuzz/run.sh
