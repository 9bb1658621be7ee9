"""Importers for the paper's public datasets (paper §4.4, §5.2), from local Parquet / JSON(L) /
save_to_disk folders, into our `patching_gt` and `ablation_gt` row formats, so a user who has them trains on
them unchanged.

act_patch (Transluce/act_patch_*): layer, input_tokens, original_continuation, ablated_continuation,
is_different, patch_position{orig_pos, orig_text_token, counterfact_pos, counterfact_text_token,
intervention_vector}, counterfactual_text, gt_original_target, gt_counterfactual_target, token_type.
input_ablation (Transluce/input_ablation_*): index, question, choices, correct_answer, zeroshot_prediction,
random_hint_prediction, hint, system_prompt, original_user_prompt, hint_user_prompt, original_prompt_full,
hint_prompt_full, changed_pred_bc_hint (null in about a quarter of rows: derived from the two predictions).
The features archive (pickles): features/layer_{L}.pkl, a [d x n_features] matrix; explanations/
{split}_explanations.pkl, a list of ((layer, idx), {chosen_label, all_labels, all_label_scores, context});
explanations/{split}_layer_feature_idxs.pkl, the (layer, idx) of the split.
"""

import json
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from storage.errors import UserInputError
from storage.hashing import config_hash, file_sha256
from storage.store import Dataset

IMPORT_VERSION = 1

ACT_PATCH_REQUIRED = ("layer", "input_tokens", "original_continuation", "ablated_continuation", "is_different")
ABLATION_REQUIRED = ("question", "choices", "zeroshot_prediction", "random_hint_prediction", "hint_user_prompt")


def read_rows(path: str | Path, field: str) -> list[dict[str, Any]]:
    """Rows of a .parquet, .json (a list), .jsonl file, or a datasets save_to_disk folder (split train)."""
    p = Path(path)
    if not p.exists():
        raise UserInputError(field, f"{p} does not exist", "point it at a .parquet/.json/.jsonl file or a folder")
    if p.is_dir():
        import datasets

        ds = datasets.load_from_disk(str(p))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else ds[sorted(ds)[0]]
        return ds.to_list()
    if p.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(p).to_pylist()
    text = p.read_text(encoding="utf-8")
    try:
        return json.loads(text) if p.suffix == ".json" else [json.loads(x) for x in text.splitlines() if x.strip()]
    except json.JSONDecodeError as exc:
        raise UserInputError(field, f"{p} is not valid JSON ({exc.msg}, line {exc.lineno})", "fix the file") from None


def _require(rows: list[dict[str, Any]], columns: tuple[str, ...], field: str, path: str | Path) -> None:
    if not rows:
        raise UserInputError(field, f"{path} holds no rows", "give a non-empty file")
    missing = [c for c in columns if c not in rows[0]]
    if missing:
        raise UserInputError(field, f"{path} lacks column(s) {', '.join(missing)}", "use the public schema")


def import_act_patch(path: str | Path, split: str = "train") -> list[dict[str, Any]]:
    """Public activation-patching rows as `patching_gt` rows (input text detokenised from input_tokens)."""
    rows = read_rows(path, "import.act_patch")
    _require(rows, ACT_PATCH_REQUIRED, "import.act_patch", path)
    out = []
    for i, r in enumerate(rows):
        pp = r.get("patch_position") or {}
        vector = pp.get("intervention_vector")
        if vector is None:
            raise UserInputError("import.act_patch", f"row {i} has no patch_position.intervention_vector", "keep it")
        out.append({
            "pair_id": i, "split": split, "relation": r.get("relation", ""), "chunk": -1,
            "layer": [int(x) for x in r["layer"]], "input_text": "".join(r["input_tokens"]),
            "input_tokens": list(r["input_tokens"]), "original_continuation": list(r["original_continuation"]),
            "ablated_continuation": list(r["ablated_continuation"]), "original_token_id": -1, "ablated_token_id": -1,
            "is_different": bool(r["is_different"]), "orig_pos": int(pp.get("orig_pos", -1)),
            "orig_text_token": pp.get("orig_text_token", ""), "counterfact_pos": int(pp.get("counterfact_pos", -1)),
            "counterfact_text_token": pp.get("counterfact_text_token", ""),
            "intervention_vector": np.asarray(vector, dtype=np.float32),
            "counterfactual_text": r.get("counterfactual_text", ""), "gt_original_target": r.get("gt_original_target", ""),
            "gt_counterfactual_target": r.get("gt_counterfactual_target", ""), "options": [],
            "token_type": r.get("token_type", "other"), "token_string": pp.get("orig_text_token", ""),
        })  # fmt: skip
    return out


def import_input_ablation(path: str | Path, split: str = "train") -> list[dict[str, Any]]:
    """Public input-ablation rows as `ablation_gt` rows; a null changed flag is derived from the predictions."""
    rows = read_rows(path, "import.input_ablation")
    _require(rows, ABLATION_REQUIRED, "import.input_ablation", path)
    out = []
    for i, r in enumerate(rows):
        changed = r["random_hint_prediction"] != r["zeroshot_prediction"]
        if r.get("changed_pred_bc_hint") is not None and bool(r["changed_pred_bc_hint"]) != changed:
            raise UserInputError(
                "import.input_ablation", f"row {i}: changed_pred_bc_hint contradicts the two predictions", "fix the row"
            )
        out.append({
            "index": int(r.get("index", i)), "question_id": int(r.get("index", i)), "split": split,
            "question": r["question"], "choices": list(r["choices"]), "correct_answer": str(r.get("correct_answer", "")),
            "subject": r.get("subject", ""), "hint": r.get("hint", ""), "system_prompt": r.get("system_prompt", ""),
            "original_user_prompt": r.get("original_user_prompt", ""), "hint_user_prompt": r["hint_user_prompt"],
            "original_prompt_full": r.get("original_prompt_full", ""), "hint_prompt_full": r.get("hint_prompt_full", ""),
            "zeroshot_prediction": r["zeroshot_prediction"], "random_hint_prediction": r["random_hint_prediction"],
            "zeroshot_greedy_token": "", "hint_greedy_token": "", "changed_pred_bc_hint": changed,
        })  # fmt: skip
    return out


def digest(path: str) -> str:
    """sha256 of a file, or of a folder's (relative path, sha256) list."""
    p = Path(path)
    if p.is_dir():
        return config_hash("folder", 1, [(str(f.relative_to(p)), file_sha256(str(f))) for f in sorted(p.rglob("*"))
                                          if f.is_file()])  # fmt: skip
    return file_sha256(str(p))


def check_import(train: str | None, test: str | None, field: str) -> bool:
    """True when a public dataset is to be imported; both splits or neither, and both must exist."""
    if train is None and test is None:
        return False
    for name, value in (("import_train", train), ("import_test", test)):
        if value is None:
            raise UserInputError(f"{field}.{name}", "is missing", "give both import_train and import_test")
        if not Path(value).exists():
            raise UserInputError(f"{field}.{name}", f"{value} does not exist", "point it at the dataset file/folder")
    return True


def import_key(stage: str, train: str, test: str) -> str:
    """Dataset key of an imported ground truth: the content of both splits, not their paths."""
    return config_hash(f"{stage}-import", IMPORT_VERSION, {"train": digest(train), "test": digest(test)})


def ground_truth_key(stage: str, version: int, target: Any, cfg: Any, field: str) -> str:
    """Key of a ground-truth dataset that is either imported (the files' content) or built from the target
    (its weights and the config; the import paths play no part in what is built)."""
    if check_import(cfg.import_train, cfg.import_test, field):
        return import_key(stage, cfg.import_train, cfg.import_test)
    from tasks.common.models import target_key

    return target_key(stage, version, target, cfg.model_dump(exclude={"import_train", "import_test"}))


def imported_or(
    out: Dataset, cfg: Any, importer: Callable[[str, str], list[dict[str, Any]]], build: Callable[[], dict[str, Any]]
) -> dict[str, Any]:
    """`out`'s summary: as a previous run left it, or after importing both splits, or after `build()`."""
    from tasks.common.orchestration import complete_or

    def make() -> dict[str, Any]:
        if not (cfg.import_train and cfg.import_test):
            return build()
        rows = importer(cfg.import_train, "train") + importer(cfg.import_test, "test")
        return write_imported(out, rows, {"train": cfg.import_train, "test": cfg.import_test})

    return complete_or(out, make)


def write_imported(out: Dataset, rows: list[dict[str, Any]], source: dict[str, str]) -> dict[str, Any]:
    """Write imported rows as the ground-truth table `out` (one shard) and mark it complete."""
    out.create({"stage": out.table, "imported_from": source})
    columns = {k: [r[k] for r in rows] for k in rows[0] if k != "intervention_vector"}
    table = pa.table(columns)
    if "intervention_vector" in rows[0]:
        vectors = np.stack([r["intervention_vector"] for r in rows]).astype(np.float32)  # [N, d]
        table = table.append_column(
            "intervention_vector", pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1])
        )
    out.write_shard(0, table)
    summary = {"rows": len(rows), "imported_from": source,
               "test": sum(r["split"] == "test" for r in rows)}  # fmt: skip
    out.mark_complete(summary)
    return summary


# -- the features archive: pickles, read without running code ---------------------------------------------

# The only globals an archive pickle may name: numpy's array, dtype and scalar reconstructors (numpy 1 and 2
# name their module differently). Lists, tuples, dicts, strings and numbers need none. Anything else (a
# function to call, a class whose __reduce__ runs code, a torch storage) is refused before it is called.
SAFE_PICKLE_GLOBALS = frozenset(
    {(f"numpy.{core}.{mod}", name) for core in ("core", "_core") for mod, name in
     (("multiarray", "_reconstruct"), ("multiarray", "scalar"), ("numeric", "_frombuffer"))}
    | {("numpy", "ndarray"), ("numpy", "dtype")}
)  # fmt: skip


class _Refused(pickle.UnpicklingError):
    """A global outside SAFE_PICKLE_GLOBALS, refused before it is looked up."""


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in SAFE_PICKLE_GLOBALS:
            return super().find_class(module, name)
        raise _Refused(f"it names {module}.{name}, which the archive format never holds")


def load_pickle(path: Path, field: str) -> Any:
    """A pickle of the archive format (containers, strings, numbers, numpy arrays) and nothing else."""
    if not path.is_file():
        raise UserInputError(
            field, f"{path} does not exist", "point it at the archive folder (features/, explanations/)"
        )
    try:
        with path.open("rb") as f:
            return _RestrictedUnpickler(f).load()
    except _Refused as exc:
        raise UserInputError(field, f"{path} is refused: {exc}", "import only the archive's own pickles") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, AttributeError, MemoryError) as exc:
        raise UserInputError(field, f"{path} is not a readable pickle ({type(exc).__name__})",
                             "re-download the archive file") from None  # fmt: skip


def read_feature_archive(folder: str | Path, layers: list[int], d: int,
                         field: str) -> tuple[dict[int, np.ndarray], list[tuple[int, int, str, str]]]:  # fmt: skip
    """(directions {layer: [n_features, d]}, labels [(layer, feature_id, label, split)]) of the archive at
    `folder`, for `layers`; every shape, index and label checked, each mistake one line naming the file."""
    root = Path(folder).expanduser()
    directions = {}
    for layer in layers:
        path = root / "features" / f"layer_{layer}.pkl"
        m = load_pickle(path, field)
        try:
            matrix = np.asarray(m, dtype=np.float32)
        except (TypeError, ValueError):
            matrix = np.zeros(0)
        if matrix.ndim != 2 or matrix.shape[0] != d or not np.isfinite(matrix).all():
            raise UserInputError(field, f"{path} holds no finite [{d} x n_features] matrix (shape "
                                 f"{list(matrix.shape)})", f"the target's width is {d}")  # fmt: skip
        directions[layer] = np.ascontiguousarray(matrix.T)  # [n, d]: a direction per row, like an SAE's W_dec
    labels = []
    for split in ("train", "test"):
        path = root / "explanations" / f"{split}_explanations.pkl"
        entries = load_pickle(path, field)
        listed = load_pickle(root / "explanations" / f"{split}_layer_feature_idxs.pkl", field)
        try:
            listed_set = {(int(a), int(b)) for a, b in listed}
            rows = [((int(k[0]), int(k[1])), v["chosen_label"]) for k, v in entries]
        except (TypeError, ValueError, KeyError, IndexError):
            raise UserInputError(field, f"{path} is not a list of ((layer, idx), {{'chosen_label': ...}}) with its "
                                 "idxs file a list of (layer, idx)", "use the archive's own files") from None  # fmt: skip
        for (layer, idx), label in rows:
            if (layer, idx) not in listed_set:
                raise UserInputError(field, f"{path}: feature ({layer}, {idx}) is not in {split}_layer_feature_idxs",
                                     "use the archive's own files")  # fmt: skip
            if layer not in directions:
                continue  # a layer this recipe does not cache
            if not 0 <= idx < len(directions[layer]) or not isinstance(label, str) or not label.strip():
                raise UserInputError(field, f"{path}: feature ({layer}, {idx}) has no feature row or no label text",
                                     "use the archive's own files")  # fmt: skip
            labels.append((layer, idx, label, split))
    if len({(a, b) for a, b, _, _ in labels}) != len(labels):
        raise UserInputError(
            field, f"{root}: a feature is labelled twice (or in both splits)", "use the archive's own files"
        )
    if not any(s == "test" for *_, s in labels) or not any(s == "train" for *_, s in labels):
        raise UserInputError(field, f"{root} labels no train or no test feature of layers {layers}",
                             "cache the layers the archive labels")  # fmt: skip
    return directions, labels
