"""The report renders from a fixture run written straight into the store (no model involved)."""

import pyarrow as pa

from storage.store import Dataset
from tasks.common.results import METRIC_SCHEMA, PREDICTION_SCHEMA
from tasks.experiment.report import latest_experiment, write_report


def _metric(run_id, task, model, method, n_train, metric, value, se, split="test"):
    return {"run_id": run_id, "task": task, "target_model": "tgt", "explainer_model": model, "method": method,
            "n_train": n_train, "seed": 0, "split": split, "metric": metric, "value": value, "se": se, "n": 100}  # fmt: skip


def write_experiment(root, key, task, rows_of) -> None:
    """An experiment `key` of two cells (n_train 10, then 100 with the flat baselines); rows_of(run, n, flat)
    gives each cell's metric rows."""
    cells = []
    for n, flat in ((10, False), (100, True)):
        run = f"{task}-run{n}"
        cells.append({"experiment": key, "task": task, "n_train": n, "seed": 0, "flat_baselines": flat, "run_id": run})
        ds = Dataset(root, "metrics", run)
        ds.create({})
        ds.write_shard(0, pa.Table.from_pylist(rows_of(run, n, flat), schema=METRIC_SCHEMA))
        ds.mark_complete({})
    ds = Dataset(root, "experiment_cells", key)
    ds.create({"recipe": {"tasks": [task], "target": {"name": "tgt"}, "grid": {"n_train": [10, 100], "seeds": [0]}}})
    ds.write_shard(0, pa.Table.from_pylist(cells))
    ds.mark_complete({})


def fixture_experiment(root):
    write_experiment(root, "exp1", "patching", lambda run, n, flat: [
        _metric(run, "patching", "tgt", "trained", n, "exact_match", 0.2 + n / 500, 0.02),
        _metric(run, "patching", "other-lm", "trained", n, "exact_match", 0.25, 0.02),
        _metric(run, "patching", "", "majority", n, "exact_match", 0.3, 0.02),
        _metric(run, "patching", "tgt", "zero_shot", 0, "exact_match", 0.01 if flat else 0.99, 0.01),
        _metric(run, "patching", "tgt", "trained", n, "train_steps", 30 + n // 2, 0.0, split="train"),
        _metric(run, "patching", "tgt", "trained", n, "best_step", 10 + n // 10, 0.0, split="train")])  # fmt: skip


def test_report_tables_plots_and_orderings(home):
    fixture_experiment(home)
    assert latest_experiment(home) == "exp1"
    path = write_report(home, "exp1")
    text = path.read_text()
    assert "| self | 22.0 ± 2.0 | 40.0 ± 2.0 | – |" in text  # the curve, x100 with SEs
    assert "| other (other-lm) | 25.0 ± 2.0 | 25.0 ± 2.0 | – |" in text
    assert "| self untrained, zero-shot | – | – | 1.0 ± 1.0 |" in text  # flat: from the flat cell only
    assert "self > other (other-lm) **held** (Δ = +15.0 ± 2.8, unpaired)" in text  # no predictions to pair
    assert "self > majority answer **held**" in text
    assert "Paper (§6, 8B targets): self (Llama-3.1-8B) 48.6" in text
    assert "| series | n=10 | n=100 |\n|---|---|---|\n| self | 35 (11) | 80 (20) |" in text  # steps (best step)
    for png in ("patching-exact_match-test.png", "self-vs-other.png"):
        assert (path.parent / png).stat().st_size > 5000 and f"({png})" in text


def test_orderings_pair_the_differences_over_the_same_items(home):
    fixture_experiment(home)
    # the largest cell's predictions: self's exact match 1, 1, 0, 1 against v = 0's 0, 1, 0, 0 on four rows
    rows = [(e, "tgt", "trained", a) for e, a in zip("abcd", (1, 1, 0, 1), strict=True)]
    rows += [(e, "tgt", "zero_vector", b) for e, b in zip("abcd", (0, 1, 0, 0), strict=True)]
    ds = Dataset(home, "predictions", "patching-run100")
    ds.create({})
    ds.write_shard(0, pa.Table.from_pylist([
        {"run_id": "patching-run100", "task": "patching", "example_id": e, "explainer_model": m, "method": k,
         "split": "test", "prediction": "", "reference": "", "score": float(v)} for e, m, k, v in rows],
        schema=PREDICTION_SCHEMA))  # fmt: skip
    ds.mark_complete({})
    m = Dataset(home, "metrics", "patching-run100")  # v = 0's metric row beside the fixture's
    extra = pa.Table.from_pylist([_metric("patching-run100", "patching", "tgt", "zero_vector", 100, "exact_match",
                                          0.25, 0.2)], schema=METRIC_SCHEMA)  # fmt: skip
    m.write_shard(1, extra)
    text = write_report(home, "exp1").read_text()
    # the predictions, not the metric rows, give the paired difference: diffs 1, 0, 0, 1: mean 0.5, sample sd 0.577, paired se 0.289 -> 50.0 ± 28.9, not resolved (< 2 SE)
    assert "self > self, v = 0 **not resolved** (Δ = +50.0 ± 28.9, paired)" in text


def test_alignment_rows_get_their_table_the_paper_numbers_and_the_quality_scatter(home):
    write_experiment(home, "exp2", "features", lambda run, n, flat: [
        _metric(run, "features", "tgt", "trained", n, "simulator_corr", 0.3 + n / 1000, 0.02),
        _metric(run, "features", "other-lm", "trained", n, "simulator_corr", 0.2, 0.02),
        _metric(run, "alignment", "tgt", "trained", n, "dot_product_similarity", 0.95, 0.01),
        _metric(run, "alignment", "other-lm", "trained", n, "dot_product_similarity", 0.05, 0.01),
        _metric(run, "alignment", "tgt", "trained", n, "sae_pattern_similarity", 0.9, 0.01),
        _metric(run, "alignment", "other-lm", "trained", n, "sae_pattern_similarity", 0.1, 0.01)])  # fmt: skip
    path = write_report(home, "exp2")
    text = path.read_text()
    assert "## Privileged access: explainer-target alignment" in text
    assert (
        "| self | 95.0 ± 1.0 | 95.0 ± 1.0 | – |" in text and "| other (other-lm) | 5.0 ± 1.0 | 5.0 ± 1.0 | – |" in text
    )
    assert "self > other (other-lm) **held** (Δ = +90.0 ± 1.4, unpaired)" in text
    assert "Paper (§6, 8B targets): Llama-3-8B (sibling) 96.6" in text
    assert (path.parent / "quality-vs-alignment.png").stat().st_size > 5000 and "(quality-vs-alignment.png)" in text
