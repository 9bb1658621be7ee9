"""Text completion from a prompted LM: a local model (registry name or HF folder) or an OpenAI-compatible
endpoint (`openai:<model>`, base URL from config or $OPENAI_BASE_URL, key from $OPENAI_API_KEY). Greedy /
temperature 0 everywhere. Used by the `llm` labeler and the LM judge."""

import json
import os
import urllib.request
from collections.abc import Sequence

import torch

from storage.errors import UserInputError
from tasks.common.config import ModelConfig


def complete(
    prompts: Sequence[str], model: str, field: str, base_url: str | None = None, max_new_tokens: int = 16
) -> list[str]:
    """One completion per prompt, first line only. `field` names the config key in error messages."""
    if model.startswith("openai:"):
        return [_openai(p, model.removeprefix("openai:"), field, base_url, max_new_tokens) for p in prompts]
    from tasks.common import models

    lm = models.load(ModelConfig(name=model), frozen=True)
    tok = lm.tokenizer
    tok.padding_side = "left"
    out: list[str] = []
    for start in range(0, len(prompts), 16):
        enc = tok(list(prompts[start : start + 16]), return_tensors="pt", padding=True).to(lm.runtime.device)
        with torch.inference_mode(), lm.runtime.autocast_context():
            gen = lm.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
        out += [
            tok.decode(row, skip_special_tokens=True).strip().split("\n")[0]
            for row in gen[:, enc["input_ids"].shape[1] :]
        ]
    return out


def _openai(prompt: str, model: str, field: str, base_url: str | None, max_tokens: int) -> str:
    base = base_url or os.environ.get("OPENAI_BASE_URL", "https://api.openai.com/v1")
    key = os.environ.get("OPENAI_API_KEY")
    if not key:
        raise UserInputError(field, "an OpenAI-compatible model needs a key", "set OPENAI_API_KEY")
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "temperature": 0,
            "max_tokens": max_tokens}  # fmt: skip
    req = urllib.request.Request(
        base.rstrip("/") + "/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.load(resp)["choices"][0]["message"]["content"].strip()
