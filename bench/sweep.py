"""Benchmark the patching sweep: patched positions/s of our batched sweep (one forward of x' for every layer,
the patched copies of x as a batch with per-row hooks, last-position logits only) beside one forward per
patch, on the same pairs, in alternation; medians compared. Agreement: identical next-token ids.

    .venv/bin/python bench/sweep.py [--quick]

Ends with `RESULT sweep_speedup <x> goal 5` and `RESULT sweep_agreement <fraction> goal 1`.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks import models  # noqa: E402
from tasks.config import ModelConfig, PatchingConfig  # noqa: E402
from tasks.facts import load_facts  # noqa: E402
from tasks.patching import all_layers, layer_chunks, make_pairs, next_tokens, render, tokenise  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    n_pairs, rounds = (2, 2) if args.quick else (4, 3)
    lm = models.load(ModelConfig(name="smollm2-135m-instruct", autocast="none"))
    cfg = PatchingConfig(n_pairs=40)
    pairs = make_pairs(load_facts(None), cfg)[:n_pairs]
    chunks = layer_chunks(lm.n_layers, 4)
    work = []  # (ids of x, patches)
    for pair in pairs:
        text_x, _ = render(lm, pair.x.prompt, pair.options, "fewshot")
        text_p, _ = render(lm, pair.x_prime.prompt, pair.options, "fewshot")
        ids_x = tokenise(lm, text_x, (0, 0)).ids
        ids_p = tokenise(lm, text_p, (0, 0)).ids
        h = all_layers(lm, ids_p)
        positions = range(min(len(ids_x), len(ids_p)) - 24, min(len(ids_x), len(ids_p)))
        work.append((ids_x, [(c, t, h[c, t].mean(0)) for c in chunks for t in positions]))
    n = sum(len(p) for _, p in work)
    times = {"batched": [], "one_per_patch": []}
    outputs = {}
    for _ in range(rounds):
        for name, size in (("batched", 32), ("one_per_patch", 1)):
            t = time.perf_counter()
            outputs[name] = [tok for ids, patches in work for tok in next_tokens(lm, ids, patches, size)]
            times[name].append(time.perf_counter() - t)
    a, b = statistics.median(times["batched"]), statistics.median(times["one_per_patch"])
    agree = float(np.mean(np.array(outputs["batched"]) == np.array(outputs["one_per_patch"])))
    print(f"{n} patched positions ({n_pairs} pairs x 4 chunks x 24 positions), fp32: batched {n / a:.1f}/s, "
          f"one forward per patch {n / b:.1f}/s (medians of {rounds})")  # fmt: skip
    print(f"RESULT sweep_speedup {b / a:.2f} goal 5")
    print(f"RESULT sweep_agreement {agree:.3f} goal 1")


if __name__ == "__main__":
    main()
