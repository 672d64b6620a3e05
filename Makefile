# Two commands: `make demo` and `make test`. Each creates .venv (python3) and installs the
# package, editable, with the exact versions of requirements.lock, when missing or stale.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_WORKDIR ?= workdirs/demo

.PHONY: demo test test-all install clean

$(STAMP): setup.py requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c requirements.lock -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# Trains the tiny decoder on the bundled Python-documentation corpus (a few minutes on CPU):
# perplexity falls; checkpoints, metrics.jsonl, TensorBoard events, loss_curve.png and a
# sample land in $(DEMO_WORKDIR) (wiped first, so every demo starts from scratch).
demo: $(STAMP)
	$(BIN)/python experiments/prepare_data.py --dataset=pydoc_topics --tokenizer_vocab_size=1024
	rm -rf $(DEMO_WORKDIR)
	$(BIN)/python experiments/train.py --config=configs/decoder_lm.py --workdir=$(DEMO_WORKDIR)

# Test processes (pytest-xdist). The suite is bound by single-threaded XLA compilation, so 2
# workers on CI's 2 cores nearly halve it; each test file stays on one worker (--dist
# loadfile: its module fixtures and compilations are shared). TEST_WORKERS=0 runs in-process.
TEST_WORKERS ?= 2
PYTEST := $(BIN)/python -m pytest -q $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

# The test suite without the tests marked slow (CI runs this).
test: $(STAMP)
	$(PYTEST) -m "not slow" tests

# Everything, the slow tests included.
test-all: $(STAMP)
	$(PYTEST) tests

clean:
	rm -rf $(VENV) workdirs .pytest_cache *.egg-info
