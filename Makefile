# Tapestry: the two commands a fresh machine needs are `make demo` and `make test`.
# Both run `make setup` first (idempotent; installs what is missing, see scripts/setup.sh).

CARGO ?= cargo
export CARGO_TERM_COLOR ?= never

.PHONY: setup build release lint test test-unit test-integration demo bench clean-lab uninstall

setup:
	@bash scripts/setup.sh

build: setup
	$(CARGO) build --workspace --bins

release: setup
	$(CARGO) build --workspace --bins --release

lint: setup
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

## Everything: formatting and clippy, unit tests, in-kernel packet tests, netns integration tests.
test: lint build
	$(CARGO) test --workspace --no-fail-fast

## A single-host lab in standalone mode: pods behind a Service VIP, one request at a time.
## `make demo DEMO_ARGS=--keep` leaves the lab up.
demo: release
	./target/release/tapestry-demo $(DEMO_ARGS)

## Side-by-side benchmarks (the datapath, then the CNI step and the VM tap path);
## results in bench/results/.
bench: setup
	bash bench/bench.sh $(BENCH_ARGS)

## Removes the pinned datapath (detaching it from every interface).
uninstall: release
	./target/release/tapestryd --uninstall
