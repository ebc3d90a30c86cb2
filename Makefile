# emissary: `make run` shows it working, `make test` proves it. Both install what they need.
SHELL := /bin/bash
.DEFAULT_GOAL := build

CARGO ?= cargo
TARGET := x86_64-unknown-linux-gnu
# The shipped emissary is static musl: glibc's static start-up asks the CPU about itself
# (cpuid) some 20 times, and in a VM each is a trap, ~4 µs here: 300 µs of every exec, more
# than all else the wrapper does (BENCHMARKS.md). The target comes from rustup; zstd's C code
# builds with musl-gcc (musl-tools). relocation-model=static: no PIE relocation at start-up.
STATIC_TARGET := x86_64-unknown-linux-musl
STATIC_RUSTFLAGS := -C target-feature=+crt-static -C relocation-model=static
STATIC_BIN := target/$(STATIC_TARGET)/static/emissary
AGENT_STATIC_BIN := target/$(TARGET)/agent-image/emissary-agent
SIZE_LIMIT := 2000000
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# Debian packages, installed only when missing.
TEST_PACKAGES := util-linux procps zstd gzip diffutils findutils python3 python3-venv buildah ca-certificates busybox-static python-is-python3
BENCH_PACKAGES := tini hyperfine zstd time
# Python test tools: offline Kubernetes schema validation (the PyPI package bundles the v1.32
# schemas) and schemathesis, which tests the agent against protocol/openapi.yaml.
VENV := .tools/venv
KUBERNETES_VALIDATE := $(VENV)/bin/kubernetes-validate
SCHEMATHESIS := $(VENV)/bin/schemathesis
IMAGE_DIR := target/images
# The test cluster's third-party programs (etcd, kube-apiserver, Argo), built from their Go
# modules into a cache outside the repository and linked here (tests/cluster/build.sh).
CLUSTER_BIN := target/cluster-bin

# $(call phase,NAME,COMMAND): runs COMMAND, then says how long it took (make test prints the
# time of each phase).
define phase
	@echo "== $(1)"; start=$$SECONDS; $(2); rc=$$?; echo "== $(1): $$((SECONDS - start)) s"; exit $$rc
endef

define apt_install
	@missing=""; for p in $(1); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi
endef

.PHONY: build static static-agent size lint test run bench bench-argo fuzz soak image clean deps-test deps-bench deps-static deps-manifests cluster-bin cluster

## build: debug builds of every binary
build:
	$(call phase,build,$(CARGO) build --workspace --bins)

## static: the shipped emissary, statically linked (musl) and stripped
static: deps-static
	$(call phase,static emissary,RUSTFLAGS="$(STATIC_RUSTFLAGS)" $(CARGO) build --profile static --target $(STATIC_TARGET) -p emissary)

## size: fails when the static emissary exceeds its budget
size: static
	@bytes=$$(stat -c %s $(STATIC_BIN)); \
	echo "emissary (static, stripped): $$bytes bytes, budget $(SIZE_LIMIT)"; \
	[ $$bytes -le $(SIZE_LIMIT) ] || { echo "error: the emissary exceeds its size budget" >&2; exit 1; }

## lint: formatting and clippy, warnings are errors
lint:
	$(call phase,lint,$(CARGO) fmt --all --check && $(CARGO) clippy --workspace --all-targets -- -D warnings)

## test: lint, size, images, the test cluster, then every unit and black-box test against the static emissary
test: deps-test deps-manifests lint size build image cluster-bin
	$(call phase,tests,EMISSARY_BIN=$(CURDIR)/$(STATIC_BIN) AGENT_IMAGE_BIN=$(CURDIR)/$(AGENT_STATIC_BIN) IMAGE_DIR=$(CURDIR)/$(IMAGE_DIR) \
	CLUSTER_BIN=$(CURDIR)/$(CLUSTER_BIN) KUBERNETES_VALIDATE=$(CURDIR)/$(KUBERNETES_VALIDATE) \
	SCHEMATHESIS=$(CURDIR)/$(SCHEMATHESIS) $(CARGO) test --workspace)

## cluster-bin: etcd, kube-apiserver and Argo's controllers from their Go modules (cached; minutes cold, seconds warm)
cluster-bin:
	@command -v go >/dev/null || { echo "error: the test cluster is built with Go (1.26): install it from go.dev" >&2; exit 1; }
	$(call phase,cluster programs,tests/cluster/build.sh $(CLUSTER_BIN) k8s argo)

## cluster: the test cluster, kept up to poke at by hand (prints its KUBECONFIG; Ctrl-C stops it)
cluster: deps-test static image cluster-bin
	$(CARGO) build -p emissary-tests --bin emissary-cluster
	CLUSTER_BIN=$(CURDIR)/$(CLUSTER_BIN) IMAGE_DIR=$(CURDIR)/$(IMAGE_DIR) target/debug/emissary-cluster up

## run: a short demo of what the emissary does, alone and with its node agent
run: static
	$(CARGO) build -p emissary-agent
	EMISSARY_BIN=$(CURDIR)/$(STATIC_BIN) AGENT_BIN=$(CURDIR)/target/debug/emissary-agent tests/demo.sh

## bench: measured against tini-static, coreutils tee... interleaved in one run; then Argo's
## own executor against ours under the same Argo controller (BENCH_ARGO=0 skips it)
bench: deps-bench static
	$(CARGO) build --release -p emissary-agent -p emissary-tests --bin emissary-agent --bin emissary-bench
	EMISSARY_BIN=$(CURDIR)/$(STATIC_BIN) target/release/emissary-bench $(BENCH)
	@if [ "$(BENCH_ARGO)" != 0 ]; then $(MAKE) --no-print-directory bench-argo; fi

## bench-argo: the same workflows on Argo v4.1 with its argoexec and with ours, side by side
bench-argo: deps-test deps-manifests build image cluster-bin
	ARGO_ONLY=argo-v4.1 tests/cluster/build.sh $(CLUSTER_BIN) argoexec
	EMISSARY_BIN=$(CURDIR)/$(STATIC_BIN) IMAGE_DIR=$(CURDIR)/$(IMAGE_DIR) CLUSTER_BIN=$(CURDIR)/$(CLUSTER_BIN) \
	KUBERNETES_VALIDATE=$(CURDIR)/$(KUBERNETES_VALIDATE) $(CARGO) test -p emissary-tests --test blackbox \
		argo_executors_side_by_side -- --ignored --nocapture

FUZZ_SECONDS ?= 60
# Each target links the agent: without LTO the eight of them build in minutes, not an hour.
FUZZ_CARGO = CARGO_PROFILE_RELEASE_LTO=false CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16 $(CARGO) +nightly fuzz
FUZZ_TARGETS ?= $(basename $(notdir $(wildcard tests/fuzz/fuzz_targets/*.rs)))

## fuzz: every parser of untrusted input under libFuzzer, FUZZ_SECONDS each (nightly and
## cargo-fuzz, installed if missing; findings land in tests/fuzz/findings/, which make test
## replays), then schemathesis on the agent's API with 1000 examples per operation
fuzz: deps-manifests build
	@rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
	@$(CARGO) +nightly fuzz --version >/dev/null 2>&1 || $(CARGO) install cargo-fuzz --locked
	$(call phase,fuzz build,$(FUZZ_CARGO) build --fuzz-dir tests/fuzz --features libfuzzer)
	@for t in $(FUZZ_TARGETS); do \
		mkdir -p target/fuzz-corpus/$$t tests/fuzz/findings/$$t; \
		echo "== fuzz $$t: $(FUZZ_SECONDS) s"; \
		$(FUZZ_CARGO) run --fuzz-dir tests/fuzz --features libfuzzer $$t \
			target/fuzz-corpus/$$t tests/fuzz/seeds/$$t tests/fuzz/findings/$$t -- \
			-max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=512 -timeout=10 \
			-artifact_prefix=tests/fuzz/findings/$$t/ -print_final_stats=1 || exit 1; \
	done
	$(call phase,schemathesis,SCHEMATHESIS=$(CURDIR)/$(SCHEMATHESIS) SCHEMATHESIS_MAX_EXAMPLES=1000 \
		$(CARGO) test -p emissary-tests --test blackbox schemathesis)

SOAK_MINUTES ?= 30
SOAK_ATTEMPTS ?= 1000

## soak: the agent under chaos (kill -9, controller and S3 outages, a full journal disk) for
## SOAK_MINUTES, then checked: nothing acknowledged lost, nothing torn, nothing left over, flat RSS
soak:
	$(CARGO) build --release -p emissary-agent -p emissary-tests --bin emissary-agent --bin emissary-soak
	SOAK_MINUTES=$(SOAK_MINUTES) SOAK_ATTEMPTS=$(SOAK_ATTEMPTS) target/release/emissary-soak

## static-agent: the agent, statically linked and stripped, for its FROM scratch image
static-agent:
	$(call phase,static agent,RUSTFLAGS="-C target-feature=+crt-static" $(CARGO) build --profile agent-image --target $(TARGET) -p emissary-agent)

## image: OCI archives of both images, built FROM scratch with buildah (no Docker daemon)
image: static static-agent deps-test
	$(call phase,images,tests/build-images.sh $(STATIC_BIN) $(IMAGE_DIR) $(AGENT_STATIC_BIN))

deps-test:
	$(call apt_install,$(TEST_PACKAGES))

deps-manifests:
	@command -v kubectl >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq kubectl; }
	@[ -x $(KUBERNETES_VALIDATE) ] || { python3 -m venv $(VENV) && $(VENV)/bin/pip install -q kubernetes-validate==1.37.0; }
	@[ -x $(SCHEMATHESIS) ] || $(VENV)/bin/pip install -q schemathesis==4.32.5

deps-bench:
	$(call apt_install,$(BENCH_PACKAGES))

deps-static:
	$(call apt_install,musl-tools)
	@rustup target list --installed | grep -qx $(STATIC_TARGET) || rustup target add $(STATIC_TARGET)

clean:
	$(CARGO) clean
