"""Benchmark the patching sweep: patched positions/s of our sweep (one chunk per batch, in order of position;
the clean prefix run once per batch and its KV cache shared; blocks below the chunk not run, block f started
from the clean residual; last-position logits only) beside one full forward per patch, on the same pairs and
the positions the real sweep samples (recipe defaults), in alternation; medians compared. Two more paths
split the gain: the shared prefix alone (chunks mixed in a batch: the sweep before it skipped the blocks below
a chunk) and batched full forwards. Agreement: identical next-token ids.

    .venv/bin/python bench/sweep.py [--quick]

Ends with `RESULT sweep_speedup <x> goal 5` and `RESULT sweep_agreement <fraction> goal 1`.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.common import models  # noqa: E402
from tasks.common.config import ModelConfig  # noqa: E402
from tasks.outcomes.facts import load_facts  # noqa: E402
from tasks.patching.config import PatchingConfig  # noqa: E402
from tasks.patching.ground_truth import layer_chunks, make_pairs, sweep_pair  # noqa: E402
from tasks.patching.sweep import next_tokens  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    n_pairs, rounds = (2, 2) if args.quick else (4, 3)
    lm = models.load(ModelConfig(name="smollm2-135m-instruct", autocast="none"))
    cfg = PatchingConfig(n_pairs=40, prompt_format="fewshot", positions_per_pair=24)  # as recipes/patching_smollm2
    pairs = make_pairs(load_facts(None), cfg)[: 2 * n_pairs]
    chunks = layer_chunks(lm.n_layers, 4)
    work = []  # (ids of x, patches): the positions and vectors the sweep itself chooses
    for i, pair in enumerate(pairs):
        rows, _ = sweep_pair(lm, pair, chunks, cfg, i)
        if not rows or len(work) == n_pairs:
            continue  # no clean token alignment for this pair (the sweep skips it too)
        ids = lm.tokenizer(rows[0]["input_text"], add_special_tokens=False)["input_ids"]
        work.append((ids, [(r["layer"], r["orig_pos"], torch.tensor(r["intervention_vector"])) for r in rows]))
    n = sum(len(p) for _, p in work)
    mean_t = np.mean([t / len(ids) for ids, p in work for _, t, _ in p])
    size = PatchingConfig().batch_size  # the sweep's; the two references at the sweep's earlier default, 32
    paths = {"ours": (size, "all"), "prefix_only": (32, "prefix"), "batched_full": (32, "none"),
             "one_per_patch": (1, "none")}  # fmt: skip
    times = {name: [] for name in paths}
    outputs = {}
    for _ in range(rounds):
        for name, (size, share) in paths.items():
            t = time.perf_counter()
            outputs[name] = [tok for ids, patches in work for tok in next_tokens(lm, ids, patches, size, share)]
            times[name].append(time.perf_counter() - t)
    med = {name: statistics.median(v) for name, v in times.items()}
    agree = float(np.mean(np.array(outputs["ours"]) == np.array(outputs["one_per_patch"])))
    agree_prefix = float(np.mean(np.array(outputs["prefix_only"]) == np.array(outputs["one_per_patch"])))
    print(f"{n} patched positions ({n_pairs} pairs x 4 chunks, mean position {mean_t:.2f} of the prompt), fp32: "
          + ", ".join(f"{name} {n / m:.1f}/s" for name, m in med.items()) + f" (medians of {rounds})")  # fmt: skip
    print(f"RESULT sweep_speedup {med['one_per_patch'] / med['ours']:.2f} goal 5")
    print(f"RESULT sweep_speedup_prefix_only {med['one_per_patch'] / med['prefix_only']:.2f} goal -")
    print(f"RESULT sweep_speedup_without_prefix_reuse {med['one_per_patch'] / med['batched_full']:.2f} goal -")
    print(f"RESULT sweep_agreement {agree:.3f} goal 1")
    print(f"RESULT sweep_agreement_prefix_only {agree_prefix:.3f} goal 1")


if __name__ == "__main__":
    main()
