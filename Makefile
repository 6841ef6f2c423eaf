# Tapestry: the two commands a fresh machine needs are `make demo` and `make test`.
# `make test` (and bench, demo-cluster, demo-node, images) runs `make setup` first: everything;
# `make demo` runs `make setup-demo`: only what the demo uses. Both are idempotent and install
# what is missing (scripts/setup.sh).

CARGO ?= cargo
export CARGO_TERM_COLOR ?= never

.PHONY: conformance reliability setup setup-demo build release lint test test-unit test-integration demo demo-cluster demo-node bench clean-lab uninstall manifests images fuzz

setup:
	@bash scripts/setup.sh

## The demo's share of `make setup`: Debian packages, the nightly with rust-src, bpf-linker, bpffs,
## the QEMU guest. No Go, no CNI reference plugins, no Kubernetes, no images.
setup-demo:
	@bash scripts/setup.sh --demo

## The binaries tapestry-demo runs: itself, tapestryd, and tapestry-cni (the VM pod's CNI chain).
## `--workspace` with `--bin`s builds only those (and what they depend on) but resolves features
## as the whole workspace does. In the dev profile, as `make build` (the first build of
## `make test`), which then reuses every crate built here: 3-4 minutes cold on 2 vCPUs where the
## release profile takes 10-12. The datapath is the same: aya-build always builds the eBPF
## programs with --release.
DEMO_BINS := --bin tapestry-demo --bin tapestryd --bin tapestry-cni

build: setup
	$(CARGO) build --workspace --bins

release: setup
	$(CARGO) build --workspace --bins --release

lint: setup
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

## Everything: formatting and clippy, unit tests, in-kernel packet tests, netns integration tests,
## the Kubernetes tests, the images (`make images`: the chart on the real node runs them), then
## every fuzz target for TEST_FUZZ_SECONDS each (scripts/fuzz.sh; results in target/fuzz.json).
TEST_FUZZ_SECONDS ?= 30
test: lint build images
	$(CARGO) test --workspace --no-fail-fast
	@bash scripts/setup.sh --with-fuzz
	FUZZ_SECONDS=$(TEST_FUZZ_SECONDS) FUZZ_RESULTS=target/fuzz.json bash scripts/fuzz.sh

## A single-host lab in standalone mode: pods behind a Service VIP, one request at a time.
## `make demo DEMO_ARGS=--keep` leaves the lab up.
demo: setup-demo
	$(CARGO) build --workspace $(DEMO_BINS)
	./target/debug/tapestry-demo $(DEMO_ARGS)

## Three Kubernetes nodes on this host (network namespaces on one fabric, a real apiserver, a
## tapestryd per node in Kubernetes mode): one Service over pods on all three and VMs on two
## (tests/src/cluster.rs). `DEMO_ARGS=--no-vm` skips the guests, `--hold` keeps it up.
demo-cluster: release
	./target/release/tapestry-demo-cluster $(DEMO_ARGS)

## A real Kubernetes node on this machine (kubelet + containerd, no registry, no kube-proxy) with
## Tapestry installed by its Helm chart: two pods and a VM pod behind one ClusterIP
## (tests/src/node.rs). `make demo-node DEMO_ARGS=--hold` keeps it up until Ctrl-C;
## `DEMO_ARGS=--cleanup` removes a node left by a killed run.
demo-node: release images
	./target/release/tapestry-demo-node $(DEMO_ARGS)

## Upstream Kubernetes' sig-network Service e2e specs (every one a single node can run: the
## focus and skips are in tests/src/conformance.rs) against the real node of `make demo-node`,
## with Tapestry installed by its chart as the only service proxy and CoreDNS as the cluster DNS;
## writes bench/results/conformance.json and conformance.md. `make test` runs the
## `[Conformance]` subset (tests/tests/conformance.rs). CONFORMANCE_ARGS: see --help.
conformance: release images
	./target/release/tapestry-conformance $(CONFORMANCE_ARGS)

## Side-by-side benchmarks (the datapath, then the CNI step and the VM tap path);
## results in bench/results/.
bench: setup
	bash bench/bench.sh $(BENCH_ARGS)

## Fuzzing (cargo fuzz on nightly): every target of fuzz-targets/ for FUZZ_SECONDS each from its
## committed seed corpus (fuzz-targets/corpus/); executions and crashes per target in
## bench/results/fuzz.json; fails on any crash (scripts/fuzz.sh).
FUZZ_SECONDS ?= 30
fuzz:
	@bash scripts/setup.sh --with-fuzz
	FUZZ_SECONDS=$(FUZZ_SECONDS) bash scripts/fuzz.sh

## Reliability under bad input and faults (issue 13): make fuzz, the differential tests of every
## tc program, the hostile guest, then faults under load (kill -9 loop, a broken state file,
## conntrack pressure, CNI ADD with the daemon down, ADD/DEL cycles across a restart); writes
## bench/results/reliability.json and reliability.md. RELIABILITY_ARGS=--quick: short rounds.
reliability:
	@bash scripts/setup.sh --with-fuzz
	FUZZ_SECONDS=$(FUZZ_SECONDS) RELIABILITY_ARGS="$(RELIABILITY_ARGS)" bash bench/reliability.sh

## Removes the pinned datapath (detaching it from every interface).
uninstall: setup-demo
	$(CARGO) build --workspace --bin tapestryd
	./target/debug/tapestryd --uninstall

## The Guest CRD (printed by tapestry-controller) into the Helm chart, and the chart rendered
## into deploy/manifests/tapestry.yaml with namespace.create=true (the file creates its own
## namespace, for `kubectl apply -f`); tests/tests/deploy.rs fails when either drifts.
CHART := deploy/helm/tapestry
manifests:
	$(CARGO) run -q -p tapestry-controller -- crd > deploy/manifests/.crd.tmp
	mv deploy/manifests/.crd.tmp $(CHART)/crds/guests.tapestry.dev.yaml
	bin=$$(PATH="$$PATH:/usr/local/go/bin" bash scripts/build-k8s.sh helm) && \
	  $$bin/helm template tapestry $(CHART) --namespace tapestry --include-crds \
	  --set namespace.create=true \
	  > deploy/manifests/tapestry.yaml.tmp
	mv deploy/manifests/tapestry.yaml.tmp deploy/manifests/tapestry.yaml

## The daemon, controller and install-cni images (FROM scratch, static musl binaries) built with
## podman and saved as OCI archives in ~/.cache/tapestry/images (scripts/build-images.sh).
images: setup
	bash scripts/build-images.sh
