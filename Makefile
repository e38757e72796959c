# cwrun's build. `make help` lists the targets.
SHELL := /bin/bash
export PATH := $(PATH):/usr/local/go/bin
GO ?= go
# containers_image_openpgp: no gpgme (cgo, -dev packages) for signatures;
# exclude_graphdriver_btrfs: no btrfs headers needed.
TAGS := containers_image_openpgp exclude_graphdriver_btrfs
GOFLAGS_BUILD := -tags "$(TAGS)" -trimpath
BIN := bin
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS := -X github.com/cwrun/cwrun/version.Version=$(VERSION)

.PHONY: help deps build test test-short demo bench lint fuzz clean

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

deps: ## install Debian packages (as root) and Go modules
	@hack/deps.sh

build: ## build bin/cwrun, the key broker bin/cwrun-kbs and the guest init bin/cwrun-init (static) next to it
	$(GO) build $(GOFLAGS_BUILD) -ldflags "$(LDFLAGS)" -o $(BIN)/cwrun ./cmd/cwrun
	$(GO) build $(GOFLAGS_BUILD) -ldflags "$(LDFLAGS)" -o $(BIN)/cwrun-kbs ./cmd/cwrun-kbs
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags "-s -w" -o $(BIN)/cwrun-init ./cmd/cwrun-init

test: deps ## run every test (unit, real cryptsetup/podman end to end)
	$(GO) vet -tags "$(TAGS)" ./...
	$(GO) test -tags "$(TAGS)" -timeout 25m ./...

test-short: ## unit tests only, no end-to-end
	$(GO) test -tags "$(TAGS)" -short ./...

demo: deps build ## seal a busybox sample image and show what was made
	@hack/demo.sh

bench: deps build ## seal benchmark against buildah mkcw; run cold start against the bare boot floor; broker handshakes/s; TPM cold start
	@hack/bench.sh
	@hack/bench-run.sh
	@hack/bench-kbs.sh
	@hack/bench-tpm.sh

lint: ## gofmt and go vet
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed: $$out"; exit 1; fi
	$(GO) vet -tags "$(TAGS)" ./...

fuzz: ## run each fuzz target for FUZZTIME (default 30s)
	@hack/fuzz.sh $(or $(FUZZTIME),30s)

clean: ## remove build outputs
	rm -rf $(BIN)
