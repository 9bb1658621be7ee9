"""Plots and the markdown report of an experiment: tables in the paper's shape beside its numbers (paper §6).

Written to `<store>/reports/<experiment>/` (report.md and PNGs), built in a temp folder and renamed into place.
Series: trained explainers by role (self = initialised from the target), nearest neighbour (features), the
controls (zero_vector, shuffled_vector, rotated_basis, no_activation / no_layer / no_token) as curves over
n_train; the n_train-independent baselines (SelfIE, zero-shot, majority, position bias, gold) as flat lines.
Values are x100; ± is one SE (the run's own SE for a single seed, the SE over seeds otherwise). An ordering
"held" when the difference exceeds twice its SE, paired over the same items where predictions allow.
"""

import json
import os
import shutil
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import prefect
import pyarrow as pa

from storage.catalog import PAIRED_GAINS_SQL
from storage.errors import UserInputError
from storage.store import Dataset, complete_datasets, sweep_stale_temps
from tasks.common.orchestration import RETRIES, retry_transient

# (task, metric, split) reported, in order; the first of each task is its headline metric.
METRICS = {
    "features": [("simulator_corr", "test"), ("simulator_corr", "ood_act"), ("simulator_corr", "ood_delta"),
                 ("embedding_similarity", "test")],
    "patching": [("exact_match", "test"), ("has_changed_f1", "test"), ("content_match", "test")],
    "ablation": [("exact_match", "test"), ("has_changed_f1", "test"), ("content_match", "test")],
    "alignment": [("dot_product_similarity", "test"), ("sae_pattern_similarity", "test")],
}  # fmt: skip
TASK_TITLES = {"features": "Task A: feature descriptions", "patching": "Task B: activation patching",
               "ablation": "Task C: input ablation",
               "alignment": "Privileged access: explainer-target alignment (Table 4, measured with task A)"}  # fmt: skip
CURVES = (
    "trained",
    "nearest_neighbor",
    "nearest_neighbor_layerwise",
    "zero_vector",
    "shuffled_vector",
    "rotated_basis",
    "no_activation",
    "no_layer",
    "no_token",
)
# paper §6, x100: Table 1 (Llama-3.1-8B target), Table 5 and 6 (Llama-3.1-8B(-Instruct) target).
PAPER = {
    ("features", "simulator_corr", "test"): {"self (Llama-3.1-8B, LoRA)": 45.6, "other (Qwen3-8B)": 40.6,
                                             "nearest neighbour": 33.7, "SelfIE best of 5": 36.4, "gold": 43.3},
    ("features", "simulator_corr", "ood_act"): {"self (Llama-3.1-8B, LoRA)": 50.6, "other (Qwen3-8B)": 21.1,
                                                "nearest neighbour": 38.9, "SelfIE best of 5": 43.3},
    ("features", "simulator_corr", "ood_delta"): {"self (Llama-3.1-8B, LoRA)": 34.0, "other (Qwen3-8B)": 12.3,
                                                  "nearest neighbour": 18.5, "SelfIE best of 5": 21.0},
    ("patching", "exact_match", "test"): {"self (Llama-3.1-8B)": 48.6, "other (Qwen3-8B)": 41.7,
                                          "- activation": 45.2, "untrained self": 3.2},
    ("patching", "has_changed_f1", "test"): {"self (Llama-3.1-8B)": 77.5, "other (Qwen3-8B)": 75.1,
                                             "- activation": 73.9, "untrained self": 31.4},
    ("patching", "content_match", "test"): {"self (Llama-3.1-8B)": 54.6, "other (Qwen3-8B)": 47.6,
                                            "- activation": 50.8, "untrained self": 7.0},
    ("ablation", "exact_match", "test"): {"self (Llama-3.1-8B-Instruct)": 63.8, "other (Qwen3-8B)": 56.7,
                                          "untrained self": 8.1},
    ("ablation", "has_changed_f1", "test"): {"self (Llama-3.1-8B-Instruct)": 74.2, "other (Qwen3-8B)": 71.3,
                                             "untrained self": 33.4},
    ("ablation", "content_match", "test"): {"self (Llama-3.1-8B-Instruct)": 75.3, "other (Qwen3-8B)": 67.8,
                                            "untrained self": 15.5},
    ("alignment", "dot_product_similarity", "test"): {"Llama-3-8B (sibling)": 96.61, "Llama-3.1-8B-Instruct": 85.27,
                                                      "Llama-3.1-70B (pretrained Π)": 21.48, "Qwen3-8B": 0.10},
    ("alignment", "sae_pattern_similarity", "test"): {"Llama-3-8B (sibling)": 93.66, "Llama-3.1-8B-Instruct": 88.63,
                                                      "Llama-3.1-70B (pretrained Π)": 54.25, "Qwen3-8B": 0.10},
}  # fmt: skip


def latest_experiment(root: Path) -> str:
    """Key of the most recently completed experiment in the store."""
    done = [ds for ds in complete_datasets(root) if ds.table == "experiment_cells"]
    if not done:
        raise UserInputError("experiment", f"no finished experiment in {root}", "run `selfexplain run experiment`")
    return max(done, key=lambda ds: (ds.path / "_COMPLETE.json").stat().st_mtime).key


def load_results(root: Path, experiment: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(metric rows of every cell, the experiment's recipe); rows carry their own task (a features cell also
    holds `alignment` rows), the cell's n_train and seed, and whether it holds the flat baselines."""
    cells_ds = Dataset(root, "experiment_cells", experiment)
    if not cells_ds.complete_or_invalidate():
        raise UserInputError("experiment", f"{experiment!r} is not a finished experiment in {root}",
                             "pass a key from `selfexplain sql \"select distinct experiment from experiment_cells\"`")  # fmt: skip
    cells = [r for t in cells_ds.iter_shards() for r in t.to_pylist()]
    files = [str(p) for c in cells for p in Dataset(root, "metrics", c["run_id"]).shard_files()]
    con = duckdb.connect()
    con.register("cells", pa.Table.from_pylist(cells))
    rows = con.execute(
        f"select m.task, c.n_train as grid_n_train, c.seed as grid_seed, c.flat_baselines, m.method, "
        f"m.explainer_model, m.target_model, m.metric, m.split, m.value, m.se, m.n "
        f"from read_parquet({files}) m join cells c using (run_id)"
    ).fetchall()
    names = ["task", "n_train", "seed", "flat", "method", "model", "target", "metric", "split", "value", "se", "n"]
    recipe = json.loads((cells_ds.path / "_dataset.json").read_text())["recipe"]
    return [dict(zip(names, r, strict=True)) for r in rows], recipe


def series_name(method: str, model: str, target: str) -> str:
    role = "self" if model == target else f"other ({model})"
    return {
        "trained": role,
        "zero_vector": f"{role}, v = 0",
        "shuffled_vector": f"{role}, shuffled v",
        "rotated_basis": f"{role}, rotated basis",
        "no_activation": f"{role}, - activation",
        "no_layer": f"{role}, - layer",
        "no_token": f"{role}, - token",
        "zero_shot": f"{role} untrained, zero-shot",
        "nearest_neighbor": "nearest neighbour",
        "nearest_neighbor_layerwise": "nearest neighbour (same layer)",
        "selfie": "SelfIE, one scale chosen on training features (untrained target)",
        "selfie_best_of_scales": "SelfIE best of scales per item (upper bound)",
        "gold": "gold labels",
        "majority": "majority answer",
        "position_bias": "position bias",
        "correct_answer": "correct answer, hint ignored",
    }.get(method, f"{method} ({model})")


def aggregate(rows: list[dict[str, Any]]) -> dict[tuple, dict[str, dict[int, tuple[float, float]]]]:
    """{(task, metric, split): {series: {n_train: (value, se)}}}, means over seeds."""
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        flat = r["method"] not in CURVES
        if flat and not r["flat"]:
            continue  # flat baselines come from their one cell
        n = -1 if flat else r["n_train"]
        groups[(r["task"], r["metric"], r["split"], series_name(r["method"], r["model"], r["target"]), n)].append(r)
    out: dict[tuple, dict[str, dict[int, tuple[float, float]]]] = defaultdict(lambda: defaultdict(dict))
    for (task, metric, split, series, n), rs in groups.items():
        values = np.array([r["value"] for r in rs])
        se = float(rs[0]["se"]) if len(rs) == 1 else float(values.std(ddof=1) / np.sqrt(len(rs)))
        out[(task, metric, split)][series][n] = (float(values.mean()), se)
    return out


def plot_curves(key: tuple, series: dict[str, dict[int, tuple[float, float]]], path: Path) -> None:
    """The metric against n_train (log x, SE bands); flat baselines as dashed horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, (name, points) in enumerate(sorted(series.items())):
        color = f"C{i % 10}"
        if -1 in points:
            value, se = points[-1]
            ax.axhline(100 * value, color=color, linestyle="--", linewidth=1.2, label=name)
            ax.axhspan(100 * (value - se), 100 * (value + se), color=color, alpha=0.08)
            continue
        ns = sorted(points)
        v = np.array([points[n][0] for n in ns]) * 100
        s = np.array([points[n][1] for n in ns]) * 100
        ax.plot(ns, v, color=color, marker="o", label=name)
        ax.fill_between(ns, v - s, v + s, color=color, alpha=0.2)
    task, metric, split = key
    ax.set_xscale("log")
    ax.set_xlabel("training examples (n_train)")
    ax.set_ylabel(f"{metric} x100 ({split})")
    ax.set_title(f"{TASK_TITLES[task]}: {metric} ({split})", fontsize=10)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_self_vs_other(headline: dict[str, dict[str, tuple[float, float]]], path: Path) -> None:
    """Bars: each trained explainer's headline metric at the largest n_train, per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(headline)
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        names = sorted(headline[task], key=lambda s: (not s.startswith("self"), s))
        values = [100 * headline[task][n][0] for n in names]
        errors = [100 * headline[task][n][1] for n in names]
        ax.bar(range(len(names)), values, yerr=errors, capsize=4, color=["C0" if n == "self" else "C1" for n in names])
        ax.set_xticks(range(len(names)), names, rotation=20, fontsize=7, ha="right")
        ax.set_title(f"{task}: {METRICS[task][0][0]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_quality_vs_alignment(table: dict[tuple, dict[str, dict[int, tuple[float, float]]]], path: Path) -> bool:
    """Scatter: each trained explainer's feature-description score against its dot-product alignment with
    the target, one point per n_train (Fig. 7's question: does quality track alignment?). False: no data."""
    quality = table.get(("features", *METRICS["features"][0]), {})
    align = table.get(("alignment", *METRICS["alignment"][0]), {})
    series = [s for s in align if s in quality]
    if not series:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.6, 3.6))
    for i, name in enumerate(sorted(series)):
        sizes = sorted(set(align[name]) & set(quality[name]))
        x = [100 * align[name][n][0] for n in sizes]
        y = [100 * quality[name][n][0] for n in sizes]
        ax.errorbar(x, y, yerr=[100 * quality[name][n][1] for n in sizes], fmt="o", color=f"C{i}", label=name)
        for n, xi, yi in zip(sizes, x, y, strict=True):
            ax.annotate(f"n={n}", (xi, yi), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("dot-product similarity with the target (x100)")
    ax.set_ylabel(f"features {METRICS['features'][0][0]} (x100)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _fmt(point: tuple[float, float] | None) -> str:
    return "–" if point is None else f"{100 * point[0]:.1f} ± {100 * point[1]:.1f}"


def paired_gains(root: Path, cells: list[dict[str, Any]], target: str) -> dict[tuple, tuple[float, float]]:
    """{(task, split, n_train, series, rival series): (gain, SE)}: each trained explainer against every method
    scored on the same items of its cell (the catalog's `paired_gains`, over the cells' predictions). One seed:
    the paired SE of the run; several: the SE over seeds of the per-seed gains."""
    files = [str(p) for c in cells for p in Dataset(root, "predictions", c["run_id"]).shard_files()]
    if not files:
        return {}
    con = duckdb.connect()
    con.execute(f"create view predictions as select * from read_parquet({files})")
    con.execute(PAIRED_GAINS_SQL)
    con.register("cells", pa.Table.from_pylist(cells))
    rows = con.execute(
        "select g.task, g.split, c.n_train, g.explainer_model, g.rival_method, g.rival_model, g.gain, g.se "
        "from paired_gains g join cells c using (run_id)"
    ).fetchall()
    groups: dict[tuple, list[tuple[float, float]]] = defaultdict(list)
    for task, split, n, model, rival_method, rival_model, gain, se in rows:
        rival = series_name(rival_method, rival_model, target)
        groups[(task, split, n, series_name("trained", model, target), rival)].append((gain, se))
    out = {}
    for key, gains in groups.items():
        values = np.array([g for g, _ in gains])
        se = gains[0][1] if len(gains) == 1 else float(values.std(ddof=1) / np.sqrt(len(gains)))
        out[key] = (float(values.mean()), float(se))
    return out


def orderings(
    table: dict[tuple, dict[str, dict[int, tuple[float, float]]]],
    tasks: list[str],
    paired: dict[tuple, tuple[float, float]] | None = None,
) -> list[str]:
    """Plain statements: does self beat other, the baselines and its own controls at the largest n_train? The
    difference's SE is paired (same items, from `paired_gains`) where the predictions allow, else the two
    SEs combined as if independent (said so)."""
    paired = paired or {}
    lines = []
    for task in tasks:
        metric, split = METRICS[task][0]
        series = table.get((task, metric, split), {})
        if "self" not in series:
            continue
        n_max = max(series["self"])
        mine = series["self"][n_max]
        rivals = [
            s
            for s in series
            if s.startswith("other (")
            and not s.endswith(("v = 0", "shuffled v", "rotated basis", "zero-shot", "activation", "layer", "token"))
        ]
        rivals += [s for s in series if not s.startswith(("self", "other")) and s != "gold labels"]
        rivals += [f"self, {c}" for c in ("v = 0", "shuffled v", "rotated basis", "- activation", "- layer",
                                           "- token")] + ["self untrained, zero-shot"]  # fmt: skip
        for rival in rivals:
            if rival not in series:
                continue
            theirs = series[rival].get(n_max, series[rival].get(-1))
            if theirs is None:
                continue
            if (task, split, n_max, "self", rival) in paired:
                (diff, se), how = paired[(task, split, n_max, "self", rival)], "paired"
            else:
                diff, se, how = mine[0] - theirs[0], float(np.hypot(mine[1], theirs[1])), "unpaired"
            verdict = "held" if diff > 2 * se else "reversed" if diff < -2 * se else "not resolved"
            lines.append(f"- {task}, {metric} ({split}), n_train={n_max}: self {_fmt(mine)} vs {rival} "
                         f"{_fmt(theirs)}: self > {rival} **{verdict}** (Δ = {100 * diff:+.1f} ± {100 * se:.1f}, "
                         f"{how})")  # fmt: skip
    return lines


def steps_table(steps: dict[str, dict[int, tuple[float, float]]],
                best: dict[str, dict[int, tuple[float, float]]]) -> list[str]:  # fmt: skip
    """Markdown lines: the optimizer steps behind every trained point (mean over seeds), so an under-trained
    point of a data-efficiency curve reads as one; beside each, in brackets, the step of the best validation,
    whose weights the point was scored with."""
    if not steps:
        return []
    sizes = sorted({n for pts in steps.values() for n in pts})
    lines = ["### optimizer steps (train_steps; best validation step in brackets)", "",
             "| series | " + " | ".join(f"n={n}" for n in sizes) + " |", "|---" * (len(sizes) + 1) + "|"]  # fmt: skip
    for name in sorted(steps):
        kept = best.get(name, {})
        cells = [f"{steps[name][n][0]:.0f}" + (f" ({kept[n][0]:.0f})" if n in kept else "") if n in steps[name]
                 else "–" for n in sizes]  # fmt: skip
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def write_report(root: Path, experiment: str) -> Path:
    """Render report.md and the plots of one experiment; returns the report's path."""
    rows, recipe = load_results(root, experiment)
    table = aggregate(rows)
    cells = [r for t in Dataset(root, "experiment_cells", experiment).iter_shards() for r in t.to_pylist()]
    paired = paired_gains(root, cells, recipe["target"]["name"])
    final = root / "reports" / experiment
    (root / "reports").mkdir(parents=True, exist_ok=True)
    sweep_stale_temps(root / "reports")
    tmp = final.with_name(f".{experiment}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tasks = [t for t in [*recipe["tasks"], "alignment"] if any(k[0] == t for k in table)]
    target = recipe["target"]["name"]
    lines = [f"# selfexplain experiment `{experiment}`", "",
             f"Target **{target}**; tasks {', '.join(tasks)}; n_train {recipe['grid']['n_train']}; "
             f"seeds {recipe['grid']['seeds']}. Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
             "Values x100, ± one SE. Flat baselines do not depend on n_train.", ""]  # fmt: skip
    lines += [
        "## Orderings of the paper, here",
        "",
        *(orderings(table, tasks, paired) or ["- no trained self explainer"]),
        "",
    ]
    headline = {}
    for task in tasks:
        lines += [f"## {TASK_TITLES[task]}", ""]
        for metric, split in METRICS[task]:
            series = table.get((task, metric, split))
            if not series:
                continue
            sizes = sorted({n for pts in series.values() for n in pts if n != -1})
            lines += [f"### {metric} ({split})", "", "| series | " + " | ".join(f"n={n}" for n in sizes) + " | flat |",
                      "|---" * (len(sizes) + 2) + "|"]  # fmt: skip
            for name in sorted(series, key=lambda s: (-1 in series[s], s)):
                pts = series[name]
                lines.append(f"| {name} | " + " | ".join(_fmt(pts.get(n)) for n in sizes) + f" | {_fmt(pts.get(-1))} |")
            paper = PAPER.get((task, metric, split))
            if paper:
                lines += ["", "Paper (§6, 8B targets): " + "; ".join(f"{k} {v:.1f}" for k, v in paper.items())]
            png = f"{task}-{metric}-{split}.png"
            plot_curves((task, metric, split), series, tmp / png)
            lines += ["", f"![{task} {metric} {split}]({png})", ""]
            if (metric, split) == METRICS[task][0]:
                headline[task] = {s: max(((n, p) for n, p in pts.items() if n != -1), default=(0, None))[1]
                                  for s, pts in series.items() if s == "self" or (s.startswith("other (") and "," not in s)}  # fmt: skip
        lines += steps_table(table.get((task, "train_steps", "train"), {}), table.get((task, "best_step", "train"), {}))
    headline = {t: {s: p for s, p in h.items() if p is not None} for t, h in headline.items() if h}
    if headline:
        plot_self_vs_other(headline, tmp / "self-vs-other.png")
        lines += ["## Self vs other at the largest n_train", "", "![self vs other](self-vs-other.png)", ""]
    if plot_quality_vs_alignment(table, tmp / "quality-vs-alignment.png"):
        lines += ["## Explainer quality against alignment", "", "![quality vs alignment](quality-vs-alignment.png)", ""]
    (tmp / "report.md").write_text("\n".join(lines) + "\n")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final / "report.md"


@prefect.task(name="write-report", retries=RETRIES, retry_condition_fn=retry_transient)
def write_report_task(root: str, experiment: str) -> dict[str, Any]:
    """Render the report and publish it as a markdown artifact (key `experiment-report`)."""
    from prefect.artifacts import create_markdown_artifact

    path = write_report(Path(root), experiment)
    create_markdown_artifact(key="experiment-report", markdown=path.read_text(), description=f"report: {path}")
    return {"report": str(path), "plots": sorted(p.name for p in path.parent.glob("*.png"))}
