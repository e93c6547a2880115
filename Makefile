# Two commands on a fresh machine: `make demo` (the main job) and `make test` (the suite).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1
export FLWR_HOME := $(CURDIR)/.flwr
export RAY_USAGE_STATS_ENABLED := 0

# PTB-XL: $PTBXL_DIR, else data/ptb-xl (fetched by `make demo` when missing and online).
PTBXL_DIR ?= $(CURDIR)/data/ptb-xl
export PTBXL_DIR
DEMO_RECORDS ?= 3000
DEMO_RUN ?= runs/quickstart
DEMO_BUNDLE ?= runs/quickstart-bundle
# The demo's simulated sites keep their ledgers apart from real runs'; `make demo` resets them explicitly.
DEMO_SITES ?= .fedecg/demo-sites

.PHONY: setup demo test test-fast test-e2e bench quality quality-base quality-expert clean

setup: $(STAMP)

# torch first and pinned: an unpinned resolution would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	touch $(STAMP)

data-check: setup
	@if [ ! -f "$(PTBXL_DIR)/ptbxl_database.csv" ]; then \
	  echo "PTB-XL not found at PTBXL_DIR=$(PTBXL_DIR); fetching $(DEMO_RECORDS) records from PhysioNet ..."; \
	  $(VENV)/bin/fedecg data fetch --out "$(PTBXL_DIR)" --records $(DEMO_RECORDS) || { \
	    echo "Could not download PTB-XL. Set PTBXL_DIR to an existing copy, e.g. PTBXL_DIR=../shared/ptb-xl make demo"; exit 2; }; \
	fi

demo: setup data-check
	$(VENV)/bin/fedecg data verify "$(PTBXL_DIR)"
	rm -rf "$(DEMO_RUN)" "$(DEMO_BUNDLE)"
	$(VENV)/bin/fedecg privacy ledger reset --dir "$(DEMO_SITES)" --reason "make demo: simulated sites, rerun"
	$(VENV)/bin/fedecg simulate --config configs/quickstart.yaml --set federation.site_state_dir="$(DEMO_SITES)" --out "$(DEMO_RUN)"
	$(VENV)/bin/fedecg export --run "$(DEMO_RUN)" --out "$(DEMO_BUNDLE)"
	$(VENV)/bin/fedecg privacy verify "$(DEMO_BUNDLE)"
	$(VENV)/bin/fedecg sample --bundle "$(DEMO_BUNDLE)" --n 4 --labels NORM --age 67 --sex female --out "$(DEMO_RUN)/samples"
	@echo ""
	@echo "bundle:        $(DEMO_BUNDLE)"
	@echo "round PNGs:    $(DEMO_RUN)/samples_round*.png, $(DEMO_RUN)/rounds.png"
	@echo "samples:       $(DEMO_RUN)/samples/samples.png (WFDB records in $(DEMO_RUN)/samples/records100)"
	@echo "epsilon table: $(DEMO_RUN)/epsilon_table.txt"
	@cat "$(DEMO_RUN)/epsilon_table.txt"

# The default suite: everything but the end-to-end runs (about 2 minutes on 2 quiet cores).
test: setup
	$(PY) -m pytest -q -m "not slow" --durations=15

# The inner loop: the same selection without the set-up check or the durations table.
test-fast:
	$(PY) -m pytest -q -m "not slow" -x

# End-to-end runs marked slow: Flower's engines, deployments on 127.0.0.1, their faults, audits, evaluations (about 20 minutes).
test-e2e: setup
	$(PY) -m pytest -q -m slow --durations=15

bench: setup
	$(PY) -m simulations.benchmarks.bench_model --size small --batch 32

# The 2-core quality recipe and its non-private twin, each evaluated on fold 9 (measured: 390 s and 153 s of
# federation, 3-8 minutes per evaluation; the public base is shipped, `make quality-base` retrains it in about 45 minutes).
QUALITY_SITES ?= .fedecg/quality-sites
quality: setup data-check
	$(VENV)/bin/fedecg privacy ledger reset --dir "$(QUALITY_SITES)" --reason "make quality: simulated sites, rerun"
	rm -rf runs/quality runs/quality-nodp runs/quality-bundle runs/quality-nodp-bundle runs/quality-eval runs/quality-nodp-eval
	$(VENV)/bin/fedecg simulate --config configs/quality_cpu.yaml --set federation.site_state_dir="$(QUALITY_SITES)" --out runs/quality
	$(VENV)/bin/fedecg simulate --config configs/quality_cpu.yaml --set privacy.enabled=false --out runs/quality-nodp
	for run in quality quality-nodp; do \
	  $(VENV)/bin/fedecg export --run runs/$$run --out runs/$$run-bundle && \
	  $(VENV)/bin/fedecg evaluate --bundle runs/$$run-bundle --data "$(PTBXL_DIR)" --out runs/$$run-eval --quiet || exit 1; \
	done

quality-base: setup data-check
	$(VENV)/bin/fedecg pretrain --config configs/quality_cpu.yaml --out runs/quality-base

# The public high-noise expert (shipped in models/ptbxl-site0-expert): the same public pool, trained for x0 at
# t in [40, 200) only (v-prediction, zero terminal SNR) at three quarters of the base's width, reading a beat map
# whose beat times sampling draws from the pool's rhythm table (common/rhythm.py; about 12 minutes).
quality-expert: setup data-check
	$(VENV)/bin/fedecg pretrain --config configs/quality_cpu.yaml --set diffusion.expert=null \
	  --set diffusion.prediction=v --set diffusion.zero_terminal_snr=true --set 'diffusion.train_timesteps=[40,200]' \
	  --set model.channels=48 --set model.rhythm=true --set train.steps=6000 --set train.sample_every=3000 \
	  --out runs/quality-expert

clean:
	rm -rf $(VENV) .pytest_cache .cache .flwr runs $(DEMO_SITES)
