# arc: two commands do all the set-up.
#   make demo   install into .venv and run relay, agent, client and an API backend on loopback
#   make test   install into .venv and run every test
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# A regular (non-editable) install: twistd finds plugins by scanning sys.path
# for twisted/plugins, which an editable install of this layout would hide.
install: $(BIN)/python
	$(BIN)/pip install --quiet ".[test]"
	$(BIN)/pip install --quiet --no-deps --force-reinstall .
	$(BIN)/python -c "from twisted.plugin import IPlugin, getPlugins; from twisted.application.service import IServiceMaker; list(getPlugins(IServiceMaker))"

demo: install
	cd /tmp && exec $(abspath $(BIN))/python -m arc.demo --state-dir $(abspath .demo)

test: install
	cd $(abspath .) && $(BIN)/python tests/run.py $(TESTS)

bench: install
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) build dist *.egg-info _trial_temp .demo
