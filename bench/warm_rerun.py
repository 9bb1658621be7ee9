"""Benchmark the warm rerun: a finished `experiment` run again, against its cold time (goal ≤ 5%).

Both runs call the experiment flow in this process on one fresh store: the cold run builds every stage; the
warm run must find each dataset complete (Prefect cache hits, no model loaded) and write nothing. Agreement:
the set of complete datasets and their completion stamps are identical before and after the warm run.

    .venv/bin/python bench/warm_rerun.py [--quick] [--recipe recipes/demo_smollm2.yaml]

`--quick` runs the tests' tiny-model experiment (all three tasks, two training sizes) instead of the recipe:
the real demo recipe takes about 30 minutes cold. Ends with `RESULT warm_over_cold <ratio> goal 0.05` and
`RESULT warm_rerun_writes <datasets changed> goal 0`.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def tiny_recipe(root: Path):
    """The tests' tiny experiment (random-init tiny models) over a small prose corpus."""
    from tests.conftest import PROSE
    from tests.flows.test_experiment import tiny_experiment

    text = root / "corpus.txt"
    text.write_text(PROSE * 120)
    return tiny_experiment(root, text)


def stamps(root: Path) -> dict[str, int]:
    from storage.store import complete_datasets

    return {str(ds.path): (ds.path / "_COMPLETE.json").stat().st_mtime_ns for ds in complete_datasets(root)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the tiny-model experiment instead of --recipe")
    ap.add_argument("--recipe", default=str(Path(__file__).resolve().parents[1] / "recipes" / "demo_smollm2.yaml"))
    args = ap.parse_args()

    from flows.experiment import experiment
    from storage.store import store_root
    from tasks.common.config import load_recipe
    from tasks.experiment.config import ExperimentRecipe

    root = Path(tempfile.mkdtemp(prefix="selfexplain-bench-warm-"))
    if args.quick:
        recipe = tiny_recipe(root)
    else:
        recipe = load_recipe(ExperimentRecipe, Path(args.recipe)).model_copy(update={"home": str(root / "store")})
    store = store_root(recipe.home)

    t0 = time.perf_counter()
    experiment(recipe)
    cold = time.perf_counter() - t0
    before = stamps(store)
    t0 = time.perf_counter()
    experiment(recipe)
    warm = time.perf_counter() - t0
    after = stamps(store)
    changed = len(set(before.items()) ^ set(after.items()))
    print(f"cold {cold:.1f} s  warm {warm:.1f} s  datasets {len(before)}  changed by the warm run {changed}")
    print(f"RESULT warm_over_cold {warm / cold:.3f} goal 0.05")
    print(f"RESULT warm_rerun_writes {changed} goal 0")


if __name__ == "__main__":
    main()
