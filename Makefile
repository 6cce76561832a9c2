# Tandem — see README.md. The two commands a newcomer needs:
#   make demo   walkthrough on two throwaway local PostgreSQL clusters
#   make test   install what is missing, then the whole suite with -race
GO       ?= go
# A count, not a duration: Go 1.26's fuzz coordinator can fail a run that
# ends on a -fuzztime deadline with "context deadline exceeded" and no
# crasher when the machine is loaded (go.dev/issue/75804, fixed in 1.27).
FUZZTIME ?= 30000x
# Random protocol sequences per routed phase, from seed 1000 (the -race
# run in make test covers seeds 0-11): make fuzz SEEDS=2000 for more.
SEEDS    ?= 24
BIN      ?= bin/tandem

.PHONY: all build deps demo test unit soak fuzz bench clean

all: build

build:
	$(GO) build -o $(BIN) ./cmd/tandem

deps:
	./scripts/ensure-postgres.sh

demo: deps
	$(GO) run ./cmd/tandem demo

test: deps
	./scripts/ensure-chromium.sh
	$(GO) vet ./...
	$(GO) test -race -count=1 -timeout 20m ./...
	TANDEM_TEST_RELAY=goroutines $(GO) test -race -count=1 -timeout 10m ./proxy
	$(MAKE) --no-print-directory fuzz

unit:
	$(GO) test -race -count=1 -short ./...

# Issue 10's "done when", in full: ten write flips and ten rollbacks,
# alternating 10 s apart, under 16 random writers in dual-write; each must
# succeed without --force, with fences under 100 ms at p99 and no client
# error beyond the workload's own. (make test runs 3 of each.)
soak: deps
	TANDEM_FENCE_SOAK=1 $(GO) test -count=1 -timeout 20m -run '^TestFenceFlipsUnderRandomWriters$$' -v ./cmd/tandem

# Brief runs of every fuzz target over its seeded corpus (testdata/fuzz) plus
# FUZZTIME new inputs each, and the randomized protocol test. Longer:
# make fuzz FUZZTIME=2000000x SEEDS=2000
fuzz:
	$(GO) test -run '^$$' -fuzz '^FuzzReadStartup$$' -fuzztime $(FUZZTIME) ./internal/pgwire
	$(GO) test -run '^$$' -fuzz '^FuzzReadMessage$$' -fuzztime $(FUZZTIME) ./internal/pgwire
	$(GO) test -run '^$$' -fuzz '^FuzzFramer$$' -fuzztime $(FUZZTIME) ./internal/pgwire
	$(GO) test -run '^$$' -fuzz '^FuzzPlan$$' -fuzztime $(FUZZTIME) ./internal/classify
	$(GO) test -run '^$$' -fuzz '^FuzzWireDecoders$$' -fuzztime $(FUZZTIME) ./proxy
	$(GO) test -run '^$$' -fuzz '^FuzzShapeOf$$' -fuzztime $(FUZZTIME) ./internal/classify
	$(GO) test -run '^$$' -fuzz '^FuzzCanonical$$' -fuzztime $(FUZZTIME) ./internal/shadow
	$(GO) test -run '^$$' -fuzz '^FuzzCompare$$' -fuzztime $(FUZZTIME) ./internal/shadow
	$(GO) test -run '^$$' -fuzz '^FuzzAdminJSON$$' -fuzztime $(FUZZTIME) ./internal/admin
	TANDEM_RANDOM_FIRST=1000 TANDEM_RANDOM_SEEDS=$(SEEDS) $(GO) test -count=1 -timeout 60m -run '^TestRandomProtocol$$' ./proxy
	$(GO) test -count=1 -run '^TestGoldenTranscriptsDualWrite$$/.*/^many_parameters$$' ./proxy

# pgbench side by side: direct PostgreSQL, pgbouncer (session mode) and Tandem.
bench:
	./scripts/ensure-postgres.sh pgbouncer
	./bench/bench.sh

clean:
	rm -rf bin
