"""The paper's released features archive, read without running code: features/layer_{L}.pkl, a [d x n_features]
matrix per layer; explanations/{split}_explanations.pkl, a list of ((layer, idx), {chosen_label, all_labels,
all_label_scores, context}); explanations/{split}_layer_feature_idxs.pkl, the (layer, idx) of the split. Pickle
runs code on load, so a restricted unpickler admits only the container, numeric and array types the format
needs and refuses anything else in one line."""

import pickle
from pathlib import Path
from typing import Any

import numpy as np

from storage.errors import UserInputError

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
