# The README's two commands: `make train` (the main job) and `make test`. Both install into .venv first.
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.erc-verl-installed

.PHONY: install train test
install: $(INSTALLED)

$(INSTALLED): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	# Without a GPU: the CPU build of torch first, so resolving verl never pulls a multi-GB CUDA build.
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install torch==2.13.0; fi
	$(PY) -m pip install -e '.[test]'
	touch $@

# make train                       -> the tiny CPU run (no GPU) ; make train ARGS="erc_dapo_r1_distill_1p5b ..."
train: $(INSTALLED)
	$(VENV)/bin/erc-verl train $(ARGS)

test: $(INSTALLED)
	$(PY) -m pytest $(PYTEST_ARGS)
