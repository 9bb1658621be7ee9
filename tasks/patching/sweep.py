"""The patching sweep's forward passes: the target's block outputs, and its greedy next token under patches.

A patch (chunk layers, position t, v) pins the residual at t to v after every block of the chunk. It changes
nothing before t (attention is causal) and nothing below the chunk's first layer f. So a batch of patches of
one chunk, in order of t, shares two things with the clean run of x: the KV cache at the positions before its
first position t0 (the clean prefix ids[:t0] is run once per batch and its cache repeated over the batch), and
the residual after block f − 1 at every position (one clean run of x per pair): blocks 0..f − 1 do not run
for the patched rows at all, and blocks f.. run only the suffix ids[t0:]. The work per batch of B falls from
B·T·L block-tokens to t0·L + B·(T − t0)·(L − f). (The prefix is run again rather than cut from the clean
run's cache: a sliding-window layer's cache drops states a shorter prefix still needs.)
"""

from dataclasses import dataclass
from typing import Any

import torch

from tasks.common import models
from tasks.common.activations import residual_stream
from tasks.common.models import LoadedModel, decoder_layers

Patch = tuple[list[int], int, torch.Tensor]  # (the chunk's layers, position t, v [d])


class _Patch:
    """Forward hooks that pin h[row, pos[row]] = vec[row] at every layer in the row's chunk."""

    def __init__(self, lm: LoadedModel, rows_layers: list[list[int]], pos: torch.Tensor, vec: torch.Tensor):
        self.handles = []
        blocks = decoder_layers(lm.model)
        for layer in sorted({layer for ls in rows_layers for layer in ls}):
            rows = torch.tensor([r for r, ls in enumerate(rows_layers) if layer in ls], dtype=torch.long)
            self.handles.append(blocks[layer].register_forward_hook(self._hook(rows, pos[rows], vec[rows])))

    @staticmethod
    def _hook(rows: torch.Tensor, pos: torch.Tensor, vec: torch.Tensor):
        def hook(module: torch.nn.Module, args: Any, output: Any) -> Any:
            h = output[0] if isinstance(output, tuple) else output
            h = h.clone()  # build the patched tensor explicitly (METHOD §4.3), replacing, not adding (METHOD §6.1)
            h[rows.to(h.device), pos.to(h.device)] = vec.to(device=h.device, dtype=h.dtype)
            return (h, *output[1:]) if isinstance(output, tuple) else h

        return hook

    def __enter__(self) -> "_Patch":
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self.handles:
            h.remove()


class _StartAt:
    """Blocks 0..first − 1 do not run: each returns `residual` [B, S, d], the clean run's output of block
    first − 1 over the suffix, which is all block `first` reads of them (a block's own KV cache is read only by
    that block, and these blocks see no patch). Decoder blocks return their hidden states as one tensor."""

    def __init__(self, lm: LoadedModel, first: int, residual: torch.Tensor) -> None:
        self.blocks = list(decoder_layers(lm.model))[:first]
        self.residual = residual

    def __enter__(self) -> "_StartAt":
        for block in self.blocks:
            block.forward = lambda *args, **kwargs: self.residual  # an instance attribute shadows the method
        return self

    def __exit__(self, *exc: Any) -> None:
        for block in self.blocks:
            del block.forward  # the class's forward again


def all_layers(lm: LoadedModel, ids: list[int]) -> torch.Tensor:
    """Residual stream after every block, [n_layers, T, d]: the blocks' outputs, where a patch writes (HF's
    last hidden state is after the final norm, which would put a normed vector into the last chunk's v)."""
    out = residual_stream(lm, torch.tensor([ids]), list(range(lm.n_layers)))  # {layer: [1, T, d]}
    return torch.stack([out[layer][0].float() for layer in range(lm.n_layers)])


@dataclass
class CleanRun:
    """What every patched copy of x shares with the clean run."""

    token: int  # the greedy next token of x
    blocks: torch.Tensor  # [n_layers, T, d]: every block's output, in the dtype the blocks pass on


@torch.inference_mode()
def clean_run(lm: LoadedModel, ids: list[int]) -> CleanRun:
    blocks = decoder_layers(lm.model)
    captured: dict[int, torch.Tensor] = {}

    def keep(layer: int):
        def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            captured[layer] = output[0] if isinstance(output, tuple) else output

        return hook

    handles = [blocks[layer].register_forward_hook(keep(layer)) for layer in range(lm.n_layers)]
    try:
        with lm.runtime.autocast_context():
            logits = lm.model(input_ids=torch.tensor([ids], device=lm.runtime.device), logits_to_keep=1).logits
    finally:
        for h in handles:
            h.remove()
    return CleanRun(int(logits[0, -1].argmax()), torch.stack([captured[layer][0] for layer in range(lm.n_layers)]))


SHARE = ("all", "prefix", "none")  # what a patched batch takes from the clean run; "all" is the sweep's


@torch.inference_mode()
def next_tokens(lm: LoadedModel, ids: list[int], patches: list[Patch] | None, batch_size: int,
                share: str = "all", clean: CleanRun | None = None) -> list[int]:  # fmt: skip
    """Greedy next-token ids of x: clean (patches None) or one per patch, in batches of up to `batch_size`
    in order of position. `share` "all": one chunk per batch, started from the clean prefix's KV cache and at
    the chunk's first block from the clean residual (module docstring); "prefix": the KV cache only, chunks
    mixed in a batch; "none": every row through every block over all of ids. The last two are the references
    the benchmark and the tests compare with. `clean`: x's clean run, when the caller has it already."""
    if share not in SHARE:
        raise ValueError(f"share {share!r} is not one of {SHARE}")
    if patches is None:
        return [(clean or clean_run(lm, ids)).token]
    device = lm.runtime.device
    if share == "all":
        clean = clean or clean_run(lm, ids)
    by_chunk = share == "all"
    order = sorted(range(len(patches)), key=lambda i: (patches[i][0][0] if by_chunk else 0, patches[i][1]))

    def run(size: int) -> list[int]:
        out = [0] * len(patches)
        start = 0
        while start < len(order):
            first = patches[order[start]][0][0] if by_chunk else 0  # the first block that runs
            rows = [i for i in order[start : start + size] if not by_chunk or patches[i][0][0] == first]
            start += len(rows)
            batch = [patches[i] for i in rows]
            t0 = batch[0][1] if share != "none" else 0
            cache = None
            with lm.runtime.autocast_context():
                if t0 > 0:
                    prefix = torch.tensor([ids[:t0]], device=device)
                    cache = lm.model(input_ids=prefix, use_cache=True, logits_to_keep=1).past_key_values
                    cache.batch_repeat_interleave(len(batch))
            suffix = torch.tensor([ids[t0:]] * len(batch), device=device)  # [B, T - t0]
            pos = torch.tensor([t - t0 for _, t, _ in batch])  # the patched position within the suffix
            residual = clean.blocks[first - 1, t0:].expand(len(batch), -1, -1) if first else None  # [B, T - t0, d]
            with lm.runtime.autocast_context(), _StartAt(lm, first, residual):
                with _Patch(lm, [c[0] for c in batch], pos, torch.stack([c[2] for c in batch])):
                    logits = lm.model(input_ids=suffix, past_key_values=cache, use_cache=cache is not None,
                                      logits_to_keep=1).logits[:, -1]  # fmt: skip
            for i, token in zip(rows, logits.argmax(-1).tolist(), strict=True):
                out[i] = token
        return out

    return models.oom_backoff(run, batch_size, "patching sweep")
