"""The continuous-token explainer: an LM that reads a vector through a placeholder token and explains it.

The prompt carries the span ``[s] [v] [e]`` (three special tokens). The vector v from target layer ℓ becomes
u = Π_ℓ v (v itself when the explainer and the target share a width; Π_ℓ Q v under the rotated-basis control,
Q a fixed random orthogonal matrix) and enters at the payload token ``[v]`` in one of three ways (`injection`):

- 'embedding' (the paper): u *replaces* the payload's input embedding (with projection 'fitted', Π_ℓ is fitted
  without labels into the explainer's embedding space first: tasks/explainer/projection.py). The replacement builds a new tensor with
  torch.where, so it cannot be lost to an out-of-place op whose result is discarded (docs/METHOD.md §4.1, §4.3). What
  enters block 0 is u (METHOD §4.4): Gemma multiplies token embeddings by √d inside its embedding module, and
  inputs_embeds bypass that module, so u is not scaled again. With vector_norm 'match' u is rescaled to the
  mean norm of the embedding module's outputs.
- 'residual': u replaces the residual stream at the payload after block ℓ (SelfIE and Patchscopes inject inside
  the stack). A self explainer then reads its own layer-ℓ state where its own upper layers expect one: a
  residual is not in the basis of token embeddings, and block 0 cannot read it there.
- 'early_add': unit(u) · |h| · c is added to the residual h at the payload after an early block (Activation
  Oracles), so the vector arrives at the norm the stream already has.

Under the last two a forward hook writes u during the forward that holds the payload; decoding reads it from
the KV cache like any other position.

Loss (docs/METHOD.md §3.1-§3.4): prompt and answer are tokenised separately and concatenated; labels are -100 on the prompt;
the answer ends with EOS (end of turn for chat explainers), which is trained on; the loss is the mean
cross-entropy over answer tokens. Base templates end in a space: we move it onto the answer (METHOD §3.2), so the
generation prefix equals the training prefix token for token.

Why one module of ~600 lines: the span tokens, the three injections, the prompt layout, the loss and
decoding all turn on the same placeholder and forward hook; the training loop (train.py) and the feature
templates (tasks/features/prompts.py) stand apart because they need only its public methods.
"""

import contextlib
import json
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from storage.errors import UserInputError
from tasks.common import models
from tasks.explainer.config import ExplainerConfig

if TYPE_CHECKING:
    from tasks.explainer.projection import LayerStats, ProjectionFit

SPAN_TOKENS = ("<|sx_begin|>", "<|sx_payload|>", "<|sx_end|>")
SPAN = "".join(SPAN_TOKENS)
STOP_STRINGS = (" [END]", "\n", ">>>.")
KEPT_STOP_STRINGS = (">>>.",)  # ends an outcome sentence ("... <<<X>>>."): part of the answer, kept
CHAT_SYSTEM_PROMPT = "You are a helpful assistant that explains the internal features of language models."


@dataclass(frozen=True)
class Query:
    """One question for the explainer: a vector from target layer `layer`, a user text, maybe an answer."""

    vector: np.ndarray | None  # [d_target]; None: a text-only question (no SPAN in the text, nothing injected)
    layer: int
    text: str  # the question, with SPAN inside when there is a vector
    answer: str | None = None  # the ground-truth explanation (training), None at inference
    example_id: str = ""
    prefix: str = ""  # text the answer continues (SelfIE's "The meaning of the word 'X' is")
    system: str | None = None  # chat system prompt; None uses CHAT_SYSTEM_PROMPT


def explainer_layer(layer: int, n_target_layers: int, n_explainer_layers: int) -> int:
    """The explainer block at the same relative depth as target block `layer` (itself for equal depths)."""
    if n_target_layers == 1:
        return n_explainer_layers - 1
    return round(layer * (n_explainer_layers - 1) / (n_target_layers - 1))


def check_injection(
    cfg: ExplainerConfig, layers: Sequence[int], n_target_layers: int, d_target: int, field: str
) -> None:
    """A vector written into the residual stream is read only by the blocks above it: after the explainer's
    last block nothing attends to it. Refuse such a site, or a target-layer state written into an explainer of
    another width, before anything runs."""
    if cfg.projection == "fitted" and cfg.injection != "embedding":
        raise UserInputError(f"{field}.projection", f"'fitted' maps into the token-embedding space, which injection "
                             f"{cfg.injection!r} does not read", "use injection 'embedding', or projection 'auto'")  # fmt: skip
    if cfg.vector_norm == "layer_mean" and (cfg.injection != "residual" or cfg.projection != "auto"
                                            or models.load_config(cfg.model).hidden_size != d_target):  # fmt: skip
        raise UserInputError(f"{field}.vector_norm", "'layer_mean' writes a state of the target's own layer, which "
                             "needs injection 'residual', no projection and the target's width", "use 'match', or "
                             "injection 'residual' with projection 'auto' on an explainer of the target's width")  # fmt: skip
    if cfg.injection == "embedding":
        return
    n_blocks = models.load_config(cfg.model).num_hidden_layers
    if cfg.injection == "early_add" and cfg.inject_layer >= n_blocks - 1:
        raise UserInputError(f"{field}.inject_layer", f"{cfg.inject_layer} leaves no block of the explainer's "
                             f"{n_blocks} above it to read the vector", f"use a block below {n_blocks - 1}")  # fmt: skip
    last = [layer for layer in layers if explainer_layer(layer, n_target_layers, n_blocks) >= n_blocks - 1]
    if cfg.injection == "residual" and last:
        raise UserInputError(f"{field}.injection", f"'residual' writes target layer {last[0]}'s vector after the "
                             "explainer's last block, where nothing reads it",
                             "drop that layer, or inject at the embedding or early_add")  # fmt: skip


def basis_rotation(d: int, seed: int) -> torch.Tensor:
    """Q [d, d]: a fixed random orthogonal matrix (QR of a seeded Gaussian, signs fixed so Q is Haar), built on
    the CPU in float64 so every device and run gets the same Q from the same seed."""
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()


ROTATED = "rotated_basis"  # the variant (and metrics method) of the rotated-basis control; Q seeded by cfg.seed


def rotation_seed(cfg: ExplainerConfig, variant: str) -> int | None:
    """The seed of Q for an explainer variant: the explainer's own seed under the rotated-basis control."""
    return cfg.seed if variant == ROTATED else None


def shuffled_donors(groups: Sequence[Hashable], seed: int) -> list[int]:
    """The shuffled-v control: for each item, the index of another item of its group (same target layer, same
    split) whose vector it is asked about instead; a seeded cycle through each group, so no item keeps its own
    vector (a group of one does)."""
    donor = list(range(len(groups)))
    rng = np.random.default_rng(seed)
    members: dict[Hashable, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    for g in sorted(members, key=str):
        idx = [members[g][j] for j in rng.permutation(len(members[g]))]
        for a, b in zip(idx, idx[1:] + idx[:1], strict=True):
            donor[a] = b
    return donor


class Explainer(nn.Module):
    """An LM (possibly peft-wrapped) plus the projections Π_ℓ and the placeholder mechanism."""

    def __init__(
        self,
        lm: models.LoadedModel,
        d_target: int | None,
        n_target_layers: int,
        cfg: ExplainerConfig,
        rotation_seed: int | None = None,
    ) -> None:
        """d_target None: a text-only explainer (no vectors, no projection). rotation_seed: the rotated-basis
        control, every vector read as Qv (Q = basis_rotation(d_target, rotation_seed))."""
        super().__init__()
        self.lm, self.cfg = lm, cfg
        self.tokenizer = lm.tokenizer
        self.chat = cfg.format == "chat" or (cfg.format == "auto" and lm.tokenizer.chat_template is not None)
        self.text_only = text_only = d_target is None
        d_target = lm.d_model if text_only else d_target
        self.d_target, self.n_target_layers = d_target, n_target_layers
        self._add_span_tokens()
        self.payload_id = self.tokenizer.convert_tokens_to_ids(SPAN_TOKENS[1])
        self.payloads_per_query = 1  # SelfIE writes the vector at two placeholders
        d_e = lm.d_model
        embed = lm.model.get_input_embeddings()
        with torch.no_grad():
            # Norm of what the embedding module emits (Gemma's √d scale included), over the original vocabulary.
            sample = embed(torch.arange(min(4096, embed.num_embeddings - 3), device=embed.weight.device))
            self.register_buffer("embedding_norm", sample.float().norm(dim=-1).mean(), persistent=False)
        self.rotation_seed = rotation_seed
        self.rotation: torch.Tensor | None = None  # Q [d_M, d_M]: the rotated-basis control
        if rotation_seed is not None:
            self.rotation = basis_rotation(d_target, rotation_seed).to(lm.runtime.device)
        self.proj: nn.Parameter | None = None
        if cfg.projection != "auto" or d_e != d_target:
            g = torch.Generator().manual_seed(cfg.seed)
            # Π_ℓ ∈ R^{d_E x d_M}, one per target layer, random init (the paper's non-pretrained variant);
            # 'fitted' overwrites the fitted layers' rows (set_fitted_projection) before training.
            w = torch.randn(n_target_layers, d_e, d_target, generator=g) / d_target**0.5
            self.proj = nn.Parameter(w.to(lm.runtime.device))
        self.fitted = cfg.projection == "fitted" and not text_only
        if self.fitted:  # u = μ_E + s · unit(Π_ℓ (v − c_ℓ)), see tasks/explainer/projection.py; zeros until fitted
            dev = lm.runtime.device
            self.register_buffer("fit_in_mean", torch.zeros(n_target_layers, d_target, device=dev))  # c_ℓ
            self.register_buffer("fit_out_mean", torch.zeros(n_target_layers, d_e, device=dev))  # μ_E
            self.register_buffer("fit_out_norm", torch.ones(n_target_layers, device=dev))  # s
        self.on_manifold = cfg.vector_norm == "layer_mean" and not text_only
        if self.on_manifold:  # u = μ_ℓ + s σ_ℓ unit(v − c_ℓ), see tasks/explainer/projection.py; zeros until set
            dev = lm.runtime.device
            self.register_buffer("layer_mean", torch.zeros(n_target_layers, d_target, device=dev))  # μ_ℓ
            self.register_buffer("layer_spread", torch.zeros(n_target_layers, device=dev))  # σ_ℓ
            self.register_buffer("layer_centre", torch.zeros(n_target_layers, d_target, device=dev))  # c_ℓ
        self.model = lm.model
        if cfg.finetune == "lora":
            torch.manual_seed(cfg.seed)  # LoRA's A matrices draw from the global RNG: same seed, same init
            self._wrap_lora()
            models.store_frozen_linears(lm.model, lm.runtime)  # the frozen base, as autocast computes with it

    # -- construction ---------------------------------------------------------------------------------------

    def _add_span_tokens(self) -> None:
        """Register [s] [v] [e] as special tokens; new embedding rows start at the mean embedding (§2.1)."""
        missing = [t for t in SPAN_TOKENS if t not in self.tokenizer.get_vocab()]
        if missing:
            self.tokenizer.add_special_tokens({"additional_special_tokens": list(SPAN_TOKENS)})
        n_vocab = len(self.tokenizer)
        embed = self.lm.model.get_input_embeddings()
        if embed.num_embeddings < n_vocab:
            old = embed.num_embeddings
            self.lm.model.resize_token_embeddings(n_vocab, mean_resizing=False)
            with torch.no_grad():
                weight = self.lm.model.get_input_embeddings().weight
                weight[old:] = weight[:old].mean(dim=0, keepdim=True)

    def _wrap_lora(self) -> None:
        from peft import LoraConfig, get_peft_model

        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        lora = LoraConfig(
            r=self.cfg.lora_r,
            lora_alpha=self.cfg.lora_alpha,
            lora_dropout=self.cfg.lora_dropout,
            target_modules=targets,
            bias="none",
            task_type="CAUSAL_LM",
        )
        self.model = get_peft_model(self.lm.model, lora)

    # -- the mechanism --------------------------------------------------------------------------------------

    def project(self, vectors: torch.Tensor, layers: torch.Tensor) -> torch.Tensor:
        """u = Π_ℓ v [B, d_E] (v itself without Π) from vectors [B, d_M] (float32, as stored) and layers [B].
        Under vector_norm 'layer_mean' v is centred first (v − c_ℓ; v = 0 stays 0), so the rotated-basis
        control rotates what is left of a residual input, Q(v − c_ℓ), not its layer mean too."""
        u = vectors.float()
        if self.on_manifold:  # centred, so that what is left of a residual input is its own part
            centre = self.layer_centre[layers.to(self.layer_centre.device)]  # [B, d_M]
            u = u.to(centre.device)
            u = torch.where(u.any(dim=-1, keepdim=True), u - centre, u)
        if self.rotation is not None:
            u = u.to(self.rotation.device) @ self.rotation.T  # [B, d_M]: row b is Q v_b
        if self.proj is None:
            return u
        layers = layers.to(self.proj.device)
        u = u.to(self.proj.device)
        if self.fitted:
            u = u - self.fit_in_mean[layers]
        u = torch.einsum("bed,bd->be", self.proj[layers].float(), u)
        if self.fitted:  # back onto the embeddings' manifold; v = 0 stays the bare mean embedding μ_E
            unit = u / u.norm(dim=-1, keepdim=True).clamp_min(1e-6)
            u = self.fit_out_mean[layers] + unit * self.fit_out_norm[layers, None]
        return u

    def set_fitted_projection(self, fit: "ProjectionFit") -> None:
        """Install a fitted Π (tasks/explainer/projection.py) for its layers; the other layers keep their random Π."""
        with torch.no_grad():
            for layer, pi in fit.proj.items():
                self.proj[layer] = torch.from_numpy(pi).to(self.proj.device)
                self.fit_in_mean[layer] = torch.from_numpy(fit.in_mean[layer]).to(self.proj.device)
                self.fit_out_mean[layer] = torch.from_numpy(fit.out_mean[layer]).to(self.proj.device)
                self.fit_out_norm[layer] = fit.out_norm[layer]

    def set_layer_stats(self, stats: "LayerStats") -> None:
        """Install the target's residual statistics (tasks/explainer/projection.py) for vector_norm 'layer_mean'."""
        with torch.no_grad():
            for layer, mu in stats.mean.items():
                self.layer_mean[layer] = torch.from_numpy(mu).to(self.layer_mean.device)
                self.layer_spread[layer] = stats.spread[layer]
                self.layer_centre[layer] = torch.from_numpy(stats.centre[layer]).to(self.layer_mean.device)

    def injection_sites(self, layers: torch.Tensor) -> torch.Tensor:
        """[B]: the explainer block after which each row's vector enters the residual stream. 'residual': the
        block at the relative depth of target layer ℓ (`explainer_layer`, as the alignment diagnostics pair
        layers); 'early_add': inject_layer for every row."""
        n_blocks = self.lm.n_layers
        if self.cfg.injection == "early_add":
            return torch.full_like(layers, min(self.cfg.inject_layer, n_blocks - 1))
        depth = [explainer_layer(int(layer), self.n_target_layers, n_blocks) for layer in layers.tolist()]
        return torch.tensor(depth, dtype=torch.long, device=layers.device)

    def _payload_mask(self, input_ids: torch.Tensor, n_payloads: torch.Tensor | None) -> torch.Tensor:
        """[B, T] bool: where the placeholder sits; each row must hold n_payloads of them (METHOD §4.6)."""
        is_payload = input_ids == self.payload_id
        counts = is_payload.sum(dim=1)
        if n_payloads is None:
            n_payloads = torch.full_like(counts, self.payloads_per_query)
        if not bool((counts == n_payloads.to(counts.device)).all()):  # METHOD §4.6: payloads survived tokenisation
            raise ValueError(f"expected {n_payloads.tolist()} payload token(s) per row, got {counts.tolist()}")
        return is_payload

    def inject(
        self,
        input_ids: torch.Tensor,
        vectors: torch.Tensor,
        layers: torch.Tensor,
        n_payloads: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """inputs_embeds [B, T, d_E]: token embeddings; under injection 'embedding' the payload row is u.

        input_ids [B, T]; vectors [B, d_M] (float32, as stored); layers [B] (target layer indices);
        n_payloads [B]: payload tokens each row must hold (0 for text-only rows; default payloads_per_query).
        """
        embeds = self.model.get_input_embeddings()(input_ids)  # [B, T, d_E]
        is_payload = self._payload_mask(input_ids, n_payloads)
        if self.cfg.injection != "embedding":
            return embeds
        u = self.project(vectors.to(embeds.device), layers)  # [B, d_E]
        if self.cfg.vector_norm == "match" and not self.fitted:  # a fitted u is at the embeddings' scale
            u = u / u.norm(dim=-1, keepdim=True).clamp_min(1e-6) * self.embedding_norm
        return torch.where(is_payload.unsqueeze(-1), u.unsqueeze(1).to(embeds.dtype), embeds)

    @contextlib.contextmanager
    def injecting(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, vectors: torch.Tensor, layers: torch.Tensor
    ) -> Iterator[None]:
        """While the body runs a forward over `input_ids`, hooks write u into the residual stream at the payload
        (injections 'residual' and 'early_add'; nothing under 'embedding'). Only a forward that holds the payload
        needs it: decode steps read the payload's keys and values from the KV cache."""
        if self.cfg.injection == "embedding":
            yield
            return
        is_payload = input_ids == self.payload_id  # [B, T]
        u = self.project(vectors.to(input_ids.device), layers)  # [B, d_E]
        unit = u / u.norm(dim=-1, keepdim=True).clamp_min(1e-6)  # [B, d_E]; v = 0 stays 0
        sites = self.injection_sites(layers.to(input_ids.device))  # [B]
        others = attention_mask.bool() & ~is_payload  # [B, T]: the prompt's real tokens

        def hook(block: int) -> Callable[..., Any]:
            def write(module: nn.Module, args: Any, output: Any) -> Any:
                h = output[0] if isinstance(output, tuple) else output  # [B, T, d_E]
                at = (is_payload & (sites == block)[:, None]).unsqueeze(-1)  # [B, T, 1]
                if self.cfg.injection == "early_add":
                    new = h + unit[:, None].to(h.dtype) * h.norm(dim=-1, keepdim=True) * self.cfg.inject_scale
                elif self.on_manifold:  # a state of layer ℓ: its mean plus v's direction at a residual's own size
                    spread = self.layer_spread[layers][:, None] * self.cfg.inject_scale  # [B, 1]
                    new = (self.layer_mean[layers] + unit * spread)[:, None].to(h.dtype)  # [B, 1, d_E]
                elif self.cfg.vector_norm == "match":  # the prompt's median norm here: robust to the sink token
                    norms = torch.where(others, h.float().norm(dim=-1), torch.nan)  # [B, T]
                    new = (unit * norms.nanmedian(dim=1).values[:, None])[:, None].to(h.dtype)  # [B, 1, d_E]
                else:
                    new = u[:, None].to(h.dtype)
                h = torch.where(at, new, h)
                return (h, *output[1:]) if isinstance(output, tuple) else h

            return write

        blocks = models.decoder_layers(self.lm.model)
        # prepend: the written state is the block's output, as every other hook on the block sees it
        handles = [blocks[b].register_forward_hook(hook(b), prepend=True) for b in sorted(set(sites.tolist()))]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        vectors: torch.Tensor,
        layers: torch.Tensor,
        n_payloads: torch.Tensor | None = None,
        logits_to_keep: int = 0,
    ) -> Any:
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)  # left or right padding alike
        with self.lm.runtime.autocast_context(), self.injecting(input_ids, attention_mask, vectors, layers):
            return self.model(
                inputs_embeds=self.inject(input_ids, vectors, layers, n_payloads),
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=False,
                logits_to_keep=logits_to_keep,
            )

    # -- tokenisation ---------------------------------------------------------------------------------------

    def prompt_ids(self, q: Query) -> list[int]:
        """Token ids up to where the answer starts: identical at training and generation time (METHOD §3.2)."""
        if self.chat:
            system = CHAT_SYSTEM_PROMPT if q.system is None else q.system
            messages = [{"role": "system", "content": system}, {"role": "user", "content": q.text}]
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            return self.tokenizer(text + q.prefix.rstrip(" "), add_special_tokens=False)["input_ids"]
        return self.tokenizer((q.text + q.prefix).rstrip(" "), add_special_tokens=True)["input_ids"]

    def answer_ids(self, answer: str) -> list[int]:
        """The answer's ids plus EOS (METHOD §3.3); base answers carry the template's trailing space (METHOD §3.2)."""
        text = answer.replace(self.tokenizer.eos_token, "").strip()
        if not self.chat:
            text = " " + text
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]

    def training_example(self, q: Query) -> tuple[list[int], list[int]]:
        """(input_ids, labels) with labels -100 over the prompt: the loss mask is the answer span (METHOD §3.1)."""
        if q.answer is None:
            raise ValueError(f"query {q.example_id!r} has no answer to train on")
        p, a = self.prompt_ids(q), self.answer_ids(q.answer)
        return p + a, [-100] * len(p) + a

    # -- batching -------------------------------------------------------------------------------------------

    def collate(self, queries: Sequence[Query], train: bool) -> dict[str, torch.Tensor]:
        """Left-pad a batch, so every sequence ends at the last column: prompts end together for generation,
        and training answers sit in the last columns, where the loss reads the only logits it computes."""
        pad = self.tokenizer.pad_token_id
        if train:
            pairs = [self.training_example(q) for q in queries]
        else:
            pairs = [(ids := self.prompt_ids(q), [-100] * len(ids)) for q in queries]
        width = max(len(ids) for ids, _ in pairs)
        ids_t = torch.full((len(pairs), width), pad, dtype=torch.long)
        labels_t = torch.full((len(pairs), width), -100, dtype=torch.long)
        mask_t = torch.zeros((len(pairs), width), dtype=torch.long)
        for i, (ids, labels) in enumerate(pairs):
            sl = slice(width - len(ids), width)
            ids_t[i, sl], labels_t[i, sl], mask_t[i, sl] = torch.tensor(ids), torch.tensor(labels), 1
        for q in queries:  # METHOD §4.6 on the text side: a payload placeholder iff a vector
            if (SPAN_TOKENS[1] in q.text) != (q.vector is not None):
                raise ValueError(f"query {q.example_id!r}: the text must hold a payload exactly when it has a vector")
        device = self.lm.runtime.device
        zero = np.zeros(self.d_target, dtype=np.float32)
        vectors = np.stack([zero if q.vector is None else q.vector for q in queries])  # [B, d_M]
        return {
            "input_ids": ids_t.to(device),
            "attention_mask": mask_t.to(device),
            "labels": labels_t.to(device),
            "vectors": torch.from_numpy(vectors).to(device),
            "layers": torch.tensor([q.layer for q in queries], dtype=torch.long, device=device),
            "n_payloads": torch.tensor(
                [0 if q.vector is None else self.payloads_per_query for q in queries], device=device
            ),
        }

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean cross-entropy over answer tokens (METHOD §3.4: padding does not change an example's weight).

        Answers are left-padded into the last columns, so only the last `keep` positions need logits: the
        vocabulary projection over the whole prompt was half of a training step's time.
        """
        labels = batch["labels"]  # [B, T], -100 outside the answers
        answer_cols = (labels != -100).any(dim=0).nonzero()
        keep = labels.shape[1] - int(answer_cols.min()) + 1 if len(answer_cols) else 1
        out = self.forward(batch["input_ids"], batch["attention_mask"], batch["vectors"], batch["layers"],
                           batch["n_payloads"], logits_to_keep=keep)  # fmt: skip
        logits = out.logits[:, :-1].float()  # [B, keep-1, V]: positions T-keep..T-2 predict T-keep+1..T-1
        targets = labels[:, labels.shape[1] - keep + 1 :]  # [B, keep-1]
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)

    # -- generation -----------------------------------------------------------------------------------------

    @torch.inference_mode()
    def generate(
        self, queries: Sequence[Query], max_new_tokens: int, batch_size: int, use_cache: bool = True
    ) -> list[str]:
        """Greedy explanations, batched with a KV cache; the vector enters once, at prefill (§2.4). Length-sorted
        batches; on a CUDA out-of-memory error the batch size halves and decoding restarts."""
        self.model.eval()
        order = sorted(range(len(queries)), key=lambda i: len(self.prompt_ids(queries[i])))

        def run(size: int) -> list[str]:
            out: list[str] = [""] * len(queries)
            for start in range(0, len(order), size):
                idx = order[start : start + size]
                texts = self._generate_batch([queries[i] for i in idx], max_new_tokens, use_cache)
                for i, t in zip(idx, texts, strict=True):
                    out[i] = t
            return out

        return models.oom_backoff(run, batch_size, "explainer decoding")

    def _generate_batch(self, queries: Sequence[Query], max_new_tokens: int, use_cache: bool) -> list[str]:
        b = self.collate(queries, train=False)
        ids, mask = b["input_ids"], b["attention_mask"]  # [B, T] left-padded
        eos = self.stop_ids
        new = torch.empty((len(queries), 0), dtype=torch.long, device=ids.device)
        done = torch.zeros(len(queries), dtype=torch.bool, device=ids.device)
        past = None
        for step in range(max_new_tokens):
            with self.lm.runtime.autocast_context():
                if past is None or not use_cache:
                    full_ids = torch.cat([ids, new], dim=1)
                    full_mask = torch.cat([mask, torch.ones_like(new)], dim=1)
                    with self.injecting(full_ids, full_mask, b["vectors"], b["layers"]):
                        out = self.model(
                            inputs_embeds=self.inject(full_ids, b["vectors"], b["layers"], b["n_payloads"]),
                            attention_mask=full_mask,
                            position_ids=(full_mask.cumsum(-1) - 1).clamp_min(0),
                            use_cache=use_cache,
                            logits_to_keep=1,
                        )
                else:  # decode step: only the new token, the payload already sits in the cache
                    full_mask = torch.cat([mask, torch.ones_like(new)], dim=1)
                    out = self.model(
                        input_ids=new[:, -1:],
                        attention_mask=full_mask,
                        position_ids=full_mask.sum(-1, keepdim=True) - 1,
                        past_key_values=past,
                        use_cache=True,
                        logits_to_keep=1,
                    )
            past = out.past_key_values if use_cache else None
            token = out.logits[:, -1].argmax(dim=-1)  # [B]
            token = torch.where(done, torch.full_like(token, self.tokenizer.pad_token_id), token)
            new = torch.cat([new, token[:, None]], dim=1)
            done |= torch.tensor([t in eos for t in token.tolist()], device=done.device)
            if step % 4 == 3 or bool(done.all()):  # stop strings, checked on decoded text now and then
                done |= torch.tensor([_stopped(self._decode(row)) for row in new], device=done.device)
            if bool(done.all()):
                break
        return [_cut(self._decode(row)) for row in new]

    @property
    def stop_ids(self) -> set[int]:
        """EOS ids: the tokenizer's, plus the generation config's (Gemma's <end_of_turn>)."""
        return set(_as_list(self.lm.model.generation_config.eos_token_id)) | {self.tokenizer.eos_token_id}

    def _decode(self, row: torch.Tensor) -> str:
        eos = self.stop_ids
        ids = row.tolist()
        for i, t in enumerate(ids):
            if t in eos:
                ids = ids[:i]
                break
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    # -- checkpoints ----------------------------------------------------------------------------------------

    def save(self, path: Path, extra: dict[str, Any] | None = None) -> None:
        """Weights (LoRA adapter or full model), tokenizer with span tokens, Π, and the config."""
        path.mkdir(parents=True, exist_ok=True)
        if self.cfg.finetune == "lora":  # the span tokens resized the embedding: the adapter keeps its rows
            self.model.save_pretrained(path / "model", save_embedding_layers=True)
        else:
            self.model.save_pretrained(path / "model")
        self.tokenizer.save_pretrained(path / "model")
        if self.proj is not None:
            tensors = {"proj": self.proj}
            if self.fitted:
                tensors |= {"in_mean": self.fit_in_mean, "out_mean": self.fit_out_mean, "out_norm": self.fit_out_norm}
            save_file(
                {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path / "projection.safetensors")
            )
        if self.on_manifold:
            tensors = {"mean": self.layer_mean, "spread": self.layer_spread, "centre": self.layer_centre}
            save_file(
                {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path / "layer_stats.safetensors")
            )
        meta = {
            "config": self.cfg.model_dump(),
            "d_target": self.d_target,
            "text_only": self.text_only,  # built with d_target None: no Π fit, no layer statistics to reload
            "n_target_layers": self.n_target_layers,
            "rotation_seed": self.rotation_seed,
            "base": self.lm.resolved.identity,
            "chat": self.chat,
            **(extra or {}),
        }
        (path / "explainer.json").write_text(json.dumps(meta, indent=1))

    @staticmethod
    def meta(path: Path) -> dict[str, Any]:
        """What a checkpoint records beside its weights: config, widths, base model, n_train, optimizer steps."""
        return json.loads((path / "explainer.json").read_text())

    @staticmethod
    def step_counts(path: Path) -> list[tuple[str, float]]:
        """(metric, value) rows every evaluation reports with a trained explainer: `train_steps`, the optimizer
        steps run, and `best_step`, the step of the best validation, whose weights the checkpoint keeps
        (absent from checkpoints written before it was recorded), and `readout_steps`, the label-free warm-up's
        steps before them (where a checkpoint records it)."""
        meta = Explainer.meta(path)
        names = (("train_steps", "steps"), ("best_step", "best_step"), ("readout_steps", "readout_steps"))
        return [(name, float(meta[key])) for name, key in names if key in meta]

    @classmethod
    def load(cls, path: Path, device_override: str | None = None) -> "Explainer":
        """Rebuild an explainer saved with `save`."""
        meta = cls.meta(path)
        cfg = ExplainerConfig.model_validate(meta["config"])
        rotation = meta.get("rotation_seed")  # absent in checkpoints from before the control
        d_target = None if meta.get("text_only") else meta["d_target"]
        if device_override:
            cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"device": device_override})})
        if cfg.finetune == "full":
            model_cfg = cfg.model.model_copy(update={"name": str(path / "model")})
            lm = models.load(model_cfg, frozen=True)
            explainer = cls(lm, d_target, meta["n_target_layers"], cfg, rotation)
        else:
            from peft import PeftModel

            lm = models.load(cfg.model)
            full = cfg.model_copy(update={"finetune": "full"})
            explainer = cls(lm, d_target, meta["n_target_layers"], full, rotation)
            explainer.cfg = cfg
            explainer.model = PeftModel.from_pretrained(lm.model, path / "model").to(lm.runtime.device)
            models.store_frozen_linears(lm.model, lm.runtime)
        if explainer.proj is not None:
            saved = load_file(str(path / "projection.safetensors"))
            with torch.no_grad():
                explainer.proj.copy_(saved["proj"])
                if explainer.fitted:
                    explainer.fit_in_mean.copy_(saved["in_mean"])
                    explainer.fit_out_mean.copy_(saved["out_mean"])
                    explainer.fit_out_norm.copy_(saved["out_norm"])
        if explainer.on_manifold:
            saved = load_file(str(path / "layer_stats.safetensors"))
            with torch.no_grad():
                explainer.layer_mean.copy_(saved["mean"])
                explainer.layer_spread.copy_(saved["spread"])
                explainer.layer_centre.copy_(saved["centre"])
        return explainer


def _as_list(x: Any) -> list[int]:
    if x is None:
        return []
    return list(x) if isinstance(x, list | tuple) else [int(x)]


def _stopped(text: str) -> bool:
    return any(s in text for s in STOP_STRINGS)


def _cut(text: str) -> str:
    """The explanation up to the first stop string (through it, for the kept ones)."""
    ends = [text.find(s) + (len(s) if s in KEPT_STOP_STRINGS else 0) for s in STOP_STRINGS if s in text]
    return text[: min(ends or [len(text)])].strip()
