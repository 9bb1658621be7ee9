"""The report renders from a fixture run written straight into the store (no model involved)."""

import pyarrow as pa

from storage.store import Dataset
from tasks.report import latest_experiment, write_report
from tasks.results import METRIC_SCHEMA


def _metric(run_id, task, model, method, n_train, metric, value, se, split="test"):
    return {"run_id": run_id, "task": task, "target_model": "tgt", "explainer_model": model, "method": method,
            "n_train": n_train, "seed": 0, "split": split, "metric": metric, "value": value, "se": se, "n": 100}  # fmt: skip


def fixture_experiment(root):
    cells = []
    for n, flat in ((10, False), (100, True)):
        run = f"patching-run{n}"
        cells.append({"experiment": "exp1", "task": "patching", "n_train": n, "seed": 0, "flat_baselines": flat,
                      "run_id": run})  # fmt: skip
        rows = [_metric(run, "patching", "tgt", "trained", n, "exact_match", 0.2 + n / 500, 0.02),
                _metric(run, "patching", "other-lm", "trained", n, "exact_match", 0.25, 0.02),
                _metric(run, "patching", "", "majority", n, "exact_match", 0.3, 0.02),
                _metric(run, "patching", "tgt", "zero_shot", 0, "exact_match", 0.01 if flat else 0.99, 0.01)]  # fmt: skip
        ds = Dataset(root, "metrics", run)
        ds.create({})
        ds.write_shard(0, pa.Table.from_pylist(rows, schema=METRIC_SCHEMA))
        ds.mark_complete({})
    ds = Dataset(root, "experiment_cells", "exp1")
    ds.create(
        {"recipe": {"tasks": ["patching"], "target": {"name": "tgt"}, "grid": {"n_train": [10, 100], "seeds": [0]}}}
    )
    ds.write_shard(0, pa.Table.from_pylist(cells))
    ds.mark_complete({})


def test_report_tables_plots_and_orderings(home):
    fixture_experiment(home)
    assert latest_experiment(home) == "exp1"
    path = write_report(home, "exp1")
    text = path.read_text()
    assert "| self | 22.0 ± 2.0 | 40.0 ± 2.0 | – |" in text  # the curve, x100 with SEs
    assert "| other (other-lm) | 25.0 ± 2.0 | 25.0 ± 2.0 | – |" in text
    assert "| self untrained, zero-shot | – | – | 1.0 ± 1.0 |" in text  # flat: from the flat cell only
    assert "self > other (other-lm) **held** (Δ = +15.0 ± 2.8)" in text
    assert "self > majority answer **held**" in text
    assert "Paper (PAPER.md §6, 8B targets): self (Llama-3.1-8B) 48.6" in text
    for png in ("patching-exact_match-test.png", "self-vs-other.png"):
        assert (path.parent / png).stat().st_size > 5000 and f"({png})" in text
