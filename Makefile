# Niche — the two commands a new user needs are `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
RAWFS_PTH := $(VENV)/lib/python3.11/site-packages/niche-rawfs.pth
STATE := $(CURDIR)/.niche
PORT ?= 4200
HOST := 127.0.0.1
SAMPLES ?= 60
NIGHTLY_CRON ?= 0 2 * * *
CURATE_PORT ?= 8765
SET ?= curated

# A local, quiet, offline Prefect: its database and logs live in .niche/.
export PREFECT_HOME := $(STATE)/prefect
export PREFECT_API_URL := http://$(HOST):$(PORT)/api
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 120
export PREFECT_LOGGING_EXTRA_LOGGERS := dvc
export DVC_NO_ANALYTICS := 1
export NICHE_NIGHTLY_CRON := $(NIGHTLY_CRON)
export PATH := $(BIN):$(PATH)

.PHONY: demo train train-sdxl train-sdxl-full candidates curate test venv sample server serve stop deploy-run status lock clean-demo

venv: $(VENV)/.installed $(RAWFS_PTH)
$(VENV)/.installed: requirements.lock requirements-nodeps.txt constraints.txt pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "Python 3.11 needed, got " + sys.version' 
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -r requirements.lock
	$(BIN)/pip install -q --no-deps -c constraints.txt -r requirements-nodeps.txt
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $@

# Every DVC of the venv (the command and Repo() in the flows) skips entries of data/raw that
# are not readable regular files (FIFOs, sockets, dangling links...): tasks/core/rawfs.py; and
# leaves the per-sample stores linked to its cache when their stage re-runs: tasks/core/storelinks.py;
# and does not re-hash a folder dependency that did not change: tasks/core/dirstat.py.
$(RAWFS_PTH): $(VENV)/.installed tasks/core/rawfs.py tasks/core/storelinks.py tasks/core/dirstat.py tasks/core/importhook.py
	$(BIN)/python -m tasks.core.rawfs install

# The whole job on the tiny profile: sample data -> build-dataset -> train (NanoDiT) ->
# train (SDXL: latents, negative LoRA, LoRA, sweep) -> generate-candidates (words ->
# prompts -> candidates to curate) -> validate, each a flow run on a local Prefect server,
# DVC recording every stage.
# The server and the deployment runner start first, so the UI shows the deployments
# and validate-nightly/local's schedule. The four runs are runs of those deployments'
# flows, run here in the terminal (not through the runner) so that the dataset
# report and the report's path are printed here.
# Ends with the path of the run's HTML report; leaves the server and runner up (make stop).
demo: venv
	@$(BIN)/python -m tasks.sample --out data/raw --figures $(SAMPLES) --photos --bad-examples --rejects 4 \
		--words data/prompts/words.txt
	@$(BIN)/python -m tasks.profile tiny
	@$(MAKE) --no-print-directory serve
	@$(BIN)/python -m flows.build_dataset --report
	@$(BIN)/python -m flows.train --skip-dataset
	@$(BIN)/python -m flows.train --skip-dataset --trainer sdxl
	@$(BIN)/python -m flows.train --skip-dataset --trainer sdxl-full
	@$(BIN)/python -m flows.generate_candidates
	@$(BIN)/python -m flows.validate

# Train NanoDiT through the train flow (dataset first, as DVC says); after `make demo`
# this is the tiny profile: a few minutes on a CPU. Samples: runs/nanodit/samples/.
train: server
	@$(BIN)/python -m flows.train

# The SDXL trainer through the same flow: latents, the negative LoRA on the rejects,
# LoRA + pivotal tuning, then runs/sdxl/sweep.png.
train-sdxl: server
	@$(BIN)/python -m flows.train --trainer sdxl

# The SDXL full fine-tune (flow matching, bigASP v2.5) through the same flow, one process:
# latents, train_sdxl, then runs/sdxl-full/sweep.png. Many GPUs: torchrun -m tasks.train_sdxl.
train-sdxl-full: server
	@$(BIN)/python -m flows.train --trainer sdxl-full

# Words (data/prompts/words.txt) -> prompts (expand) -> candidates through the
# generate-candidates flow; a LoRA or NanoDiT generator's newest checkpoint is pinned in params.yaml.
candidates: server
	@$(BIN)/python -m flows.generate_candidates

# The curation page on http://127.0.0.1:$(CURATE_PORT)/ (press ? there): keep, reject, undo,
# captions, from the keyboard. Kept -> data/raw/$(SET)/, rejected -> data/raw/rejected/. Ctrl-C stops.
curate: venv
	@$(BIN)/python -m tasks.curate serve --port $(CURATE_PORT) --set $(SET)

# Two pytest-xdist workers, a test file each at a time (module fixtures stay in one process):
# the suite waits on subprocesses and servers half the time, so two fill two cores.
TEST_WORKERS ?= 2
test: venv
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

sample: venv
	$(BIN)/python -m tasks.sample --out data/raw --figures $(SAMPLES) --photos --bad-examples --rejects 4 --words data/prompts/words.txt

# Prefect server on 127.0.0.1 (UI at http://127.0.0.1:$(PORT)), in the background.
server: venv
	@$(BIN)/python -m flows.local server --host $(HOST) --port $(PORT)

# The process that executes deployments (build-dataset/local, ...), in the background.
serve: server
	@$(BIN)/python -m flows.local serve

# Run a deployment the way a user would, and wait for it.
deploy-run: serve
	$(BIN)/prefect deployment run build-dataset/local --watch

status:
	@$(BIN)/python -m flows.local status

# Stop the deployment runner first (SIGINT), then the server.
stop:
	@$(BIN)/python -m flows.local stop

# Re-resolve the lock from pyproject.toml's ranges (needs the registry).
lock:
	rm -rf /tmp/niche-lock && $(PYTHON) -m venv /tmp/niche-lock
	/tmp/niche-lock/bin/pip install -q -c constraints.txt torch==2.13.0
	/tmp/niche-lock/bin/pip install -q -c constraints.txt -e '.[test]'
	{ echo "# Exact versions resolved and tested together on Python 3.11 (pip freeze)."; \
	  echo "# torch is installed first from constraints.txt; see README for CUDA."; \
	  echo "# Regenerate: make lock"; \
	  /tmp/niche-lock/bin/pip freeze --exclude-editable | grep -v -E '^(torch|niche|lpips)=='; } > requirements.lock
	@# requirements-nodeps.txt (lpips, without its torchvision) stays out of the lock;
	@# install it after the freeze to check that the lock holds what it needs.
	/tmp/niche-lock/bin/pip install -q --no-deps -c constraints.txt -r requirements-nodeps.txt
	/tmp/niche-lock/bin/python -c 'from models.lpips_metric import import_lpips; import_lpips()'

clean-demo: stop
	rm -rf data/derived data/manifest metrics dvc.lock runs
	$(BIN)/python -m tasks.profile real
