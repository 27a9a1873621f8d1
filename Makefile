# llama-gguf-inference — every set-up step is a target; `make help` lists them.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
# llama-server: found on PATH / LLAMA_SERVER_BIN, else built once into this cache (outside the repo).
LLAMA_CACHE ?= $(HOME)/.cache/llama-gguf-inference
DEMO_MODEL := data/models/demo-tiny-llama.gguf
# pytest-xdist workers for the unit tier: its tests mostly wait on deadlines and child processes
# (about 22 s of CPU in 55 s run one at a time), so four workers halve it even on two cores.
UNIT_WORKERS ?= 4

# The browser tier drives Debian's chromium package (never a Playwright browser download).
CHROMIUM ?= /usr/bin/chromium

.PHONY: help run test test-unit test-e2e test-browser chromium bench lint keys docker clean llama-server model venv

help: ## list the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

$(VENV)/.stamp: requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 $(VPY) -m pip install -q -r requirements-dev.txt
	touch $@

venv: $(VENV)/.stamp ## create the dev virtualenv from requirements-dev.txt

llama-server: ## find or build llama-server (cached in $(LLAMA_CACHE))
	@$(PYTHON) scripts/llama_bin.py --ensure --cache-dir "$(LLAMA_CACHE)"

$(DEMO_MODEL): $(VENV)/.stamp tests/tools/make_model.py
	$(VPY) tests/tools/make_model.py --out $(DEMO_MODEL)

model: $(DEMO_MODEL) ## generate the tiny demo model into data/models/

run: $(VENV)/.stamp ## run the whole stack locally on the demo model, print a first key
	@$(PYTHON) scripts/run_local.py --cache-dir "$(LLAMA_CACHE)"

test: test-unit test-e2e test-browser ## all tests (unit, end-to-end on the real llama-server, browser)

test-unit: $(VENV)/.stamp ## fast tier: parser, modules, gateway against a fake llama-server
	$(VPY) -m pytest -q -n $(UNIT_WORKERS) -m "not e2e and not browser" tests

chromium: ## Debian's chromium for the browser tier (apt-get as root when it is missing)
	@if [ -x "$(CHROMIUM)" ]; then echo "chromium: $(CHROMIUM)"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; \
	else echo "$(CHROMIUM) not found: install Debian's chromium (sudo apt-get install -y chromium) or set CHROMIUM=path"; exit 1; fi

test-browser: $(VENV)/.stamp chromium llama-server model ## the dashboard in a real browser (Playwright + Debian's chromium; the real stack, and a fake admin API)
	REQUIRE_BROWSER=1 CHROMIUM_BIN="$(CHROMIUM)" PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 \
	LLAMA_SERVER_BIN="$$($(PYTHON) scripts/llama_bin.py --cache-dir "$(LLAMA_CACHE)")" \
	DEMO_MODEL="$(abspath $(DEMO_MODEL))" $(VPY) -m pytest -q -m browser tests/browser

test-e2e: $(VENV)/.stamp llama-server model ## the real stack: entrypoint.sh, llama-server, real clients
	LLAMA_SERVER_BIN="$$($(PYTHON) scripts/llama_bin.py --cache-dir "$(LLAMA_CACHE)")" \
	DEMO_MODEL="$(abspath $(DEMO_MODEL))" $(VPY) -m pytest -q -m e2e tests

bench: $(VENV)/.stamp llama-server model ## gateway vs llama-server direct, as ratios (bench-results/bench.md)
	@command -v wrk >/dev/null || apt-get install -y wrk || echo "wrk unavailable: case a will fail"
	@command -v nginx >/dev/null || test -x /usr/sbin/nginx || echo "nginx not found: its reference rows are left out (apt-get install nginx-light adds them)"
	LLAMA_SERVER_BIN="$$($(PYTHON) scripts/llama_bin.py --cache-dir "$(LLAMA_CACHE)")" \
	DEMO_MODEL="$(abspath $(DEMO_MODEL))" $(VPY) tests/bench/run_bench.py --out bench-results $(ARGS)

lint: $(VENV)/.stamp ## byte-compile, shellcheck when present
	$(VPY) -m compileall -q scripts tests
	@if command -v shellcheck >/dev/null; then shellcheck entrypoint.sh; else echo "shellcheck not installed"; fi

keys: ## manage API keys of `make run` (data/api_keys.txt): make keys ARGS="add alice"
	DATA_DIR="$${DATA_DIR:-$(CURDIR)/data}" $(PYTHON) scripts/keys.py $(ARGS)

docker: ## build the GPU and CPU images
	docker build -t llama-gguf-inference:cuda .
	docker build -t llama-gguf-inference:cpu -f docker/Dockerfile.cpu .

clean: ## remove the venv, caches, generated model and logs (not the llama-server cache)
	rm -rf $(VENV) .pytest_cache bench-results data/models data/logs
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
