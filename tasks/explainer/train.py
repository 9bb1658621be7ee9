"""The continuous-token explainer's training loop: a step budget (min/max steps, epochs from n_train), validation
every K steps with patience, learning rates per parameter group, resumable state, and the checkpoint it ends in
(docs/METHOD.md §3.1-§3.4 for the loss)."""

import os
import random
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import torch

from storage.errors import UserInputError
from storage.store import Dataset
from tasks.common import models
from tasks.explainer.config import ExplainerConfig
from tasks.explainer.model import Explainer, Query

if TYPE_CHECKING:
    from tasks.explainer.projection import LayerStats, ProjectionFit


@dataclass
class TrainResult:
    """What a training run did, for the `runs`/`metrics` tables; the losses are per validation point."""

    steps: int
    epochs_run: int
    best_step: int
    val_steps: list[int]  # the step of each validation point
    train_loss: list[float]
    val_loss: list[float]
    tokens_per_s: float


def batches(items: Sequence[Query], size: int, rng: random.Random) -> Iterator[list[Query]]:
    """Length-grouped batches in a seeded order: shuffle, sort within windows of 50 batches, shuffle batches."""
    order = list(range(len(items)))
    rng.shuffle(order)
    window = size * 50
    out = []
    for w in range(0, len(order), window):
        chunk = sorted(order[w : w + window], key=lambda i: len(items[i].text) + len(items[i].answer or ""))
        out += [chunk[i : i + size] for i in range(0, len(chunk), size)]
    rng.shuffle(out)
    for b in out:
        yield [items[i] for i in b]


def step_budget(cfg: ExplainerConfig, n_train: int) -> tuple[int, int]:
    """(optimizer steps, steps between validations) for `n_train` examples: `epochs` passes, raised to
    `min_steps` (a small training set gets more epochs) and capped at `max_steps`."""
    per_epoch = -(-n_train // cfg.batch_size)
    total = max(cfg.epochs * per_epoch, cfg.min_steps)
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    return total, cfg.eval_every or per_epoch


def train(
    explainer: Explainer,
    train_set: Sequence[Query],
    val_set: Sequence[Query],
    progress=None,
    state_path: Path | None = None,
    steps: int | None = None,
) -> TrainResult:
    """AdamW at a constant LR for `step_budget` steps; validation every `eval_every` steps (each epoch by
    default). Once past `min_steps`, `patience` validations in a row without a new best stop the run; the
    weights of the best validation are kept. `steps`: exactly that many steps instead, with no validation
    before the last (the readout warm-up, which keeps its final weights).

    With `state_path`, the loop saves its whole state at every validation (trainable weights, optimiser, the
    data order of the current epoch and the torch RNG, losses, the best weights) and a restarted run resumes
    from there: a killed run repeats at most `eval_every` steps, and reaches the same weights as an
    uninterrupted one.
    """
    cfg = explainer.cfg
    if not train_set:
        raise UserInputError("explainer", "no training examples", "give the stage more ground truth")
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    total, eval_every = (steps, steps) if steps else step_budget(cfg, len(train_set))
    min_steps = steps or cfg.min_steps
    proj = [p for p in ([explainer.proj] if explainer.proj is not None else []) if p.requires_grad]
    rest = [p for p in explainer.parameters() if p.requires_grad and all(p is not q for q in proj)]
    groups = [{"params": rest}] + ([{"params": proj, "lr": cfg.proj_lr or cfg.lr}] if proj else [])
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    log: dict[str, Any] = {"epoch": 0, "epoch_step": 0, "epoch_rng": rng.getstate(), "train_losses": [],
                           "train_steps": [], "val_losses": [], "best": float("inf"), "best_step": 0, "best_state": None, "steps": 0,
                           "n_tokens": 0, "since_best": 0, "stopped": False, "running": 0.0}  # fmt: skip
    if state_path is not None and state_path.exists():
        saved = torch.load(state_path, weights_only=False)
        explainer.load_state_dict({**explainer.state_dict(), **saved["weights"]})
        opt.load_state_dict(saved["optimizer"])
        torch.set_rng_state(saved["torch_rng"])
        log = saved["log"]
    kernel = cfg.train_attention  # eager on CPU by default: see the field
    if kernel == "auto":
        kernel = "eager" if explainer.lm.runtime.device.type == "cpu" else None
    with models.attention(explainer.lm.model, kernel):
        t0 = time.perf_counter()
        explainer.model.train()
        while log["steps"] < total and not log["stopped"]:
            rng.setstate(log["epoch_rng"])  # the epoch's order, drawn again: a resumed run continues it
            epoch = list(batches(train_set, cfg.batch_size, rng))
            for qs in epoch[log["epoch_step"] :]:
                batch = explainer.collate(qs, train=True)
                loss = explainer.loss(batch)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                log["running"] += loss.item()
                log["steps"] += 1
                log["epoch_step"] += 1
                log["n_tokens"] += int(batch["attention_mask"].sum())
                if progress:
                    progress(log["steps"] / total, f"epoch {log['epoch']} step {log['steps']} loss {loss.item():.3f}")
                if log["epoch_step"] == len(epoch):  # the next epoch's order starts from here
                    log["epoch"], log["epoch_step"], log["epoch_rng"] = log["epoch"] + 1, 0, rng.getstate()
                if log["steps"] % eval_every == 0 or log["steps"] == total:
                    _validate(explainer, val_set, log, min_steps, cfg.patience)
                    if state_path is not None:
                        _save_train_state(state_path, explainer, opt, log)
                    explainer.model.train()
                if log["steps"] == total or log["stopped"] or log["epoch_step"] == 0:
                    break
    if log["best_state"] is not None:
        explainer.load_state_dict({**explainer.state_dict(), **log["best_state"]})
    explainer.model.eval()
    epochs_run = log["epoch"] + (log["epoch_step"] > 0)
    return TrainResult(log["steps"], epochs_run, log["best_step"], log["train_steps"], log["train_losses"],
                       log["val_losses"],
                       log["n_tokens"] / max(time.perf_counter() - t0, 1e-9))  # fmt: skip


def _validate(explainer: Explainer, val_set: Sequence[Query], log: dict[str, Any], min_steps: int,
              patience: int) -> None:  # fmt: skip
    """One validation point: record the losses, keep the best weights, decide whether to stop."""
    since = log["steps"] - (log["train_steps"][-1] if log["train_steps"] else 0)
    log["train_steps"].append(log["steps"])
    log["train_losses"].append(log["running"] / max(since, 1))
    log["running"] = 0.0
    val = evaluate_loss(explainer, val_set) if val_set else log["train_losses"][-1]
    log["val_losses"].append(val)
    if val < log["best"]:
        log["best"], log["best_step"], log["since_best"] = val, log["steps"], 0
        log["best_state"] = _trainable_weights(explainer)
    elif val_set:
        log["since_best"] += 1
        log["stopped"] = log["steps"] >= min_steps and log["since_best"] > patience


def _save_train_state(path: Path, explainer: Explainer, opt: torch.optim.Optimizer, log: dict[str, Any]) -> None:
    weights = _trainable_weights(explainer)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save({"weights": weights, "optimizer": opt.state_dict(), "torch_rng": torch.get_rng_state(), "log": log},
               tmp)  # fmt: skip
    tmp.replace(path)


def _trainable_weights(explainer: Explainer) -> dict[str, torch.Tensor]:
    """A copy of the weights training changes, by state-dict key."""
    trainable = {name for name, p in explainer.named_parameters() if p.requires_grad}
    return {k: v.detach().clone() for k, v in explainer.state_dict().items() if k in trainable}


@torch.no_grad()
def evaluate_loss(explainer: Explainer, queries: Sequence[Query], batch_size: int = 32) -> float:
    """Mean answer-token cross-entropy over `queries`, token-weighted."""
    explainer.model.eval()
    total, count = 0.0, 0
    for start in range(0, len(queries), batch_size):
        batch = explainer.collate(queries[start : start + batch_size], train=True)
        n = int((batch["labels"][:, 1:] != -100).sum())
        total += float(explainer.loss(batch)) * n
        count += n
    return total / max(count, 1)


def warm_up(
    explainer: Explainer,
    readout: Callable[["Explainer", int], Sequence[Query]],
    out: Dataset | None = None,
    progress=None,
) -> float:
    """The readout warm-up: `readout_steps` steps on `readout(explainer, readout_steps × batch_size)`, one pass.
    With `out`, its trainable weights are read from there when a run already wrote them (under the dataset's
    lock: a second writer waits, then reads), else written there. Returns the warm-up's last training loss."""
    cfg = explainer.cfg
    if out is None:
        return train(explainer, readout(explainer, cfg.readout_steps * cfg.batch_size), [], progress,
                     steps=cfg.readout_steps).train_loss[-1]  # fmt: skip
    with out.lock():
        if not out.complete_or_invalidate():
            out.create({"stage": "readout", "config": cfg.model_dump()})
            loss = warm_up(explainer, readout, None, progress)
            aside = out.path / f".weights.tmp-{os.getpid()}"
            torch.save(_trainable_weights(explainer), aside)
            aside.replace(out.path / "weights.pt")
            out.mark_complete({"readout_steps": cfg.readout_steps, "readout_loss": loss})
            return loss
    explainer.load_state_dict({**explainer.state_dict(), **torch.load(out.path / "weights.pt", weights_only=True)})
    return out.summary()["readout_loss"]


def train_to_checkpoint(
    out: Dataset,
    cfg: ExplainerConfig,
    d_target: int | None,
    n_target_layers: int,
    make_queries: Callable[["Explainer"], Sequence[Query]],
    meta: dict[str, Any],
    progress=None,
    rotation_seed: int | None = None,
    fit: Callable[["Explainer"], "ProjectionFit"] | None = None,
    stats: Callable[[], "LayerStats"] | None = None,
    readout: Callable[["Explainer", int], Sequence[Query]] | None = None,
    readout_out: Dataset | None = None,
) -> dict[str, Any]:
    """Train an explainer of a target (width d_target) on `make_queries(explainer)` (a seeded `val_fraction`
    held out for early stopping); write its checkpoint and loss history under `out`; mark it complete.
    rotation_seed: the rotated-basis control (see Explainer). fit: under projection 'fitted', the fitted Π
    of this explainer (tasks/explainer/projection.py), installed before training. stats: under vector_norm 'layer_mean',
    the target's residual statistics (tasks/explainer/projection.py), saved with the checkpoint. readout: under
    `readout_steps`, `readout(explainer, n)` gives the warm-up's n queries, trained on once each before the run
    (skipped when the run resumes: its saved weights already hold the warm-up). readout_out: where the warm-up's
    weights are kept (`warm_up`), so every n_train of a grid starts from the one warm-up it shares."""
    explainer = Explainer(models.load(cfg.model), d_target, n_target_layers, cfg, rotation_seed)
    if explainer.fitted:
        if fit is None:
            raise ValueError("projection 'fitted' needs the stage to fit Π: this stage has no activation cache")
        fitted = fit(explainer)
        explainer.set_fitted_projection(fitted)
        meta = {**meta, "fit_pairs": {str(k): v for k, v in fitted.n_pairs.items()}}
    if explainer.on_manifold:
        if stats is None:
            raise ValueError(
                "vector_norm 'layer_mean' needs the stage's residual statistics: it has no activation cache"
            )
        explainer.set_layer_stats(stats())
    queries = make_queries(explainer)
    order = np.random.default_rng(cfg.seed).permutation(len(queries))
    n_val = int(round(cfg.val_fraction * len(queries)))
    out.create({"stage": "explainer", "config": cfg.model_dump(), **meta})
    state = out.path / "_train_state.pt"  # resume point at each validation; removed once the checkpoint is written
    if readout is not None and cfg.readout_steps:
        meta = {**meta, "readout_steps": cfg.readout_steps}
        if not state.exists():
            meta = {**meta, "readout_loss": warm_up(explainer, readout, readout_out, progress)}
    result = train(explainer, [queries[i] for i in order[n_val:]], [queries[i] for i in order[:n_val]], progress,
                   state)  # fmt: skip
    # Written aside, then moved into place: a save killed midway (the tokenizer and safetensors writers leave
    # their own temp files) leaves only the aside folder, which the next run's `out.create` sweeps.
    aside = out.path / f".checkpoint.tmp-{os.getpid()}"
    explainer.save(aside, {**meta, "n_train": len(queries), "steps": result.steps, "best_step": result.best_step})
    shutil.rmtree(out.path / "checkpoint", ignore_errors=True)
    aside.rename(out.path / "checkpoint")
    n = len(result.val_steps)
    out.write_shard(0, pa.table({"role": [meta.get("role", "")] * n, "explainer_model": [cfg.model.name] * n,
                                 "step": result.val_steps, "train_loss": result.train_loss,
                                 "val_loss": result.val_loss}))  # fmt: skip
    summary = {**meta, "n_train": len(queries), "best_step": result.best_step, "steps": result.steps,
               "epochs": result.epochs_run, "tokens_per_s": result.tokens_per_s, "model": cfg.model.name}  # fmt: skip
    out.mark_complete(summary)
    state.unlink(missing_ok=True)
    return summary
