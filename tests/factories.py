"""Factories the tests share: tiny recipes of every flow, a tiny explainer, a checkpoint record, the paper's
features archive written from its schema. One module, so no test module imports another."""

import json
import pickle
from pathlib import Path

import numpy as np

from storage.store import Dataset
from tasks.ablation.config import AblationRecipe
from tasks.common import models
from tasks.common.config import CacheConfig, CacheRecipe, CorpusConfig, ModelConfig
from tasks.experiment.config import ExperimentRecipe
from tasks.explainer import explain
from tasks.explainer.config import ExplainerConfig
from tasks.explainer.model import SPAN, Explainer, Query
from tasks.explainer.projection import LayerStats
from tasks.features.config import FeaturesRecipe
from tasks.patching.config import PatchingRecipe

TARGET = ModelConfig(name="tiny-llama", autocast="none")
MU = {1: np.full(64, 0.5, dtype=np.float32), 3: np.linspace(-1, 1, 64, dtype=np.float32)}  # μ_ℓ of the "cache"
TINY = {"autocast": "none"}


def tiny_explainers() -> dict[str, ExplainerConfig]:
    return {
        "self": ExplainerConfig(model=ModelConfig(name="tiny-llama", **TINY), finetune="full", epochs=1,
                                max_new_tokens=6, batch_size=8),
        "other": ExplainerConfig(model=ModelConfig(name="tiny-gemma3", **TINY), format="base", epochs=1, lora_r=4,
                                 max_new_tokens=6, batch_size=8),
    }  # fmt: skip


PROSE = (
    "The quick brown fox jumps over the lazy dog. Residual streams carry information between layers. "
    "A sparse autoencoder decomposes activations into features. Paris is the capital of France. "
)


def make_recipe(home: Path, source: Path | str, **sections: dict) -> CacheRecipe:
    """A cache recipe on tiny-llama (4 layers, d=64) over `corpus`; `sections` override fields per section."""
    model = {"name": "tiny-llama", "autocast": "none", **sections.get("model", {})}
    corpus_cfg = {"source": str(source), "n_tokens": 2048, "context_length": 32, **sections.get("corpus", {})}
    cache = {"layers": [1, 3], "batch_size": 4, "contexts_per_shard": 16, **sections.get("cache", {})}
    return CacheRecipe(
        home=str(home), model=ModelConfig(**model), corpus=CorpusConfig(**corpus_cfg), cache=CacheConfig(**cache)
    )


ASKED = {"explain": {"text": "Paris", "layer": 3}}  # the least a recipe without usable defaults needs


def make_explainer(name="tiny-llama", d_target=64, n_layers=4, rotation_seed=None, **cfg) -> Explainer:
    """An explainer on a tiny model; fp32 reference precision so comparisons are exact."""
    settings = {"model": ModelConfig(name=name, autocast="none"), "finetune": "full", "vector_norm": "raw", **cfg}
    config = ExplainerConfig(**settings)
    return Explainer(models.load(config.model), d_target, n_layers, config, rotation_seed)


def batch(ex: Explainer, vectors: np.ndarray, text: str = f"What does {SPAN} encode at layer 2?"):
    queries = [Query(v.astype(np.float32), 2, text) for v in vectors]
    return ex.collate(queries, train=False)


def save_checkpoint(store, key: str, role: str = "self", completed_at: float = 1.0, **meta) -> explain.Checkpoint:
    """A features explainer checkpoint (untrained tiny-llama, layer_mean at layers 1 and 3) in `store`."""
    e = make_explainer(injection="residual", vector_norm="layer_mean", max_new_tokens=3)
    e.set_layer_stats(LayerStats(MU, {1: 2.0, 3: 2.0}, {ell: np.zeros(64, dtype=np.float32) for ell in MU}))
    ds = Dataset(store, "explainers", key)
    ds.create({"stage": "explainer"})
    record = {"role": role, "gt": "g0", "task": "features", "target": TARGET.model_dump(), "layers": [1, 3], **meta}
    e.save(ds.path / "checkpoint", record)
    (ds.path / "_COMPLETE.json").write_text(json.dumps({"completed_at": completed_at}))
    return explain.Checkpoint(
        key, ds.path / "checkpoint", json.loads((ds.path / "checkpoint" / "explainer.json").read_text())
    )


def write_feature_archive(folder, directions: dict[int, np.ndarray], labels: dict[str, list[tuple]]) -> None:
    """The released features archive's layout: features/layer_{L}.pkl ([d x n]); per split the explanations
    (((layer, idx), label dict)) and the (layer, idx) list."""
    (folder / "features").mkdir(parents=True)
    (folder / "explanations").mkdir()
    for layer, v in directions.items():  # v: [n, d]
        (folder / "features" / f"layer_{layer}.pkl").write_bytes(pickle.dumps(np.ascontiguousarray(v.T)))
    for split, rows in labels.items():
        entries = [((layer, idx), {"chosen_label": label, "all_labels": [label, "other"],
                                   "all_label_scores": [0.9, 0.1], "context": ["some", "tokens"]})
                   for layer, idx, label in rows]  # fmt: skip
        (folder / "explanations" / f"{split}_explanations.pkl").write_bytes(pickle.dumps(entries))
        idxs = [(layer, idx) for layer, idx, _ in rows]
        (folder / "explanations" / f"{split}_layer_feature_idxs.pkl").write_bytes(pickle.dumps(idxs))


class Payload:
    """What an attacker's pickle carries: a __reduce__ that calls a function at load time."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def tiny_features_recipe(home: Path, corpus: Path) -> FeaturesRecipe:
    tiny = {"autocast": "none"}
    return FeaturesRecipe.model_validate(
        {
            "home": str(home),
            "target": {"name": "tiny-llama", **tiny},
            "corpus": {"source": str(corpus), "n_tokens": 12000, "context_length": 64},
            "cache": {"layers": [1, 3], "contexts_per_shard": 64},
            "sae": {"expansion": 4, "k": 4, "epochs": 2, "batch_tokens": 512, "min_exemplars": 5},
            "explainers": {
                "self": ExplainerConfig(model=ModelConfig(name="tiny-llama", **tiny), finetune="full", epochs=1),
                "other": ExplainerConfig(
                    model=ModelConfig(name="tiny-gemma3", **tiny), format="base", epochs=1, lora_r=4
                ),
            },
            "eval": {
                "test_per_layer": 4,
                "n_train": 30,
                "ood_act_per_layer": 2,
                "delta_act_per_layer": 2,
                "judge": "tiny-llama",
                "simulator": "tiny-llama",
                "selfie_scales": [1, 10],
                "prompt_omissions": ["no_activation", "no_layer"],
                "rotated_basis_roles": ["self"],
            },
        }
    )


def tiny_patching_recipe(home) -> PatchingRecipe:
    return PatchingRecipe(
        home=str(home),
        target=ModelConfig(name="tiny-llama", **TINY),
        patching={"n_pairs": 6, "positions_per_pair": 6, "n_chunks": 2, "cell_cap": 50, "pairs_per_shard": 3},
        explainers={
            **tiny_explainers(),
            "self": tiny_explainers()["self"].model_copy(update={"injection": "residual", "vector_norm": "layer_mean"}),
            "other": tiny_explainers()["other"].model_copy(update={"projection": "fitted"}),
        },  # the shipped explainers' forms
        eval={"n_train": 24, "n_test": 10, "max_prompt_tokens": 4000, "rotated_basis_roles": ["self"]},
    )


def tiny_ablation_recipe(home) -> AblationRecipe:
    return AblationRecipe(
        home=str(home),
        target=ModelConfig(name="tiny-llama", **TINY),
        ablation={"n_questions": 30, "batch_size": 8},
        explainers=tiny_explainers(),
        eval={"n_train": 16, "n_test": 8, "prompt_omissions": [], "max_prompt_tokens": 4000},
    )


def tiny_experiment(tmp_path, corpus) -> ExperimentRecipe:
    store = tmp_path / "store"
    features = tiny_features_recipe(store, corpus)
    features = features.model_copy(
        update={
            "eval": features.eval.model_copy(update={"judge": None, "simulator": "lexical", "prompt_omissions": []})
        }
    )
    return ExperimentRecipe(
        home=str(store),
        target=ModelConfig(name="tiny-llama", autocast="none"),
        grid={"n_train": [4, 12], "seeds": [0]},
        features=features,
        patching=tiny_patching_recipe(store),
        ablation=tiny_ablation_recipe(store),
    )
