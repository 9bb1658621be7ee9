"""The continuous-token explainer: an LM that reads a vector through a placeholder embedding and explains it.

The prompt carries the span ``[s] [v] [e]`` (three special tokens). Before the decoder runs, the input
embedding at the payload token ``[v]`` is *replaced* by u = Π_ℓ v (or v itself when the explainer and the
target share a width), ℓ being the target layer the vector came from. The replacement builds a new tensor
with torch.where, so it cannot be lost to an out-of-place op whose result is discarded (PAPER.md R7, R9).

Convention (R10): what enters block 0 at the payload is u. Gemma multiplies token embeddings by √d inside
its embedding module; inputs_embeds bypass that module, so u is not scaled again. With vector_norm
'embedding' u is rescaled to the mean norm of the embedding module's outputs, so vectors of any source
(unit SAE directions, raw activations, differences) arrive at the scale the model expects.

Loss (R1-R4): prompt and answer are tokenised separately and concatenated; labels are -100 on the prompt;
the answer ends with EOS (end of turn for chat explainers), which is trained on; the loss is the mean
cross-entropy over answer tokens. Base templates end in a space: we move it onto the answer (R2), so the
generation prefix equals the training prefix token for token.
"""

import json
import os
import random
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from storage.errors import UserInputError
from storage.store import Dataset
from tasks import models
from tasks.config import ExplainerConfig

SPAN_TOKENS = ("<|sx_begin|>", "<|sx_payload|>", "<|sx_end|>")
SPAN = "".join(SPAN_TOKENS)
STOP_STRINGS = (" [END]", "\n", ">>>.")
KEPT_STOP_STRINGS = (">>>.",)  # ends an outcome sentence ("... <<<X>>>."): part of the answer, kept
CHAT_SYSTEM_PROMPT = "You are a helpful assistant that explains the internal features of language models."

# PAPER.md §3.2: base templates, each ending in exactly one space; {feature} is the span, {layer} an integer.
FEATURE_TEMPLATES_BASE = (
    "At layer {layer}, {feature} encodes ",
    "{feature} activates at layer {layer} for ",
    "We can describe {feature} at layer {layer} as encoding ",
    "Generate a description of this feature at layer {layer}: {feature}. ",
    "What does {feature} encode at layer {layer}? ",
    "{feature} activates at layer {layer} for inputs with the following features: ",
)
# Chat explainers: a user turn, then the label as the assistant turn.
FEATURE_TEMPLATES_CHAT = (
    "Generate a description of this feature at layer {layer}: {feature}.",
    "What does {feature} encode at layer {layer}?",
    "{feature} activates at layer {layer} for inputs with the following features:",
)


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


# The layer phrase of the templates above ("At layer {layer}, ", " at layer {layer}"): the '- layer' ablation
# removes it, which leaves a grammatical question.
FEATURE_LAYER_PHRASE = re.compile(r"At layer \{layer\}, | at layer \{layer\}")


def feature_queries(
    vectors: np.ndarray,
    layers: Sequence[int],
    labels: Sequence[str | None],
    ids: Sequence[str],
    chat: bool,
    seed: int,
    mode: str = "trained",
) -> list[Query]:
    """Feature-description queries, one template drawn per example with a seeded RNG (R5). mode 'no_layer'
    drops the layer phrase; 'no_activation' puts "this feature" in place of the placeholder, so the query
    carries no vector."""
    templates = FEATURE_TEMPLATES_CHAT if chat else FEATURE_TEMPLATES_BASE
    rng = random.Random(seed)
    out = []
    for v, layer, label, ex in zip(vectors, layers, labels, ids, strict=True):
        template = rng.choice(templates)
        if mode == "no_layer":
            template = FEATURE_LAYER_PHRASE.sub("", template)
        if mode == "no_activation":  # words in place of the placeholder: "What does this feature encode ...?"
            text = template.format(feature="this feature", layer=layer)
            out.append(Query(None, int(layer), text[0].upper() + text[1:], label, ex))
        else:
            out.append(Query(np.asarray(v, dtype=np.float32), int(layer), template.format(feature=SPAN, layer=layer),
                             label, ex))  # fmt: skip
    return out


class Explainer(nn.Module):
    """An LM (possibly peft-wrapped) plus the projections Π_ℓ and the placeholder mechanism."""

    def __init__(
        self, lm: models.LoadedModel, d_target: int | None, n_target_layers: int, cfg: ExplainerConfig
    ) -> None:
        """d_target None: a text-only explainer (no vectors, no projection)."""
        super().__init__()
        self.lm, self.cfg = lm, cfg
        self.tokenizer = lm.tokenizer
        self.chat = cfg.format == "chat" or (cfg.format == "auto" and lm.tokenizer.chat_template is not None)
        d_target = lm.d_model if d_target is None else d_target
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
        self.proj: nn.Parameter | None = None
        if cfg.projection == "always" or d_e != d_target:
            g = torch.Generator().manual_seed(cfg.seed)
            # Π_ℓ ∈ R^{d_E x d_M}, one per target layer, random init (the paper's non-pretrained variant).
            w = torch.randn(n_target_layers, d_e, d_target, generator=g) / d_target**0.5
            self.proj = nn.Parameter(w.to(lm.runtime.device))
        self.model = lm.model
        if cfg.finetune == "lora":
            torch.manual_seed(cfg.seed)  # LoRA's A matrices draw from the global RNG: same seed, same init
            self._wrap_lora()

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

    def inject(
        self,
        input_ids: torch.Tensor,
        vectors: torch.Tensor,
        layers: torch.Tensor,
        n_payloads: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """inputs_embeds [B, T, d_E]: token embeddings with the payload row replaced by u = Π_ℓ v.

        input_ids [B, T]; vectors [B, d_M] (float32, as stored); layers [B] (target layer indices);
        n_payloads [B]: payload tokens each row must hold (0 for text-only rows; default payloads_per_query).
        """
        embeds = self.model.get_input_embeddings()(input_ids)  # [B, T, d_E]
        is_payload = input_ids == self.payload_id  # [B, T]
        counts = is_payload.sum(dim=1)
        if n_payloads is None:
            n_payloads = torch.full_like(counts, self.payloads_per_query)
        if not bool((counts == n_payloads.to(counts.device)).all()):  # R12: payloads survived tokenisation
            raise ValueError(f"expected {n_payloads.tolist()} payload token(s) per row, got {counts.tolist()}")
        u = vectors.to(device=embeds.device, dtype=torch.float32)  # [B, d_M]
        if self.proj is not None:
            u = torch.einsum("bed,bd->be", self.proj[layers.to(self.proj.device)].float(), u)  # [B, d_E]
        if self.cfg.vector_norm == "embedding":
            u = u / u.norm(dim=-1, keepdim=True).clamp_min(1e-6) * self.embedding_norm
        return torch.where(is_payload.unsqueeze(-1), u.unsqueeze(1).to(embeds.dtype), embeds)

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
        with self.lm.runtime.autocast_context():
            return self.model(
                inputs_embeds=self.inject(input_ids, vectors, layers, n_payloads),
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=False,
                logits_to_keep=logits_to_keep,
            )

    # -- tokenisation ---------------------------------------------------------------------------------------

    def prompt_ids(self, q: Query) -> list[int]:
        """Token ids up to where the answer starts: identical at training and generation time (R2)."""
        if self.chat:
            system = CHAT_SYSTEM_PROMPT if q.system is None else q.system
            messages = [{"role": "system", "content": system}, {"role": "user", "content": q.text}]
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            return self.tokenizer(text + q.prefix.rstrip(" "), add_special_tokens=False)["input_ids"]
        return self.tokenizer((q.text + q.prefix).rstrip(" "), add_special_tokens=True)["input_ids"]

    def answer_ids(self, answer: str) -> list[int]:
        """The answer's ids plus EOS (R3); base answers carry the template's trailing space (R2)."""
        text = answer.replace(self.tokenizer.eos_token, "").strip()
        if not self.chat:
            text = " " + text
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]

    def training_example(self, q: Query) -> tuple[list[int], list[int]]:
        """(input_ids, labels) with labels -100 over the prompt: the loss mask is the answer span (R1)."""
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
        for q in queries:  # R12 on the text side: a payload placeholder iff a vector
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
        """Mean cross-entropy over answer tokens (R4: padding does not change an example's weight).

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
            save_file({"proj": self.proj.detach().cpu().contiguous()}, str(path / "projection.safetensors"))
        meta = {
            "config": self.cfg.model_dump(),
            "d_target": self.d_target,
            "n_target_layers": self.n_target_layers,
            "base": self.lm.resolved.identity,
            "chat": self.chat,
            **(extra or {}),
        }
        (path / "explainer.json").write_text(json.dumps(meta, indent=1))

    @classmethod
    def load(cls, path: Path, device_override: str | None = None) -> "Explainer":
        """Rebuild an explainer saved with `save`."""
        meta = json.loads((path / "explainer.json").read_text())
        cfg = ExplainerConfig.model_validate(meta["config"])
        if device_override:
            cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"device": device_override})})
        if cfg.finetune == "full":
            model_cfg = cfg.model.model_copy(update={"name": str(path / "model")})
            lm = models.load(model_cfg)
            explainer = cls(lm, meta["d_target"], meta["n_target_layers"], cfg)
        else:
            from peft import PeftModel

            lm = models.load(cfg.model)
            explainer = cls(lm, meta["d_target"], meta["n_target_layers"], cfg.model_copy(update={"finetune": "full"}))
            explainer.cfg = cfg
            explainer.model = PeftModel.from_pretrained(lm.model, path / "model").to(lm.runtime.device)
        if explainer.proj is not None:
            with torch.no_grad():
                explainer.proj.copy_(load_file(str(path / "projection.safetensors"))["proj"])
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


@dataclass
class TrainResult:
    """What a training run did, for the `runs`/`metrics` tables."""

    steps: int
    epochs_run: int
    best_epoch: int
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


def train(
    explainer: Explainer,
    train_set: Sequence[Query],
    val_set: Sequence[Query],
    progress=None,
    state_path: Path | None = None,
) -> TrainResult:
    """AdamW at a constant LR; keeps the weights of the epoch with the best validation loss (early stop).

    With `state_path`, the loop saves its whole state after every epoch (trainable weights, optimiser, data-
    order and torch RNGs, losses, the best epoch's weights) and a restarted run resumes after the last saved
    epoch: a killed run repeats at most one epoch, and reaches the same weights as an uninterrupted one.
    """
    cfg = explainer.cfg
    if not train_set:
        raise UserInputError("explainer", "no training examples", "give the stage more ground truth")
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    params = [p for p in explainer.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    log: dict[str, Any] = {"epoch": 0, "train_losses": [], "val_losses": [], "best": float("inf"), "best_epoch": 0,
                           "best_state": None, "steps": 0, "n_tokens": 0, "stopped": False}  # fmt: skip
    if state_path is not None and state_path.exists():
        saved = torch.load(state_path, weights_only=False)
        explainer.load_state_dict({**explainer.state_dict(), **saved["weights"]})
        opt.load_state_dict(saved["optimizer"])
        rng.setstate(saved["rng"])
        torch.set_rng_state(saved["torch_rng"])
        log = saved["log"]
    t0 = time.perf_counter()
    n_batches = -(-len(train_set) // cfg.batch_size)
    for epoch in range(log["epoch"], 0 if log["stopped"] else cfg.epochs):
        explainer.model.train()
        total = 0.0
        for i, qs in enumerate(batches(train_set, cfg.batch_size, rng)):
            batch = explainer.collate(qs, train=True)
            loss = explainer.loss(batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item()
            log["steps"] += 1
            log["n_tokens"] += int(batch["attention_mask"].sum())
            if progress:
                progress(
                    (epoch * n_batches + i + 1) / (cfg.epochs * n_batches), f"epoch {epoch} loss {loss.item():.3f}"
                )
        log["train_losses"].append(total / n_batches)
        val = evaluate_loss(explainer, val_set) if val_set else log["train_losses"][-1]
        log["val_losses"].append(val)
        log["epoch"] = epoch + 1
        if val < log["best"]:
            log["best"], log["best_epoch"] = val, epoch
            log["best_state"] = {k: v.detach().clone() for k, v in explainer.state_dict().items()
                                 if _trainable(explainer, k)}  # fmt: skip
        elif val_set:
            log["stopped"] = True  # validation loss rose: stop, keep the best epoch
        if state_path is not None:
            _save_train_state(state_path, explainer, opt, rng, log)
        if log["stopped"]:
            break
    if log["best_state"] is not None:
        explainer.load_state_dict({**explainer.state_dict(), **log["best_state"]})
    explainer.model.eval()
    return TrainResult(log["steps"], len(log["train_losses"]), log["best_epoch"], log["train_losses"],
                       log["val_losses"], log["n_tokens"] / max(time.perf_counter() - t0, 1e-9))  # fmt: skip


def _save_train_state(path: Path, explainer: Explainer, opt: torch.optim.Optimizer, rng: random.Random,
                      log: dict[str, Any]) -> None:  # fmt: skip
    weights = {k: v.detach().clone() for k, v in explainer.state_dict().items() if _trainable(explainer, k)}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save({"weights": weights, "optimizer": opt.state_dict(), "rng": rng.getstate(),
                "torch_rng": torch.get_rng_state(), "log": log}, tmp)  # fmt: skip
    tmp.replace(path)


def _trainable(explainer: Explainer, key: str) -> bool:
    params = dict(explainer.named_parameters())
    return key in params and params[key].requires_grad


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


def train_to_checkpoint(
    out: Dataset,
    cfg: ExplainerConfig,
    d_target: int | None,
    n_target_layers: int,
    make_queries: Callable[["Explainer"], Sequence[Query]],
    meta: dict[str, Any],
    progress=None,
) -> dict[str, Any]:
    """Train an explainer of a target (width d_target) on `make_queries(explainer)` (a seeded `val_fraction`
    held out for early stopping); write its checkpoint and loss history under `out`; mark it complete."""
    explainer = Explainer(models.load(cfg.model), d_target, n_target_layers, cfg)
    queries = make_queries(explainer)
    order = np.random.default_rng(cfg.seed).permutation(len(queries))
    n_val = int(round(cfg.val_fraction * len(queries)))
    out.create({"stage": "explainer", "config": cfg.model_dump(), **meta})
    state = out.path / "_train_state.pt"  # per-epoch resume point; removed once the checkpoint is written
    result = train(explainer, [queries[i] for i in order[n_val:]], [queries[i] for i in order[:n_val]], progress,
                   state)  # fmt: skip
    explainer.save(out.path / "checkpoint", {**meta, "n_train": len(queries)})
    n = result.epochs_run
    out.write_shard(0, pa.table({"role": [meta.get("role", "")] * n, "explainer_model": [cfg.model.name] * n,
                                 "epoch": list(range(n)), "train_loss": result.train_loss,
                                 "val_loss": result.val_loss}))  # fmt: skip
    summary = {**meta, "n_train": len(queries), "best_epoch": result.best_epoch, "steps": result.steps,
               "tokens_per_s": result.tokens_per_s, "model": cfg.model.name}  # fmt: skip
    out.mark_complete(summary)
    state.unlink(missing_ok=True)
    return summary
