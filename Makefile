# The two commands of the README:
#   make app    start the Streamlit explorer on the shipped default collection
#   make test   run the whole test suite (what CI runs)
# Both create .venv and install requirements on first use; a second run installs nothing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PORT   ?= 8501

.PHONY: app test bench notebooks system-deps clean-venv

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

app: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) scripts/serve.py --server.address localhost --server.port $(PORT) \
		--server.headless true --browser.gatherUsageStats false

system-deps:
	@bash scripts/system-deps

# lint first (ruff: pyflakes, bugbear, blind except; scope in pyproject.toml), then the tests
test: $(STAMP) system-deps
	$(VENV)/bin/ruff check .
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -ra

# full mode of every notebook: regenerates results/ and data/checkpoints/ (finished runs cached in .cache/experiments)
notebooks: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m lol.notebooks

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m bench

clean-venv:
	rm -rf $(VENV)
