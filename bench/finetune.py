"""Benchmark explainer fine-tuning: training tokens/s of our loop beside the loop as it was and beside HF
`Trainer` + PEFT, on the same model, LoRA settings, data, batch size and precision, in alternation (A B C A B C),
medians compared; model FLOP utilisation against this machine's measured bf16 matmul peak; and the same for full
fine-tuning. Two shapes of data: the features task's (chat prompts of about 50 tokens, a short label: the
features recipe's explainer) and the patching task's (a long input text, a short answer sentence).

Paths: `ours` is the loop as it runs (the frozen base's linears stored in bf16, `models.store_frozen_linears`;
eager attention in training, `ExplainerConfig.train_attention`); `before` is the same loop with the model as
loaded (fp32 weights that autocast casts at every call) and SDPA attention; `hf_trainer` wraps the same explainer,
with the model as loaded, in a stock Trainer (right padding, loss over all logits).

Agreement: from the same weights, ours and the HF path compute the same float32 loss on one batch, and so do eager
and SDPA attention; beside them, how far the bf16 loss curves of `ours` and `before` (one loss per step) drift
apart (the rounding of two kernels, compounded over the steps).

    .venv/bin/python bench/finetune.py [--quick]

Ends with `RESULT` lines: features tokens/s (goal 900), ours / before, ours / HF Trainer (goal 1.3), MFU (goal
0.4), the full fine-tuning figures, and the two agreement checks.
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.common import models  # noqa: E402
from tasks.common.config import ModelConfig  # noqa: E402
from tasks.explainer import model as ex  # noqa: E402
from tasks.explainer import train as training  # noqa: E402
from tasks.explainer.config import ExplainerConfig  # noqa: E402
from tasks.features.prompts import feature_queries  # noqa: E402
from tasks.outcomes.answers import target  # noqa: E402
from tasks.patching.prompts import PATCHING_TEMPLATES  # noqa: E402

D_TARGET, N_LAYERS = 576, 30  # SmolLM2-135M's residual width and depth: the self explainer's target


def features_data(n: int, seed: int = 0) -> list[ex.Query]:
    """Features-shaped examples: a chat template around the placeholder, a token-list label."""
    rng = np.random.default_rng(seed)
    words = "print def return import class self lambda yield the an of for while with None True".split()
    labels = ["the tokens " + ", ".join(f'"{w}"' for w in rng.choice(words, int(rng.integers(1, 4)))) for _ in range(n)]
    layers = [int(x) for x in rng.choice([3, 9, 15, 21], n)]
    vectors = rng.normal(size=(n, D_TARGET)).astype(np.float32)
    return feature_queries(vectors, layers, labels, [str(i) for i in range(n)], chat=True, seed=seed)


def patching_data(n: int, seed: int = 0) -> list[ex.Query]:
    """Patching-shaped examples: a long input text, a short answer sentence."""
    rng = np.random.default_rng(seed)
    words = "the capital of france is paris and the currency of spain is the euro answer".split()
    out = []
    for i in range(n):
        text = " ".join(rng.choice(words, size=int(rng.integers(40, 120))))
        q = PATCHING_TEMPLATES[i % 5].format(feature=ex.SPAN, layer="8, 9, 10", tokens="< Paris>", input=text)
        out.append(ex.Query(rng.normal(size=D_TARGET).astype(np.float32), 8, q, target(bool(i % 2), " Rome")))
    return out


def as_loaded(e: ex.Explainer) -> ex.Explainer:
    """The explainer with its base as a stock PEFT user has it: fp32 linears, cast by autocast at every call."""
    for m in e.lm.model.modules():
        if isinstance(m, torch.nn.Linear):
            m.float()
    return e


class HFWrapped(torch.nn.Module):
    """What a user hands to Trainer: the same explainer, right-padded batches, loss over all logits."""

    def __init__(self, e: ex.Explainer) -> None:
        super().__init__()
        self.e = e

    def forward(self, input_ids, attention_mask, labels, vectors, layers, n_payloads):
        with self.e.lm.runtime.autocast_context(), self.e.injecting(input_ids, attention_mask, vectors, layers):
            embeds = self.e.inject(input_ids, vectors, layers, n_payloads)
            return self.e.model(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels)


def hf_collate(e: ex.Explainer, batch: list[ex.Query]) -> dict[str, torch.Tensor]:
    b = e.collate(batch, train=True)  # left-padded; re-pad to the right as a stock collator would
    ids, mask, labels = b["input_ids"], b["attention_mask"], b["labels"]
    right = torch.argsort(1 - mask, dim=1, stable=True)
    return {**b, "input_ids": ids.gather(1, right), "attention_mask": mask.gather(1, right),
            "labels": labels.gather(1, right)}  # fmt: skip


def run(path: str, cfg: ExplainerConfig, data: list[ex.Query], tmp: str) -> tuple[float, list[float]]:
    """Seconds to train one pass over `data` on `path`, and the per-step losses where the path reports them."""
    if path == "before":
        cfg = cfg.model_copy(update={"train_attention": "sdpa"})
    e = ex.Explainer(models.load(cfg.model), D_TARGET, N_LAYERS, cfg)
    if path in ("before", "hf_trainer"):
        as_loaded(e)
    if path == "hf_trainer":
        from transformers import Trainer, TrainingArguments

        args = TrainingArguments(output_dir=tmp, per_device_train_batch_size=cfg.batch_size, num_train_epochs=1,
                                 learning_rate=cfg.lr, weight_decay=cfg.weight_decay, lr_scheduler_type="constant",
                                 save_strategy="no", report_to=[], logging_strategy="no", use_cpu=True,
                                 remove_unused_columns=False, dataloader_num_workers=0, disable_tqdm=True)  # fmt: skip
        trainer = Trainer(model=HFWrapped(e), args=args, train_dataset=data, data_collator=lambda b: hf_collate(e, b))
        t = time.perf_counter()
        trainer.train()
        return time.perf_counter() - t, []
    t = time.perf_counter()
    result = training.train(e, data, [])
    return time.perf_counter() - t, result.train_loss


def matmul_peak(dtype: torch.dtype = torch.bfloat16, n: int = 2048) -> float:
    """FLOP/s of a large square matmul under the runtime's precision (the machine's practical peak)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    t = time.perf_counter()
    reps = 10
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t)


def loss_agreement(cfg: ExplainerConfig, data: list[ex.Query]) -> tuple[float, float]:
    """In float32, on the first batch: |ours − HF path| of the loss, and |eager − SDPA| (the training kernel
    against the model's own). Under bf16 autocast the padding layouts and the kernels round differently, about
    1e-3 of the loss, which would hide a real bug."""
    fp32 = cfg.model_copy(update={"model": cfg.model.model_copy(update={"autocast": "none"})})
    e = ex.Explainer(models.load(fp32.model), D_TARGET, N_LAYERS, fp32)
    with torch.no_grad():
        ours = float(e.loss(e.collate(data[:16], train=True)))
        hf = float(HFWrapped(e)(**hf_collate(e, data[:16])).loss)
        with models.attention(e.lm.model, "eager"):
            eager = float(e.loss(e.collate(data[:16], train=True)))
    print(f"first-batch loss in float32: ours {ours:.6f}, HF path {hf:.6f}, ours with eager attention {eager:.6f}")
    return abs(ours - hf), abs(eager - ours)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, help="alternating rounds (default 2, 1 with --quick)")
    ap.add_argument("--cases", nargs="+", choices=["features", "patching", "full"], help="default: all three")
    args = ap.parse_args()
    n_features, n_patching, rounds = (48, 32, 1) if args.quick else (160, 96, 2)
    rounds = args.rounds or rounds
    lora = ExplainerConfig(model=ModelConfig(name="smollm2-135m-instruct"), format="chat", injection="residual",
                           lora_r=16, lora_alpha=32, lr=1e-3, batch_size=16, epochs=1, eval_every=1,
                           val_fraction=0.0)  # fmt: skip
    full = lora.model_copy(update={"finetune": "full", "lr": 1e-5, "eval_every": None})
    cases = {  # name -> (config, data, paths)
        "features": (lora, features_data(n_features), ("ours", "before", "hf_trainer")),
        "patching": (lora.model_copy(update={"format": "auto"}), patching_data(n_patching), ("ours", "hf_trainer")),
        "full": (full, features_data(n_features), ("ours", "hf_trainer")),
    }
    cases = {name: case for name, case in cases.items() if name in (args.cases or cases)}
    agreement, kernels = loss_agreement(lora, features_data(n_features))
    peak = matmul_peak()
    n_params = sum(p.numel() for p in models.load(lora.model).model.parameters())
    times: dict[tuple[str, str], list[float]] = {}
    curves: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(rounds):
            for case, (cfg, data, paths) in cases.items():
                for path in paths:
                    s, losses = run(path, cfg, data, tmp)
                    times.setdefault((case, path), []).append(s)
                    if case == "features" and losses:
                        curves[path] = losses
    tps = {}
    for case, (cfg, data, paths) in cases.items():
        e = ex.Explainer(models.load(cfg.model), D_TARGET, N_LAYERS, cfg.model_copy(update={"finetune": "full"}))
        tokens = sum(len(e.training_example(q)[0]) for q in data)
        for path in paths:
            tps[case, path] = tokens / statistics.median(times[case, path])
        print(f"{case}: {len(data)} examples, {tokens} tokens, batch 16: " + ", ".join(
            f"{path} {tps[case, path]:.0f} tok/s" for path in paths) + f" (medians of {rounds})")  # fmt: skip
    mfu = {case: tps[case, "ours"] * 6 * n_params / peak for case in cases}
    print(f"bf16 matmul peak {peak / 1e12:.3f} TFLOP/s; {n_params / 1e6:.1f}M parameters; MFU = 6 N tokens/s / peak"
          f" (LoRA's backward skips the frozen weights' gradients: its FLOPs are nearer 4 N, so x 2/3 for "
          f"hardware utilisation)")  # fmt: skip
    if "features" in cases:
        curve = max(abs(a - b) / abs(b) for a, b in zip(curves["ours"], curves["before"], strict=True))
        print(f"RESULT finetune_features_tokens_per_s {tps['features', 'ours']:.0f} goal 900")
        print(f"RESULT finetune_features_vs_before {tps['features', 'ours'] / tps['features', 'before']:.2f} goal -")
        print(f"RESULT finetune_features_vs_hf {tps['features', 'ours'] / tps['features', 'hf_trainer']:.2f} goal 1.3")
        print(f"RESULT finetune_mfu {mfu['features']:.3f} goal 0.4")
        print(f"RESULT finetune_curve_rel_diff {curve:.2e} goal -")
    if "patching" in cases:
        print(f"RESULT finetune_speedup {tps['patching', 'ours'] / tps['patching', 'hf_trainer']:.2f} goal 1.3")
        print(f"RESULT finetune_patching_mfu {mfu['patching']:.3f} goal 0.4")
    if "full" in cases:
        print(f"RESULT finetune_full_vs_hf {tps['full', 'ours'] / tps['full', 'hf_trainer']:.2f} goal 1.3")
        print(f"RESULT finetune_full_mfu {mfu['full']:.3f} goal 0.4")
    print(f"RESULT finetune_loss_agreement {agreement:.2e} goal 1e-3")
    print(f"RESULT finetune_kernel_agreement {kernels:.2e} goal 1e-4")


if __name__ == "__main__":
    main()
