# Two commands a newcomer needs (see README): `make serve` and `make test`.
SHELL := /bin/bash
export HF_HUB_OFFLINE := 1
export BENTOML_DO_NOT_TRACK := true
export TOKENIZERS_PARALLELISM := false

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# DATASET=digits (the embedded default, 8x8 grayscale) or studios (five emoji studios'
# colour artwork from pinned npm packages; see docs/studios.md)
DATASET ?= digits
SIZE   ?= 16
# processes that train the shards at once, each with its share of the threads
# (cdm train --workers; docs/performance.md)
TRAIN_WORKERS ?= 2
ifeq ($(DATASET),studios)
DATA   ?= var/studios-data
STORE  ?= var/studios-store
DATA_FLAGS := --dataset studios --size $(SIZE)
# bfloat16 autocast where the CPU computes it natively (AVX-512 BF16 or AMX: 1.5x a
# training step, the same shard quality), float32 elsewhere (emulated bfloat16 took 13x
# as long on an AVX2 CPU; docs/performance.md). The studios are captioned, so the
# store is text-conditional; add --no-text for the label-conditional one (docs/studios.md)
TRAIN_FLAGS ?= --precision auto
else
DATA   ?= var/demo-data
STORE  ?= var/store
DATA_FLAGS :=
TRAIN_FLAGS ?=
endif

.PHONY: install chromium node postgres npm-packages data store serve test test-fast lint bench scale service-bench value console-shots detect msr valuation-cost clean

# torch 2.13.0 first: it is a local CPU wheel; letting a dependency resolve torch
# would pull several GB of CUDA packages.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

# Headless Chromium for the console's browser tests (tests/test_console.py): Debian's
# package, installed only when no chromium binary is on PATH. Playwright is pointed
# at it and never downloads a browser of its own.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
chromium:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
		{ $(SUDO) apt-get update -qq && \
		  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium >/dev/null; }

# Node.js/npm from Debian's packages when missing: the studios data set is built from
# pinned npm packages, fetched once into ~/.cache/cdm-serve/npm and checked against
# their pinned integrity (shards/npm.py); tests and `make serve DATASET=studios` read
# them from there, never from the network.
node:
	@command -v npm >/dev/null || { $(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq nodejs npm >/dev/null; }

# PostgreSQL's server binaries from Debian's packages when missing: the tests start
# throwaway clusters of their own (tests/postgres.py) to run the records on Postgres
# as on SQLite. The service itself needs no local server (CDM_DATABASE_URL names one).
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null || \
		{ $(SUDO) apt-get update -qq && \
		  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq postgresql >/dev/null; }

npm-packages: install node
	$(BIN)/python -c "from shards import npm; [print(npm.tarball(n)) for n in npm.PINNED]"

$(DATA)/owners.json: | $(VENV)/.installed
	$(if $(DATA_FLAGS),$(MAKE) npm-packages)
	$(BIN)/cdm demo-data $(DATA) $(DATA_FLAGS)

# Router `heads` (the default) needs the public split as its reference; the demo store
# keeps the contributors' images (--keep-data) because `make value`'s baselines
# (pruned fine-tune, retrain) train on them. New stores keep no data by default.
$(STORE)/manifest.json: | $(DATA)/owners.json
	$(BIN)/cdm train $(DATA)/contributors --store $(STORE) --public $(DATA)/public --keep-data \
		--workers $(TRAIN_WORKERS) $(TRAIN_FLAGS)

data: $(DATA)/owners.json
store: $(STORE)/manifest.json

serve: store
	$(BIN)/cdm sample --store $(STORE) --n 64 --seed 0 --out var/samples.png
	$(BIN)/cdm keys demo --store $(STORE)
	$(BIN)/cdm serve --store $(STORE) --port 3000

# every test: unit and integration (servers, Chromium, schemathesis, crash injection),
# in TEST_WORKERS processes that take whole files, each on its share of the cores
# (tests/conftest.py); TEST_WORKERS=0 runs them in this process
TEST_WORKERS ?= 2
PARALLEL := -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder
test: install chromium npm-packages postgres
	$(BIN)/pytest -q $(PARALLEL) --durations=15

# the inner loop: unit tests only (library calls), in the same workers
test-fast: install npm-packages postgres
	$(BIN)/pytest -q $(PARALLEL) -m unit

lint: install
	$(BIN)/ruff check shards service valuation tests benchmarks

bench: store
	$(BIN)/python benchmarks/core_evidence.py --data $(DATA) --store $(STORE)
	$(BIN)/python benchmarks/routing_quality.py --data $(DATA) --store $(STORE)

# cost per image against the number of contributors (7, 32, 128), forget and add
scale: install
	$(BIN)/python benchmarks/scale.py --ns 7,32,128

# the service under load (throughput, head-of-line blocking, a forget under load with
# two workers) and schemathesis with every check; on an otherwise idle machine
service-bench: store
	$(BIN)/python benchmarks/service_load.py --store $(STORE)
	$(BIN)/python benchmarks/fuzz.py --store $(STORE) --max-examples 200

# Shapley values of the default store's contributors by every method, with a report
# (benchmarks/results/valuation-quality/report.md); about an hour on 2 cores, most of
# it the retrain-from-scratch ground truth. Utilities are cached in STORE/valuation.
value: store
	$(BIN)/cdm value --store $(STORE) --heldout $(DATA)/heldout --property quality \
		--methods exact,permutation,kernelshap,pruned,retrain,loo,attribution \
		--max-evaluations 64 --workers 2 --report benchmarks/results/valuation-quality

# the console's screenshots (docs/console-*.png) and page-load times, on the default store
console-shots: store chromium
	$(BIN)/python benchmarks/console_shots.py --store $(STORE) --shots docs

# issue-10 benchmarks: planted-noise detection, Banzhaf MSR at N = 12, valuation cost at scale
detect: store
	$(BIN)/python benchmarks/detect.py --data $(DATA) --store $(STORE) --workers 2
msr: install
	$(BIN)/python benchmarks/msr.py --workers 2
valuation-cost: store
	$(BIN)/python benchmarks/valuation_cost.py --store $(STORE)

clean:
	rm -rf var
