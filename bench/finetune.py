"""Benchmark explainer fine-tuning: training tokens/s of our loop (left-padded length-grouped batches, logits
only over the answer columns) beside HF `Trainer` + PEFT on the same model, LoRA settings, data, batch size and
precision, in alternation (A B A B), medians compared; and model FLOP utilisation against a measured matmul
peak of this machine. Agreement: from the same weights, both paths compute the same float32 loss on one batch.

    .venv/bin/python bench/finetune.py [--quick]

Ends with `RESULT finetune_speedup <x> goal 1.3`, `RESULT finetune_mfu <fraction> goal -` and the loss agreement.
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
from tasks.explainer import train as training  # noqa: E402
from tasks.explainer.config import ExplainerConfig  # noqa: E402
from tasks.outcomes.answers import target  # noqa: E402
from tasks.patching.prompts import PATCHING_TEMPLATES  # noqa: E402


def queries(n: int, seed: int = 0) -> list[ex.Query]:
    """Patching-shaped examples: a long input text, a short answer sentence."""
    rng = np.random.default_rng(seed)
    words = "the capital of france is paris and the currency of spain is the euro answer".split()
    out = []
    for i in range(n):
        text = " ".join(rng.choice(words, size=int(rng.integers(40, 120))))
        q = PATCHING_TEMPLATES[i % 5].format(feature=ex.SPAN, layer="8, 9, 10", tokens="< Paris>", input=text)
        out.append(ex.Query(rng.normal(size=576).astype(np.float32), 8, q, target(bool(i % 2), " Rome")))
    return out


class HFWrapped(torch.nn.Module):
    """What a user hands to Trainer: the same explainer, right-padded batches, loss over all logits."""

    def __init__(self, e: ex.Explainer) -> None:
        super().__init__()
        self.e = e

    def forward(self, input_ids, attention_mask, labels, vectors, layers, n_payloads):
        with self.e.lm.runtime.autocast_context():
            embeds = self.e.inject(input_ids, vectors, layers, n_payloads)
            return self.e.model(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels)


def hf_collate(e: ex.Explainer, batch: list[ex.Query]) -> dict[str, torch.Tensor]:
    b = e.collate(batch, train=True)  # left-padded; re-pad to the right as a stock collator would
    ids, mask, labels = b["input_ids"], b["attention_mask"], b["labels"]
    right = torch.argsort(1 - mask, dim=1, stable=True)
    return {**b, "input_ids": ids.gather(1, right), "attention_mask": mask.gather(1, right),
            "labels": labels.gather(1, right)}  # fmt: skip


def run_ours(cfg: ExplainerConfig, data: list[ex.Query]) -> tuple[float, int]:
    e = ex.Explainer(models.load(cfg.model), 576, 30, cfg)
    t = time.perf_counter()
    training.train(e, data, [])
    return time.perf_counter() - t, sum(len(e.training_example(q)[0]) for q in data)


def run_hf(cfg: ExplainerConfig, data: list[ex.Query], tmp: str) -> tuple[float, int]:
    from transformers import Trainer, TrainingArguments

    e = ex.Explainer(models.load(cfg.model), 576, 30, cfg)
    args = TrainingArguments(output_dir=tmp, per_device_train_batch_size=cfg.batch_size, num_train_epochs=cfg.epochs,
                             learning_rate=cfg.lr, weight_decay=cfg.weight_decay, lr_scheduler_type="constant",
                             save_strategy="no", report_to=[], logging_strategy="no", use_cpu=True,
                             remove_unused_columns=False, dataloader_num_workers=0, disable_tqdm=True)  # fmt: skip
    trainer = Trainer(model=HFWrapped(e), args=args, train_dataset=data, data_collator=lambda b: hf_collate(e, b))
    t = time.perf_counter()
    trainer.train()
    return time.perf_counter() - t, sum(len(e.training_example(q)[0]) for q in data)


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


def main() -> None:
    import tempfile

    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    n, rounds = (64, 1) if args.quick else (160, 2)
    cfg = ExplainerConfig(model=ModelConfig(name="smollm2-135m-instruct"), lora_r=16, batch_size=16, epochs=1,
                          val_fraction=0.0)  # fmt: skip
    data = queries(n)
    # Agreement in float32: the two paths must compute the same loss on the same batch. (Under bf16 autocast the
    # left- and right-padded layouts round differently, about 1e-3 of the loss, which would hide a real bug.)
    fp32 = cfg.model_copy(update={"model": cfg.model.model_copy(update={"autocast": "none"})})
    e = ex.Explainer(models.load(fp32.model), 576, 30, fp32)
    with torch.no_grad():
        ours_loss = float(e.loss(e.collate(data[:16], train=True)))
        hf_loss = float(HFWrapped(e)(**hf_collate(e, data[:16])).loss)
    print(f"first-batch loss: ours {ours_loss:.5f}, HF path {hf_loss:.5f}")
    del e
    times = {"ours": [], "hf_trainer": []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(rounds):
            s, tokens = run_ours(cfg, data)
            times["ours"].append(s)
            s, _ = run_hf(cfg, data, tmp)
            times["hf_trainer"].append(s)
    a, b = statistics.median(times["ours"]), statistics.median(times["hf_trainer"])
    n_params = sum(p.numel() for p in models.load(cfg.model).model.parameters())
    peak = matmul_peak()
    mfu = tokens / a * 6 * n_params / peak
    print(f"{n} examples, {tokens} tokens, LoRA r16, batch 16: ours {tokens / a:.0f} tok/s, "
          f"HF Trainer + PEFT {tokens / b:.0f} tok/s (medians of {rounds}); matmul peak {peak / 1e12:.2f} TFLOP/s")  # fmt: skip
    print(f"RESULT finetune_speedup {b / a:.2f} goal 1.3")
    print(f"RESULT finetune_mfu {mfu:.3f} goal -")
    print(f"RESULT finetune_loss_agreement {abs(ours_loss - hf_loss):.2e} goal 1e-3")


if __name__ == "__main__":
    main()
