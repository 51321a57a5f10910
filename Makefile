# Two commands do all set-up on a fresh machine (Python 3.11 and make are all they need):
#   make demo   create .venv, then run MeCa against BadNets on the shipped CIFAR-10 sample
#   make test   create .venv, then run the test suite
PYTHON ?= python3.11
VENV ?= .venv

.PHONY: demo test test-fast benchmark-cpu benchmark-perf benchmark-paper
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $@

# checkov (manifest checks in the tests) pins packaging<24, which pytest 9 cannot share: it gets its own venv.
TOOLS ?= .venv-tools
$(TOOLS)/.installed:
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install --quiet checkov==3.3.30
	touch $@

# The CPU protocol's 10 epochs are 800 SGD steps on its 10,000 images; on the 5,000-image sample 20 epochs make the
# same 800 (at 10, MeCa's warm-up has not made the poison robust yet: README, Quick start).
demo: $(VENV)/.installed
	$(VENV)/bin/unpoison run meca --attack badnets --data sample --set train.epochs=20

# One pytest-xdist worker per core, each pinned to its core (tests/conftest.py); a test file stays on one worker, so
# its module fixtures (an end-to-end run, a server) are built once; the heaviest files go first (conftest's HEAVY_FIRST).
test: $(VENV)/.installed $(TOOLS)/.installed
	CHECKOV=$(TOOLS)/bin/checkov $(VENV)/bin/python -m pytest -n auto --dist loadfile --no-loadscope-reorder

# The unit tests only, for local iteration: no pipeline, server or checker runs (tests/conftest.py marks those slow).
test-fast: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -m "not slow"

# CPU reference protocol (DESIGN.md) for none, meca, a-abl, abl, lfd, abm and bsd on five attacks and no attack; needs the full CIFAR-10 Parquet set.
# DEFENSES=... ATTACKS=... run a part of the matrix; records of the same defense, attack and protocol are replaced.
CIFAR10 ?= ../shared/datasets/cifar10
DEFENSES ?= none,meca,a-abl,abl,lfd,abm,bsd
ATTACKS ?= badnets,blend,sig,trojan,wanet,none
benchmark-cpu: $(VENV)/.installed
	$(VENV)/bin/unpoison benchmark --protocol cpu --defenses $(DEFENSES) --attacks $(ATTACKS) --data $(CIFAR10)

# Engine and scoring throughput against the common way, and epoch time / peak memory at 5k-50k samples
# (benchmarks/results/performance.json and .md). On a GPU machine it measures the GPU path.
benchmark-perf: $(VENV)/.installed
	$(VENV)/bin/python benchmarks/performance.py --data $(CIFAR10)

# Paper protocol (GPU): MeCa and no defense on BadNets, full CIFAR-10, ResNet-18; the wall time is in the records.
benchmark-paper: $(VENV)/.installed
	$(VENV)/bin/unpoison benchmark --protocol paper --defenses none,meca --attacks badnets --data $(CIFAR10)
