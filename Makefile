# Two entry points for a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

demo: $(STAMP)
	$(PY) -m hetero demo

test: $(STAMP)
	$(PY) -m pytest -q

install: $(STAMP)

# torch==2.13.0 is pinned so that pip takes one known build (on machines without a GPU, a CPU build);
# constraints.txt pins the rest to the versions the GPU machine runs.
$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

clean:
	rm -rf $(VENV) build *.egg-info
