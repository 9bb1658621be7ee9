"""A measurement, not a timing: in which form can the self explainer learn to read an SAE feature direction
(issue 14)? For each form of the vector written into the residual stream after block ℓ, train the self
explainer on the same training features for the same steps, then measure on held-out *training-split*
features (a choice made on train, never on test) how much the vector lowers the label's loss:

  gain_shuffled   mean per-item answer-token loss with another item's vector (same layer) minus with its own
  gain_zero       the same with v = 0; both in nats per answer token, ± the paired SE over items

Forms (`vector_norm` under `injection: residual`): `match`, the unit direction at the prompt's median residual
norm (a bare direction, with none of the mean every real residual carries); `layer_mean:<c>`, the state
μ_ℓ + c σ_ℓ unit(v), the layer's mean residual plus v at c times a residual's own size (`inject_scale` c).

    .venv/bin/python bench/vector_forms.py -c <features recipe whose ground truth is built> \\
        [--forms match layer_mean:1] [--n-train 512] [--steps 64] [--batch-size 8]

Prints one row per form, a few greedy descriptions, and `RESULT vector_form_<form>_gain_shuffled <x>`.
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.common import models  # noqa: E402
from tasks.common.activations import activations_dataset  # noqa: E402
from tasks.common.config import load_recipe  # noqa: E402
from tasks.explainer import model as ex  # noqa: E402
from tasks.explainer import train as training  # noqa: E402
from tasks.explainer.projection import residual_stats  # noqa: E402
from tasks.features.config import FeaturesRecipe  # noqa: E402
from tasks.features.ground_truth import FeatureSet, check_recipe, ground_truth_key, load_feature_set  # noqa: E402
from tasks.features.prompts import feature_queries
from tasks.features.sae import layer_activations  # noqa: E402


def queries(fs: FeatureSet, idx: np.ndarray, vectors: np.ndarray, chat: bool) -> list[ex.Query]:
    return feature_queries(vectors[idx], fs.layer[idx], [fs.label[i] for i in idx], [str(i) for i in idx], chat, 0)


@torch.no_grad()
def item_losses(explainer: ex.Explainer, qs: list[ex.Query]) -> np.ndarray:
    """[n]: each query's mean answer-token cross-entropy, one query per forward (no padding effects)."""
    explainer.model.eval()
    return np.array([float(explainer.loss(explainer.collate([q], train=True))) for q in qs])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-c", "--config", required=True, help="features recipe (its ground truth must be built)")
    ap.add_argument("--role", default="self", help="explainer role of the recipe (must share the target's width)")
    ap.add_argument("--forms", nargs="+", default=["match", "layer_mean:0.5", "layer_mean:1", "layer_mean:2"])
    ap.add_argument("--n-train", type=int, default=512, help="training features")
    ap.add_argument("--n-val", type=int, default=120, help="held-out training-split features scored")
    ap.add_argument("--steps", type=int, default=64, help="optimizer steps per form")
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()

    recipe = load_recipe(FeaturesRecipe, args.config)
    plan = check_recipe(recipe)
    fs = load_feature_set(Path(plan.home), ground_truth_key(recipe, plan))
    train = fs.take(fs.split == "train")
    order = np.random.default_rng(123).permutation(len(train.layer))
    if args.n_train + args.n_val > len(order):
        sys.exit(f"--n-train + --n-val: at most {len(order)} training features")
    fit_idx, val_idx = order[: args.n_train], order[-args.n_val :]
    donors = np.asarray(ex.shuffled_donors([int(train.layer[i]) for i in val_idx], 7))
    stats = residual_stats({layer: layer_activations(activations_dataset(plan), layer)
                            for layer in recipe.cache.layers}, residual_inputs=False)  # fmt: skip
    target = models.load_config(recipe.target)
    print(f"{'form':16s} {'loss v':>7s} {'shuffled':>8s} {'zero':>7s} {'gain_shuffled':>15s} {'gain_zero':>15s}")
    for form in args.forms:
        norm, _, scale = form.partition(":")
        cfg = recipe.explainers[args.role].model_copy(update={
            "injection": "residual", "vector_norm": norm, "inject_scale": float(scale or 1.0),
            "batch_size": args.batch_size, "min_steps": args.steps, "max_steps": args.steps,
            "eval_every": args.steps, "patience": 0})  # fmt: skip
        explainer = ex.Explainer(models.load(cfg.model), target.hidden_size, target.num_hidden_layers, cfg)
        if explainer.on_manifold:
            explainer.set_layer_stats(stats)
        chat = explainer.chat
        training.train(
            explainer,
            queries(train, fit_idx, train.direction, chat),
            queries(train, val_idx[:16], train.direction, chat),
        )
        own = queries(train, val_idx, train.direction, chat)
        shuffled = [
            ex.Query(own[d].vector, q.layer, q.text, q.answer, q.example_id) for q, d in zip(own, donors, strict=True)
        ]
        zero = [ex.Query(np.zeros_like(q.vector), q.layer, q.text, q.answer, q.example_id) for q in own]
        loss_v, loss_s, loss_z = (item_losses(explainer, qs) for qs in (own, shuffled, zero))
        gs, gz = loss_s - loss_v, loss_z - loss_v
        se = lambda d: d.std(ddof=1) / len(d) ** 0.5  # noqa: E731
        print(f"{form:16s} {loss_v.mean():7.3f} {loss_s.mean():8.3f} {loss_z.mean():7.3f} "
              f"{gs.mean():7.3f} ± {se(gs):.3f} {gz.mean():7.3f} ± {se(gz):.3f}", flush=True)  # fmt: skip
        decoded = explainer.generate(own[:40], 24, 16)
        print(f"  {len(set(decoded))} distinct of {len(decoded)}; e.g.",
              "; ".join(f"{q.answer} -> {d}" for q, d in list(zip(own, decoded, strict=True))[:3]))  # fmt: skip
        print(f"RESULT vector_form_{form.replace(':', '_')}_gain_shuffled {gs.mean():.4f}")
        del explainer


if __name__ == "__main__":
    main()
