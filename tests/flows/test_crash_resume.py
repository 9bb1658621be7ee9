"""Crash-resume for every flow: SIGKILL a run at several random progress points, rerun to completion, and compare every
Parquet table with an uninterrupted run of the same recipe (same rows, same values).

The unit of resume is a shard (caches, sweeps) or a stage (SAE layers, explainer training, evaluation): a
run killed mid-stage restarts that stage from its last finished shard, and training restarts from its first
step; under the same seed it reproduces the uninterrupted result exactly (fp32 tiny models on CPU).
"""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest
import yaml

from flows import FLOWS
from storage.store import complete_datasets
from tasks.recipes import RECIPES
from tests.factories import tiny_experiment

KILLS = int(os.environ.get("SELFEXPLAIN_CRASH_KILLS", "3"))  # bench/crash_resume runs 10
VOLATILE = {"runs"}  # wall-clock timestamps by design


def _recipes(tmp: Path, corpus: Path) -> dict[str, dict]:
    exp = tiny_experiment(tmp, corpus)
    return {
        "cache-activations": exp.features.cache_recipe().model_dump(mode="json"),
        "features": exp.features.model_dump(mode="json"),
        "patching": exp.patching.model_dump(mode="json"),
        "ablation": exp.ablation.model_dump(mode="json"),
    }


def _tables(root: Path) -> dict[tuple[str, str], pa.Table]:
    out = {}
    for ds in complete_datasets(root):
        if ds.table in VOLATILE or not ds.shard_files():
            continue
        table = pa.concat_tables(list(ds.iter_shards()))
        keys = [c for c in table.column_names if not pa.types.is_list(table.schema.field(c).type)
                and not pa.types.is_fixed_size_list(table.schema.field(c).type)]  # fmt: skip
        out[(ds.table, ds.key)] = table.sort_by([(k, "ascending") for k in keys])
    return out


def _cli(args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "deploy.cli", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip


def _events(root: Path) -> list[Path]:
    """The files a run leaves under `tables/` (shards, manifest rows, completion marks, checkpoints), oldest
    first, relative to the store: a rerun in another store of the same recipe makes the same paths."""
    files = [p for p in (root / "tables").rglob("*") if p.is_file() and p.suffix != ".lock" and "tmp" not in p.name
             and p.relative_to(root / "tables").parts[0] not in VOLATILE]  # fmt: skip
    return [p.relative_to(root) for p in sorted(files, key=lambda p: p.stat().st_mtime_ns)]


def _assert_same(reference: pa.Table, resumed: pa.Table, key: tuple[str, str]) -> None:
    """Every table equal value for value, with two exceptions, continuous functions of float32 forward passes
    that agree across processes to about 1e-8, not bit for bit (BLAS kernels vary with buffer alignment): the
    `alignment` rows of `metrics` (cosines, correlations of hidden states) and the losses of `explainers` (a
    validation loss computed by the killed process, kept in its resume state). Those are compared at rtol
    1e-6; every other column, exactly."""
    import numpy as np
    import pyarrow.compute as pc

    if key[0] == "explainers":
        losses = ["train_loss", "val_loss"]
        exact = [c for c in reference.column_names if c not in losses]
        assert resumed.select(exact).equals(reference.select(exact)), key
        for c in losses:
            np.testing.assert_allclose(resumed[c].to_numpy(), reference[c].to_numpy(), rtol=1e-6, err_msg=str(key))
        return
    if key[0] != "metrics":
        assert resumed.equals(reference), key
        return

    for keep in (lambda t: pc.not_equal(t["task"], "alignment"), lambda t: pc.equal(t["task"], "alignment")):
        a, b = reference.filter(keep(reference)), resumed.filter(keep(resumed))
        floats = {"value", "se"} if a.num_rows and a["task"][0].as_py() == "alignment" else set()
        exact = [c for c in a.column_names if c not in floats]
        assert a.select(exact).equals(b.select(exact)), key
        for c in floats:
            np.testing.assert_allclose(b[c].to_numpy(), a[c].to_numpy(), rtol=1e-6, atol=1e-9, err_msg=str(key))


@pytest.mark.parametrize("flow", ["cache-activations", "features", "patching", "ablation"])
def test_killed_runs_resume_to_the_uninterrupted_tables(tmp_path, text_file, cli_env, flow):
    text_file.write_text(text_file.read_text() * 6)
    data = _recipes(tmp_path / "unused", text_file)[flow]
    # Uninterrupted reference, in this process; the files it wrote, in order, are the run's progress points.
    data["home"] = str(tmp_path / "reference")
    FLOWS[flow](RECIPES[flow].model_validate(data))
    reference = _tables(tmp_path / "reference")
    events = _events(tmp_path / "reference")
    assert reference and len(events) > KILLS + 1

    # KILLS runs, each SIGKILLed (no cleanup runs) as soon as it has written a random, later progress point
    # (never the last): every kill lands mid-run, after the previous kill's point.
    killed = tmp_path / "killed"
    data["home"] = str(killed)
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(data))
    args = ["run", flow, "-c", str(recipe_file)]
    points = sorted(random.Random(flow).sample(range(len(events) - 1), KILLS))
    for point in points:
        proc = _cli(args, cli_env)
        deadline = time.monotonic() + 600
        while proc.poll() is None and not (killed / events[point]).exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proc.poll() is None, f"the run ended before reaching {events[point]}: {proc.communicate()[1][-2000:]}"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    final = _cli(args, cli_env)
    _, err = final.communicate(timeout=900)
    assert final.returncode == 0, err[-3000:]
    resumed = _tables(killed)
    assert sorted(resumed) == sorted(reference)
    for key, table in reference.items():
        _assert_same(table, resumed[key], key)
    assert not list(killed.rglob(".*tmp*"))  # no temp file left behind
