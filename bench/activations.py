"""Benchmark the activation cache: tokens/s of our cache beside a bare forward pass and SAELens' runner.

All three run in one process on the same model, runtime (device, dtype, autocast) and token contexts, in
alternation (A B C A B C ...), and the medians are compared:

  cache      tasks.common.activations.write_activations: forward to the deepest layer + Parquet shards + manifest
  forward    the bare HF forward pass of the whole model (all layers, LM head), what a user would time first
  depth      the same forward stopped after the deepest cached block, nothing stored: cache / depth is the
             price of storage (Parquet, checksums, manifest)
  saelens    sae_lens.CacheActivationsRunner (model_class_name=AutoModelForCausalLM on the same local folder,
             which SAELens wraps in HookedProxyLM). It caches one hook per run, so the figure for L layers is
             L runs. SAELens stops the forward at the hooked layer too (`stop_at_layer`).

The agreement check compares our stored vectors with SAELens' for the same tokens. Peak memory: the cache
runs again in two fresh processes, on 1x and 10x the tokens; each reports its peak RSS while caching, and the
ratio should be flat (shards stream to disk; nothing grows with the corpus). Ends with one line per figure:
`RESULT <name> <value> goal <goal>`.

    .venv/bin/python bench/activations.py [--quick]
"""

import argparse
import logging
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from storage.store import Dataset  # noqa: E402
from tasks.common import (
    corpus,  # noqa: E402
    models,  # noqa: E402
)
from tasks.common.activations import residual_stream, write_activations  # noqa: E402
from tasks.common.config import CacheConfig, CorpusConfig, ModelConfig  # noqa: E402


def bench_cache(lm, cfg: CacheConfig, tokens: Dataset, root: Path, round_: int) -> float:
    out = Dataset(root, "activations", f"bench-{round_}")
    t0 = time.perf_counter()
    write_activations(lm, cfg, tokens, out)
    return time.perf_counter() - t0


@torch.inference_mode()
def bench_forward(lm, ids: np.ndarray, batch_size: int) -> float:
    t0 = time.perf_counter()
    for start in range(0, len(ids), batch_size):
        batch = torch.tensor(ids[start : start + batch_size], dtype=torch.long, device=lm.runtime.device)
        with lm.runtime.autocast_context():
            lm.model(input_ids=batch, use_cache=False)
    return time.perf_counter() - t0


@torch.inference_mode()
def bench_depth(lm, ids: np.ndarray, batch_size: int, layers: list[int]) -> float:
    t0 = time.perf_counter()
    for start in range(0, len(ids), batch_size):
        residual_stream(lm, torch.tensor(ids[start : start + batch_size], dtype=torch.long), layers)
    return time.perf_counter() - t0


def saelens_runners(lm, ids: np.ndarray, layers: list[int], batch_size: int, root: Path):
    """One SAELens runner per layer (it caches a single hook per run); model loading happens here, untimed."""
    import datasets
    from sae_lens import CacheActivationsRunner, CacheActivationsRunnerConfig

    logging.getLogger("sae_lens").setLevel(logging.WARNING)
    ds = datasets.Dataset.from_dict({"input_ids": ids.tolist()})
    runners = []
    for layer in layers:
        cfg = CacheActivationsRunnerConfig(
            dataset_path="(in-memory)",
            model_name=lm.resolved.source,
            model_class_name="AutoModelForCausalLM",
            hook_name=f"model.layers.{layer}",
            d_in=lm.d_model,
            training_tokens=ids.size,
            context_size=ids.shape[1],
            model_batch_size=batch_size,
            new_cached_activations_path=str(root / f"saelens-{layer}"),
            shuffle=False,
            dtype="float16",
            device=str(lm.runtime.device),
            prepend_bos=False,  # our contexts already start with BOS
            autocast_lm=lm.runtime.autocast is not None,
            streaming=False,
            # Its default 2 GB buffer would cycle our small dataset to fill it; use our shard size instead.
            buffer_size_gb=(64 * ids.shape[1] * lm.d_model * 2 + 1) / 1e9,
        )
        runners.append(CacheActivationsRunner(cfg, override_dataset=ds))
    return runners


def bench_saelens(runners) -> tuple[float, list]:
    t0 = time.perf_counter()
    outputs = []
    for r in runners:
        path = Path(r.cfg.new_cached_activations_path)
        shutil.rmtree(path, ignore_errors=True)
        outputs.append(r.run())
    return time.perf_counter() - t0, outputs


def rss_child(model: str, contexts: int, context_length: int, layers: list[int], batch_size: int) -> None:
    """Tokenise and cache `contexts` contexts in this fresh process. Prints the resident set size once the
    model is loaded and its peak while tokenising and caching (MiB; sampled every 20 ms from /proc, since
    ru_maxrss would report the larger transient peak of loading the GGUF)."""
    import gc
    import os
    import threading

    def rss_mib() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    lm = models.load(ModelConfig(name=model), frozen=True)
    gc.collect()
    loaded, peak, done = rss_mib(), [0.0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_mib())
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    root = Path(tempfile.mkdtemp(prefix="selfexplain-bench-rss-"))
    corpus_cfg = CorpusConfig(n_tokens=contexts * context_length, context_length=context_length)
    cache_cfg = CacheConfig(layers=layers, batch_size=batch_size, contexts_per_shard=64, skip_first=1)
    tokens = Dataset(root, "tokens", "rss")
    corpus.write_tokens(lm.tokenizer, corpus_cfg, tokens, cache_cfg.contexts_per_shard)
    write_activations(lm, cache_cfg, tokens, Dataset(root, "activations", "rss"))
    done.set()
    sampler.join()
    shutil.rmtree(root, ignore_errors=True)
    print(f"RSS {loaded:.0f} {peak[0]:.0f}")


def peak_rss(args: argparse.Namespace, contexts: int) -> tuple[float, float]:
    """(MiB once the model is loaded, peak MiB while caching) of a fresh process caching `contexts` contexts."""
    import subprocess

    cmd = [sys.executable, __file__, "--rss-child", str(contexts), "--model", args.model, "--context-length",
           str(args.context_length), "--batch-size", str(args.batch_size), "--layers", *map(str, args.layers)]  # fmt: skip
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    loaded, peak = next(line for line in out.splitlines() if line.startswith("RSS ")).split()[1:]
    return float(loaded), float(peak)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--contexts", type=int, default=256)
    p.add_argument("--context-length", type=int, default=128)
    p.add_argument("--layers", type=int, nargs="+", default=[3, 15])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="64 contexts, 2 rounds")
    p.add_argument("--rss-child", type=int, default=0, help=argparse.SUPPRESS)  # internal: one RSS measurement
    args = p.parse_args()
    if args.rss_child:
        return rss_child(args.model, args.rss_child, args.context_length, args.layers, args.batch_size)
    if args.quick:
        args.contexts, args.rounds = 64, 2

    torch.manual_seed(0)
    lm = models.load(ModelConfig(name=args.model), frozen=True)  # as the cache stage loads it
    root = Path(tempfile.mkdtemp(prefix="selfexplain-bench-"))
    n_tokens = args.contexts * args.context_length
    corpus_cfg = CorpusConfig(n_tokens=n_tokens, context_length=args.context_length)
    cache_cfg = CacheConfig(layers=args.layers, batch_size=args.batch_size, contexts_per_shard=64, skip_first=1)
    tokens = Dataset(root, "tokens", "bench")
    corpus.write_tokens(lm.tokenizer, corpus_cfg, tokens, cache_cfg.contexts_per_shard)
    ids = corpus.tokenize_contexts(lm.tokenizer, corpus_cfg)  # [contexts, L], the same token ids
    runners = saelens_runners(lm, ids, args.layers, args.batch_size, root)
    print(f"model {lm.resolved.identity}  runtime {lm.runtime.precision} on {lm.runtime.device}  "
          f"{n_tokens} tokens x layers {args.layers}  threads {torch.get_num_threads()}", flush=True)  # fmt: skip

    times: dict[str, list[float]] = {"cache": [], "forward": [], "depth": [], "saelens": []}
    sae_outputs = None
    for r in range(args.rounds):  # alternate, so drift in machine load hits all three alike
        times["cache"].append(bench_cache(lm, cache_cfg, tokens, root, r))
        times["forward"].append(bench_forward(lm, ids, args.batch_size))
        times["depth"].append(bench_depth(lm, ids, args.batch_size, args.layers))
        t, sae_outputs = bench_saelens(runners)
        times["saelens"].append(t)
        print(f"round {r}: " + "  ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()), flush=True)
    tps = {k: n_tokens / statistics.median(v) for k, v in times.items()}

    # Agreement: our stored vectors vs SAELens' for the same (context, position), deepest layer.
    import duckdb

    deepest = max(args.layers)
    files = [str(f) for f in Dataset(root, "activations", "bench-0").shard_files()]
    ours = (
        duckdb.connect()
        .execute(
            f"select context_id, position, activation from read_parquet({files}) where layer = {deepest} "
            "and context_id < 4 order by context_id, position"
        )
        .fetchnumpy()
    )
    theirs = np.asarray(sae_outputs[args.layers.index(deepest)][:4][f"model.layers.{deepest}"], dtype=np.float32)
    ours_v = np.stack(ours["activation"]).astype(np.float32)
    theirs_v = theirs[ours["context_id"], ours["position"]]
    rel = float(np.abs(ours_v - theirs_v).max() / np.abs(theirs_v).max())
    print(f"agreement: max |ours - saelens| / max |saelens| = {rel:.2e} over {len(ours_v)} vectors at layer {deepest}")

    del runners, sae_outputs, lm
    rss = {scale: peak_rss(args, scale * args.contexts) for scale in (1, 10)}
    for scale, (loaded, peak) in rss.items():
        print(f"peak RSS caching {scale}x = {scale * n_tokens} tokens: {peak:.0f} MiB ({loaded:.0f} MiB once loaded)")

    print("tokens/s  " + "  ".join(f"{k} {v:.0f}" for k, v in tps.items()))
    print(f"RESULT cache_tokens_per_s {tps['cache']:.0f} goal none")
    print(f"RESULT cache_vs_forward {tps['cache'] / tps['forward']:.2f} goal 0.9")
    print(f"RESULT cache_vs_forward_to_depth {tps['cache'] / tps['depth']:.2f} goal 0.9")
    print(f"RESULT cache_vs_saelens {tps['cache'] / tps['saelens']:.2f} goal 2.0")
    print(f"RESULT agreement_rel_max_diff {rel:.2e} goal 1e-2")
    print(f"RESULT cache_peak_rss_10x_over_1x {rss[10][1] / rss[1][1]:.2f} goal 1.1")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
