"""Crash-resume for every flow: SIGKILL a run at several random points, rerun to completion, and compare every
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
from tasks.config import RECIPES
from tests.flows.test_experiment import tiny_experiment

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


@pytest.mark.parametrize("flow", ["cache-activations", "features", "patching", "ablation"])
def test_killed_runs_resume_to_the_uninterrupted_tables(tmp_path, text_file, cli_env, flow):
    text_file.write_text(text_file.read_text() * 6)
    data = _recipes(tmp_path / "unused", text_file)[flow]
    # Uninterrupted reference, in this process.
    data["home"] = str(tmp_path / "reference")
    started = time.monotonic()
    FLOWS[flow](RECIPES[flow].model_validate(data))
    duration = time.monotonic() - started
    reference = _tables(tmp_path / "reference")
    assert reference

    data["home"] = str(tmp_path / "killed")
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(data))
    args = ["run", flow, "-c", str(recipe_file)]
    rng = random.Random(flow)
    startup = 8.0  # interpreter, imports and the ephemeral Prefect API before any stage runs
    for _ in range(KILLS):
        proc = _cli(args, cli_env)
        time.sleep(startup + rng.uniform(0.1, 0.9) * duration)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    final = _cli(args, cli_env)
    _, err = final.communicate(timeout=900)
    assert final.returncode == 0, err[-3000:]
    resumed = _tables(tmp_path / "killed")
    assert sorted(resumed) == sorted(reference)
    for key, table in reference.items():
        assert resumed[key].equals(table), key
    assert not list((tmp_path / "killed").rglob(".*tmp*"))  # no temp file left behind
