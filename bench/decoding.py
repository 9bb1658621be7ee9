"""Benchmark evaluation decoding: our batched greedy decode (KV cache, stop strings, the vector at prefill)
beside a per-example HF `generate` loop on the same explainer, prompts and precision, in alternation (A B A B),
medians compared. Agreement: the decoded explanations, cut at the same stop strings, must be identical.

    .venv/bin/python bench/decoding.py [--quick]

Ends with `RESULT decoding_speedup <x> goal 5` and `RESULT decoding_agreement <fraction> goal 1`; then the
evaluation's own decoding (LoRA, bf16 autocast) with the frozen base stored in bf16 against the base as loaded
(`RESULT decoding_frozen_base_speedup`, and its agreement: identical explanations).
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
from tasks.explainer import model as ex  # noqa: E402
from tasks.explainer.config import ExplainerConfig  # noqa: E402
from tasks.features.prompts import feature_queries


@torch.inference_mode()
def per_example(e: ex.Explainer, queries: list[ex.Query], max_new_tokens: int) -> list[str]:
    """What a user writes first: one HF generate call per example, the vector written into inputs_embeds."""
    out = []
    for q in queries:
        b = e.collate([q], train=False)
        with e.lm.runtime.autocast_context():
            embeds = e.inject(b["input_ids"], b["vectors"], b["layers"], b["n_payloads"])
            ids = e.model.generate(inputs_embeds=embeds, attention_mask=b["attention_mask"], do_sample=False,
                                   max_new_tokens=max_new_tokens, eos_token_id=sorted(e.stop_ids),
                                   pad_token_id=e.tokenizer.pad_token_id)  # fmt: skip
        out.append(ex._cut(e._decode(ids[0])))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    args = ap.parse_args()
    n, rounds, new = (32, 2, 20) if args.quick else (96, 3, 20)
    cfg = ExplainerConfig(model=ModelConfig(name=args.model, autocast="none"), finetune="full")
    e = ex.Explainer(models.load(cfg.model), 576, 30, cfg)
    rng = np.random.default_rng(0)
    queries = feature_queries(rng.normal(size=(n, 576)), [3] * n, [None] * n, [str(i) for i in range(n)],
                                 e.chat, 0)  # fmt: skip
    times = {"batched": [], "per_example": []}
    outputs = {}
    for _ in range(rounds):
        for name, run in (("batched", lambda: e.generate(queries, new, 32)),
                          ("per_example", lambda: per_example(e, queries, new))):  # fmt: skip
            t = time.perf_counter()
            outputs[name] = run()
            times[name].append(time.perf_counter() - t)
    a, b = statistics.median(times["batched"]), statistics.median(times["per_example"])
    agree = float(np.mean([x == y for x, y in zip(outputs["batched"], outputs["per_example"], strict=True)]))
    print(
        f"{n} prompts x {new} new tokens, fp32: batched {a:.2f} s, per-example generate {b:.2f} s (medians of {rounds})"
    )
    print(f"RESULT decoding_speedup {b / a:.2f} goal 5")
    print(f"RESULT decoding_agreement {agree:.3f} goal 1")
    frozen_base(args.model, queries, new, rounds)


def frozen_base(model: str, queries: list[ex.Query], new: int, rounds: int) -> None:
    """The evaluation's decoding as it runs (a LoRA explainer under bf16 autocast): the frozen base stored in bf16
    (`models.store_frozen_linears`) beside the base as loaded, in fp32, which autocast casts at every forward,
    once per new token. Same bits, so the explanations must be identical."""
    cfg = ExplainerConfig(model=ModelConfig(name=model))
    e = ex.Explainer(models.load(cfg.model), 576, 30, cfg)
    if e.lm.runtime.autocast is None:
        print("no autocast on this CPU: the frozen base is stored as loaded, nothing to compare")
        return
    linears = [m for block in models.decoder_layers(e.lm.model) for m in block.modules()
               if isinstance(m, torch.nn.Linear) and not m.weight.requires_grad]  # fmt: skip
    times: dict[str, list[float]] = {"stored_bf16": [], "as_loaded": []}
    outputs = {}
    for _ in range(rounds):
        for name, dtype in (("stored_bf16", e.lm.runtime.autocast), ("as_loaded", torch.float32)):
            for m in linears:
                m.to(dtype)
            t = time.perf_counter()
            outputs[name] = e.generate(queries, new, 32)
            times[name].append(time.perf_counter() - t)
    a, b = statistics.median(times["stored_bf16"]), statistics.median(times["as_loaded"])
    agree = float(np.mean([x == y for x, y in zip(outputs["stored_bf16"], outputs["as_loaded"], strict=True)]))
    print(f"LoRA explainer, bf16 autocast, {len(queries)} prompts: base stored bf16 {a:.2f} s, as loaded {b:.2f} s")
    print(f"RESULT decoding_frozen_base_speedup {b / a:.2f} goal -")
    print(f"RESULT decoding_frozen_base_agreement {agree:.3f} goal 1")


if __name__ == "__main__":
    main()
