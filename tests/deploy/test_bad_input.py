"""The catalogue of bad inputs: each is one line naming the field and the fix, exit code 2, nothing written.

Every case runs the CLI in-process against a fresh store path under tmp_path and checks that the store was
never created (no directory, no catalog, no Prefect state of ours) and that stderr is exactly one line. An
expected line may name an input as {key} of the paths `_files` returns.
"""

import errno
import json
import os
import pickle
import shlex
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import storage.catalog
from deploy.cli import main
from flows import FLOWS, VALIDATORS
from flows.experiment import fan_out
from storage.catalog import refresh_catalog
from storage.errors import MAX_PART_CHARS, UserInputError
from storage.store import Dataset
from tasks.recipes import RECIPES
from tests.factories import ASKED, Payload, write_feature_archive

# The options that put a flow on the tiny test models, each a word of a case's command line.
TINY = {
    "{tiny}": ["--set", "model.name=tiny-llama", "--set", "model.autocast=none", "--set", "cache.layers=[1]"],
    "{tiny_features}": ["--set", "target.name=tiny-llama", "--set", "cache.layers=[1]"],
    "{tiny_calibrate}": ["--set", "target.name=tiny-llama", "--set", "explainer.model.name=tiny-llama"],
    "{tiny_patching}": ["--set", "target.name=tiny-llama", "--set", "explainers.self.model.name=tiny-llama",
                        "--set", "explainers.other.model.name=tiny-gemma3"],
}  # fmt: skip


def _files(tmp: Path) -> dict[str, str]:
    """Inputs the cases read (made before the run, so they are not 'written' by it)."""
    (tmp / "bad.yaml").write_text("model:\n  name: [unclosed\n")
    (tmp / "list.yaml").write_text("- model\n- cache\n")
    (tmp / "typo.yaml").write_text("model:\n  name: tiny-llama\ncache:\n  layers: [1]\n  batchsize: 4\n")
    (tmp / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    (tmp / "empty.txt").write_text("   \n\n")
    (tmp / "notext.jsonl").write_text(json.dumps({"body": "hello"}) + "\n")
    (tmp / "corpus.csv").write_text("a,b\n")
    (tmp / "noconfig").mkdir()
    model = tmp / "truncated-model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama"}))
    header = json.dumps({"w": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}}).encode()
    (model / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 100)
    (tmp / "saes").mkdir()
    pq.write_table(pa.table({"layer": [[1, 2]], "input_tokens": [["a"]]}), tmp / "act_patch_missing.parquet")
    # recipes PyYAML reads without complaint but a recipe may not hold
    (tmp / "tag.yaml").write_text("model:\n  name: !!python/object/apply:os.getcwd []\n")
    (tmp / "latin1.yaml").write_bytes("model:\n  name: caf\xe9\n".encode("latin-1"))
    (tmp / "utf16.yaml").write_bytes("model:\n  name: x\n".encode("utf-16"))
    (tmp / "recipes.d").mkdir()
    (tmp / "folder.yaml").mkdir()
    (tmp / "dup.yaml").write_text("cache:\n  layers: [1]\n  layers: [2]\n")
    (tmp / "dup_top.yaml").write_text("cache:\n  layers: [1]\ncache:\n  seed: 2\n")
    (tmp / "bool.yaml").write_text("cache:\n  layers: [true]\n")
    (tmp / "nullkey.yaml").write_text("null: 1\n")
    (tmp / "intkey.yaml").write_text("model:\n  1: x\n")
    (tmp / "yeskey.yaml").write_text("cache:\n  yes: 1\n")  # YAML 1.1 reads the key `yes` as true
    (tmp / "newline_key.yaml").write_text('"cache\\nlayers": 1\n')
    levels = [f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}" if i else "x"] * 9) + "]" for i in range(6)]
    (tmp / "bomb.yaml").write_text("\n".join(levels) + "\ncache:\n  layers: *l5\n")  # 9^6 values
    (tmp / "recursive.yaml").write_text("cache: &c\n  layers: *c\n")
    # local model folders whose config.json transformers cannot read
    for name, text in {"badjson-model": "{not json", "unknown-type-model": json.dumps({"model_type": "no-such-arch"}),
                       "list-config-model": "[1]", "no-type-model": json.dumps({"hidden_size": 4})}.items():  # fmt: skip
        (tmp / name).mkdir()
        (tmp / name / "config.json").write_text(text)
    # corpora whose records are not what the reader expects
    (tmp / "fake.parquet").write_text("not parquet at all")
    (tmp / "array.jsonl").write_text("[1, 2]\n")
    (tmp / "string.jsonl").write_text('"some text"\n')
    (tmp / "number_text.jsonl").write_text(json.dumps({"text": 5}) + "\n")
    (tmp / "null_text.jsonl").write_text(json.dumps({"text": None}) + "\n" + json.dumps({"text": "ok"}) + "\n")
    pq.write_table(pa.table({"text": [1, 2]}), tmp / "int_text.parquet")
    pq.write_table(pa.table({"text": pa.array([None, "ok"], pa.string())}), tmp / "null_text.parquet")
    (tmp / "fake_saved").mkdir()
    (tmp / "fake_saved" / "dataset_info.json").write_text("{}")
    (tmp / "fake_saved_dict").mkdir()
    (tmp / "fake_saved_dict" / "dataset_dict.json").write_text("garbage")
    (tmp / "shards").mkdir()
    (tmp / "shards" / "a.jsonl").write_text(json.dumps({"text": "hello"}) + "\n")
    (tmp / "shards" / "b.parquet").write_bytes(b"PAR1 truncated")
    # stores whose catalog cannot be opened or rebuilt
    (tmp / "corrupt_store").mkdir()
    (tmp / "corrupt_store" / "catalog.duckdb").write_bytes(b"not a duckdb file " * 500)
    (tmp / "folder_store" / "catalog.duckdb").mkdir(parents=True)
    (tmp / "file_store").write_text("a file, not a store")
    # corpora too small for the tokens asked, fact and question files a ground-truth stage cannot use
    (tmp / "small.txt").write_text("A short corpus. " * 8)
    pq.write_table(pa.table({"text": ["a few words"] * 5}), tmp / "small.parquet")
    (tmp / "few_facts.jsonl").write_text("".join(json.dumps({"subject": s, "relation": "capital", "object": o}) + "\n"
                                                 for s, o in [("France", "Paris"), ("Peru", "Lima")]))  # fmt: skip
    (tmp / "bad_facts.jsonl").write_text(json.dumps({"subject": "France", "relation": "capital", "object": "Paris"})
                                         + "\n{broken\n")  # fmt: skip
    # 30 two-letter documents: 450 bytes of JSON lines (the bound) but 90 byte tokens (the exact count)
    (tmp / "many_short.jsonl").write_text((json.dumps({"text": "ab"}) + "\n") * 30)
    # a features archive whose train explanations carry a callable (and a marker it would create)
    write_feature_archive(tmp / "bomb_archive", {1: np.ones((4, 64), dtype=np.float32)},
                          {"train": [(1, 0, "dogs")], "test": [(1, 1, "cats")]})  # fmt: skip
    (tmp / "bomb_archive" / "explanations" / "train_explanations.pkl").write_bytes(
        pickle.dumps([Payload(tmp / "bomb_ran")]))  # fmt: skip
    (tmp / "small_shards").mkdir()
    (tmp / "small_shards" / "a.txt").write_text("first shard ")
    (tmp / "small_shards" / "b.jsonl").write_text(json.dumps({"text": "second shard"}) + "\n")
    (tmp / "bad_answer.jsonl").write_text(json.dumps({"question": "?", "choices": ["a", "b", "c", "d"], "answer": 9})
                                          + "\n")  # fmt: skip
    return {k: str(tmp / v) for k, v in {
        "bad": "bad.yaml", "list": "list.yaml", "typo": "typo.yaml", "latin1": "latin1.txt", "empty": "empty.txt",
        "notext": "notext.jsonl", "csv": "corpus.csv", "noconfig": "noconfig", "truncated": "truncated-model",
        "saes": "saes", "missing_cols": "act_patch_missing.parquet", "tag": "tag.yaml", "latin1_yaml": "latin1.yaml",
        "utf16_yaml": "utf16.yaml", "recipes_d": "recipes.d", "folder_yaml": "folder.yaml", "dup": "dup.yaml",
        "dup_top": "dup_top.yaml", "bool": "bool.yaml", "nullkey": "nullkey.yaml", "intkey": "intkey.yaml",
        "yeskey": "yeskey.yaml", "newline_key": "newline_key.yaml", "bomb": "bomb.yaml", "recursive": "recursive.yaml",
        "badjson_model": "badjson-model", "unknown_type_model": "unknown-type-model",
        "list_config_model": "list-config-model", "no_type_model": "no-type-model", "fake_parquet": "fake.parquet",
        "array_jsonl": "array.jsonl", "string_jsonl": "string.jsonl", "number_text_jsonl": "number_text.jsonl",
        "null_text_jsonl": "null_text.jsonl", "int_text_parquet": "int_text.parquet",
        "null_text_parquet": "null_text.parquet", "fake_saved": "fake_saved", "fake_saved_dict": "fake_saved_dict",
        "shards": "shards", "corrupt_store": "corrupt_store", "folder_store": "folder_store",
        "file_store": "file_store", "small_txt": "small.txt", "small_parquet": "small.parquet",
        "few_facts": "few_facts.jsonl", "bad_facts": "bad_facts.jsonl", "bad_answer": "bad_answer.jsonl",
        "small_shards": "small_shards", "many_short": "many_short.jsonl", "bomb_archive": "bomb_archive",
        "no_archive": "no_archive"}.items()}  # fmt: skip


def _argv(command: str, files: dict[str, str], store: Path) -> list[str]:
    """A case's command line as the CLI's argv: split as a shell splits it, a TINY word replaced by its options,
    and in every other word each {key} filled in with that input's path, {store} with the run's store."""
    words = shlex.split(command)
    return [arg for word in words for arg in (TINY[word] if word in TINY else [word.format(**files, store=store)])]


# (id, the command line, the start of the one stderr line); the command's and the line's {key} as in _argv
CASES = [
    ("unknown-flow", "run nope --home {store}", "error: flow: unknown flow 'nope'"),
    ("recipe-missing", "run features -c /no/such.yaml --home {store}", "error: --config: recipe file '/no/such.yaml' not found"),
    ("yaml-malformed", "run features -c {bad} --home {store}", "error: --config: "),
    ("yaml-not-a-mapping", "run features -c {list} --home {store}", "error: --config: "),
    ("unknown-key-in-file", "run cache-activations -c {typo} --home {store}", "error: recipe field 'cache.batchsize': unknown key"),
    ("unknown-key-set", "run patching --set eval.n_trian=5 --home {store}", "error: recipe field 'eval.n_trian': unknown key"),
    ("wrong-type", "run cache-activations --set cache.layers=abc --home {store}", "error: recipe field 'cache.layers'"),
    ("negative-tokens", "run cache-activations --set corpus.n_tokens=-5 --home {store}", "error: recipe field 'corpus.n_tokens': input should be greater than 0"),
    ("set-without-equals", "run cache-activations --set cache.layers --home {store}", "error: --set: 'cache.layers' has no '='"),
    ("set-into-a-value", "run cache-activations --set model.name=x --set model.name.y=1 --home {store}", "error: --set model.name.y: 'name' is not a section"),
    ("unknown-model", "run cache-activations --set model.name=no-such-model --home {store}", "error: model.name: 'no-such-model' is not a registry name"),
    ("layer-out-of-range", "run cache-activations {tiny} --set cache.layers=[1,7] --home {store}", "error: cache.layers: layer 7 is out of range"),
    ("device-cuda-without-gpu", "run cache-activations {tiny} --set model.device=cuda --home {store}", "error: model.device: cuda requested but no GPU is visible"),
    ("device-unknown", "run cache-activations {tiny} --set model.device=tpu9 --home {store}", "error: model.device: 'tpu9' is not a device"),
    ("corpus-missing", "run cache-activations {tiny} --set corpus.source=/no/such.txt --home {store}", "error: corpus.source: /no/such.txt does not exist"),
    ("corpus-unsupported", "run cache-activations {tiny} --set corpus.source={csv} --home {store}", "error: corpus.source: "),
    ("corpus-not-utf8", "run cache-activations {tiny} --set corpus.source={latin1} --home {store}", "error: corpus.source: "),
    ("corpus-empty", "run cache-activations {tiny} --set corpus.source={empty} --home {store}", "error: corpus.source: "),
    ("corpus-no-text-field", "run cache-activations {tiny} --set corpus.source={notext} --home {store}", "error: corpus.text_field: "),
    ("corpus-unknown-builtin", "run cache-activations {tiny} --set corpus.source=builtin:wiki --home {store}", "error: corpus.source: unknown built-in corpus 'builtin:wiki'"),
    ("model-folder-without-config", "run cache-activations --set model.name={noconfig} --home {store}", "error: model.name: "),
    ("model-weights-truncated", "run cache-activations --set model.name={truncated} --home {store}", "error: model.name: "),
    ("sae-folder-without-saes", "run features {tiny_features} --set sae.load_from={saes} --home {store}", "error: sae.load_from: "),
    ("explainer-model-unknown", "run features {tiny_features} --set explainers.self.model.name=nope-model --home {store}", "error: explainers.self.model.name: 'nope-model' is not a registry name"),
    ("import-file-missing", "run patching {tiny_patching} --set patching.import_train=/no/train.parquet --set patching.import_test=/no/test.parquet --home {store}", "error: patching.import_train: /no/train.parquet does not exist"),
    ("import-half", "run patching {tiny_patching} --set patching.import_train={missing_cols} --home {store}", "error: patching.import_test: is missing"),
    ("import-missing-columns", "run patching {tiny_patching} --set patching.import_train={missing_cols} --set patching.import_test={missing_cols} --home {store}", "error: patching.import_train: "),
    ("unknown-role", "run patching {tiny_patching} --set eval.omission_roles=[ghost] --home {store}", "error: eval.omission_roles: ['ghost'] are not explainer roles"),
    ("unknown-rotated-role", "run patching {tiny_patching} --set eval.rotated_basis_roles=[ghost] --home {store}", "error: eval.rotated_basis_roles: ['ghost'] are not explainer roles"),
    ("ablation-has-no-basis", "run ablation {tiny_patching} --set eval.rotated_basis_roles=[self] --home {store}", "error: eval.rotated_basis_roles: ablation questions carry no vector"),
    ("ablation-has-no-activation", "run ablation {tiny_patching} --set eval.prompt_omissions=[no_activation] --home {store}", "error: eval.prompt_omissions: ablation questions carry no vector"),
    ("patching-layer-mean-at-the-embedding", "run patching {tiny_patching} --set explainers.self.vector_norm=layer_mean --home {store}", "error: explainers.self.vector_norm: 'layer_mean' writes a state of the target's own layer, which needs injection 'residual'"),
    ("ablation-layer-mean", "run ablation {tiny_patching} --set explainers.self.vector_norm=layer_mean --home {store}", "error: explainers.self.vector_norm: 'layer_mean' writes a vector, and ablation questions carry none; fix: use 'match'"),
    ("patching-readout-warm-up", "run patching {tiny_patching} --set explainers.self.readout_steps=4 --home {store}", "error: explainers.self.readout_steps: the readout warm-up names tokens at the features task's cached residuals, which patching has none of; fix: set it to 0"),
    ("calibrate-readout-warm-up", "run calibrate {tiny_calibrate} --set explainer.readout_steps=4 --home {store}", "error: explainer.readout_steps: calibration is the readout itself"),
    ("unknown-prompt-omission", "run patching {tiny_patching} --set eval.prompt_omissions=[no_vibes] --home {store}", "error: recipe field 'eval.prompt_omissions.0'"),
    ("residual-after-last-block", "run calibrate {tiny_calibrate} --set cache.layers=[1,3] --set calibration.injections=[residual] --home {store}", "error: explainer.injection: 'residual' writes target layer 3's vector after the explainer's last block"),
    ("early-add-after-last-block", "run features {tiny_features} --set explainers.self.model.name=tiny-llama --set explainers.self.injection=early_add --set explainers.self.inject_layer=3 --home {store}", "error: explainers.self.inject_layer: 3 leaves no block"),
    ("unknown-injection", "run calibrate {tiny_calibrate} --set calibration.injections=[lasers] --home {store}", "error: recipe field 'calibration.injections.0'"),
    ("experiment-size-zero", "run experiment --set grid.n_train=[0,8] --home {store}", "error: recipe field 'grid.n_train'"),
    ("experiment-task-section", "run experiment --set target.name=tiny-llama --set tasks=[patching] --set patching.explainers.self.model.name=nope --home {store}", "error: patching.explainers.self.model.name: "),
    ("sql-without-store", "sql 'select 1' --home {store}", "error: store: no catalog at"),
    ("report-without-experiment", "report --home {store}", "error: experiment: no finished experiment"),
    # --set values that are not YAML, or carry a tag
    ("set-yaml-unclosed", "run cache-activations --set cache.layers=[1 --home {store}", "error: --set cache.layers: the value '[1' is not valid YAML at line 1: expected ',' or ']'"),
    ("set-yaml-mapping-in-scalar", "run cache-activations --set 'model.name=a: b: c' --home {store}", "error: --set model.name: the value 'a: b: c' is not valid YAML at line 1: mapping values are not allowed here"),
    ("set-yaml-python-tag", "run cache-activations --set 'model.name=!!python/object/apply:os.getcwd []' --home {store}", "error: --set model.name: the value '!!python/object/apply:os.getcwd []' at line 1: the tag '!!python/object/apply:os.getcwd' is not allowed"),
    ("set-yaml-python-name-tag", "run cache-activations --set cache.layers=!!python/name:os.system --home {store}", "error: --set cache.layers: the value '!!python/name:os.system' at line 1: the tag '!!python/name:os.system' is not allowed"),
    ("yaml-python-tag-in-file", "run cache-activations -c {tag} --home {store}", "error: --config: {tag} at line 2: the tag '!!python/object/apply:os.getcwd' is not allowed"),
    # recipe files that are not UTF-8 text, or not files
    ("recipe-latin1", "run cache-activations -c {latin1_yaml} --home {store}", "error: --config: {latin1_yaml} is not UTF-8 text (byte 18); fix: save the recipe as UTF-8"),
    ("recipe-utf16", "run cache-activations -c {utf16_yaml} --home {store}", "error: --config: {utf16_yaml} is not UTF-8 text (byte 0)"),
    ("recipe-is-a-folder", "run cache-activations -c {recipes_d} --home {store}", "error: --config: '{recipes_d}' is a folder, not a recipe file"),
    ("recipe-is-a-folder-named-yaml", "run features -c {folder_yaml} --home {store}", "error: --config: '{folder_yaml}' is a folder, not a recipe file"),
    # -c given twice
    ("config-twice", "run cache-activations -c {typo} -c {bool} --home {store}", "error: -c/--config: given twice ('{typo}', then '{bool}')"),
    ("config-twice-same-file", "run features --config {typo} -c {typo} --home {store}", "error: -c/--config: given twice ('{typo}', then '{typo}')"),
    ("argument-unknown", "run features --bogus --home {store}", "error: selfexplain: unrecognized arguments: --bogus"),
    ("argument-missing", "run", "error: selfexplain run: the following arguments are required: flow"),
    # a key given twice
    ("duplicate-key-in-section", "run cache-activations -c {dup} --home {store}", "error: --config: {dup} at line 3: the key 'layers' is given twice (first at line 2); fix: give each key once"),
    ("duplicate-section", "run cache-activations -c {dup_top} --home {store}", "error: --config: {dup_top} at line 3: the key 'cache' is given twice (first at line 1)"),
    ("duplicate-key-in-set", "run cache-activations --set 'cache={{layers: [1], layers: [2]}}' --home {store}", "error: --set cache: the value '{{layers: [1], layers: [2]}}' at line 1: the key 'layers' is given twice"),
    ("duplicate-key-in-set-nested", "run features --set 'explainers={{self: {{lr: 0.1}}, self: {{lr: 0.2}}}}' --home {store}", "error: --set explainers: the value '{{self: {{lr: 0.1}}, self: {{lr: 0.2}}}}' at line 1: the key 'self' is given twice"),
    # true/false where a number is expected
    ("bool-layer-in-file", "run cache-activations -c {bool} --home {store}", "error: recipe field 'cache.layers': true/false is not a number; fix: give a valid value (got [True])"),
    ("bool-layer-set", "run cache-activations --set 'cache.layers=[1, true]' --home {store}", "error: recipe field 'cache.layers': true/false is not a number"),
    ("bool-int", "run features --set sae.seed=false --home {store}", "error: recipe field 'sae.seed': true/false is not a number"),
    ("bool-float-list", "run features --set eval.selfie_scales=[true] --home {store}", "error: recipe field 'eval.selfie_scales': true/false is not a number"),
    # inf and nan
    ("float-inf", "run features --set sae.lr=.inf --home {store}", "error: recipe field 'sae.lr': input should be a finite number; fix: give a valid value (got inf)"),
    ("float-nan", "run features --set sae.lr=.nan --home {store}", "error: recipe field 'sae.lr': input should be a finite number"),
    ("float-minus-inf-in-dict", "run features --set explainers.self.lr=-.inf --home {store}", "error: recipe field 'explainers.self.lr': input should be a finite number"),
    ("float-inf-in-list", "run features --set 'eval.selfie_scales=[1, .inf]' --home {store}", "error: recipe field 'eval.selfie_scales.1': input should be a finite number"),
    ("float-nan-optional", "run cache-activations --set model.memory_fraction=.nan --home {store}", "error: recipe field 'model.memory_fraction': input should be a finite number"),
    # a value repeated in a list
    ("repeated-seeds", "run experiment --set 'grid.seeds=[0, 0]' --home {store}", "error: recipe field 'grid.seeds': 0 is given twice"),
    ("repeated-n-train", "run experiment --set 'grid.n_train=[8, 16, 8]' --home {store}", "error: recipe field 'grid.n_train': 8 is given twice"),
    ("repeated-tasks", "run experiment --set 'tasks=[patching, patching]' --home {store}", "error: recipe field 'tasks': 'patching' is given twice"),
    ("repeated-layers", "run cache-activations --set 'cache.layers=[3, 1, 3]' --home {store}", "error: recipe field 'cache.layers': 3 is given twice"),
    ("repeated-injections", "run calibrate --set 'calibration.injections=[residual, residual]' --home {store}", "error: recipe field 'calibration.injections': 'residual' is given twice"),
    # the field as the user wrote it, on one line
    ("key-null", "run cache-activations -c {nullkey} --home {store}", "error: --config: {nullkey} at line 1: the key None is not a name"),
    ("key-number", "run cache-activations -c {intkey} --home {store}", "error: --config: {intkey} at line 2: the key 1 is not a name"),
    ("key-yaml-boolean", "run cache-activations -c {yeskey} --home {store}", "error: --config: {yeskey} at line 2: the key True is not a name"),
    ("key-with-newline", "run cache-activations -c {newline_key} --home {store}", "error: recipe field 'cache\\nlayers': unknown key"),
    ("set-empty-leaf", "run cache-activations --set cache.=5 --home {store}", "error: --set: 'cache.' has an empty key"),
    ("set-empty-key", "run cache-activations --set =5 --home {store}", "error: --set: '' has an empty key"),
    ("set-empty-middle", "run cache-activations --set cache..layers=[1] --home {store}", "error: --set: 'cache..layers' has an empty key"),
    ("union-member-not-in-path", "run calibrate --set 'calibration.injections=[embedding, lasers]' --home {store}", "error: recipe field 'calibration.injections.1': input should be"),
    ("long-value-truncated", "run cache-activations --set 'corpus.n_tokens=" + str(list(range(5000))) + "' --home {store}", "error: recipe field 'corpus.n_tokens': input should be a valid integer; fix: give a valid value (got [0, 1, 2, 3, 4, 5, ...])"),
    ("yaml-alias-bomb", "run cache-activations -c {bomb} --home {store}", "error: --config: {bomb} at line 5: its aliases expand to more than 10000 values"),
    ("yaml-recursive-alias", "run cache-activations -c {recursive} --home {store}", "error: --config: {recursive} at line 1: an alias refers to the value that holds it"),
    ("set-recursive-alias", "run cache-activations --set 'cache=&a {{layers: *a}}' --home {store}", "error: --set cache: the value '&a {{layers: *a}}' at line 1: an alias refers to the value that holds it"),
    # hub ids: the local HF cache only, at once
    ("hub-id-not-cached", "run cache-activations --set model.name=someorg/some-model --home {store}", "error: model.name: 'someorg/some-model' is not a registry name, a local folder, or a hub id in the local HF cache"),
    ("hub-id-invalid", "run cache-activations --set 'model.name=some org/some model' --home {store}", "error: model.name: 'some org/some model' is not a registry name, a local folder, or a hub id in the local HF cache"),
    ("hub-id-explainer", "run patching {tiny_patching} --set explainers.other.model.name=someorg/other --home {store}", "error: explainers.other.model.name: 'someorg/other' is not a registry name, a local folder, or a hub id in the local HF cache"),
    # local model folders whose config.json transformers cannot read
    ("model-config-not-json", "run cache-activations --set model.name={badjson_model} --home {store}", "error: model.name: {badjson_model}/config.json is not valid JSON (line 1)"),
    ("model-config-unknown-type", "run cache-activations --set model.name={unknown_type_model} --home {store}", "error: model.name: {unknown_type_model}/config.json names model_type 'no-such-arch', which transformers"),
    ("model-config-not-an-object", "run cache-activations --set model.name={list_config_model} --home {store}", "error: model.name: {list_config_model}/config.json holds a JSON list, not an object"),
    ("model-config-no-type", "run cache-activations --set model.name={no_type_model} --home {store}", "error: model.name: {no_type_model}/config.json is not a config transformers can load"),
    ("explainer-model-config-not-json", "run patching {tiny_patching} --set explainers.self.model.name={badjson_model} --home {store}", "error: explainers.self.model.name: {badjson_model}/config.json is not valid JSON"),
    # corpus records that are not what the reader expects
    ("corpus-parquet-not-parquet", "run cache-activations {tiny} --set corpus.source={fake_parquet} --home {store}", "error: corpus.source: {fake_parquet} is not a Parquet file"),
    ("corpus-jsonl-array", "run cache-activations {tiny} --set corpus.source={array_jsonl} --home {store}", "error: corpus.source: {array_jsonl}:1 is an array, not a JSON object"),
    ("corpus-jsonl-string", "run cache-activations {tiny} --set corpus.source={string_jsonl} --home {store}", "error: corpus.source: {string_jsonl}:1 is a string, not a JSON object"),
    ("corpus-jsonl-number-text", "run cache-activations {tiny} --set corpus.source={number_text_jsonl} --home {store}", "error: corpus.source: {number_text_jsonl}:1: 'text' is a number, not text"),
    ("corpus-jsonl-null-text", "run cache-activations {tiny} --set corpus.source={null_text_jsonl} --home {store}", "error: corpus.source: {null_text_jsonl}:1: 'text' is null, not text"),
    ("corpus-parquet-int-text", "run cache-activations {tiny} --set corpus.source={int_text_parquet} --home {store}", "error: corpus.source: {int_text_parquet}: column 'text' holds int64, not text"),
    ("corpus-parquet-null-text", "run cache-activations {tiny} --set corpus.source={null_text_parquet} --home {store}", "error: corpus.source: {null_text_parquet} row 1: 'text' is null, not text"),
    ("corpus-fake-save-to-disk", "run cache-activations {tiny} --set corpus.source={fake_saved} --home {store}", "error: corpus.source: {fake_saved} is not a readable datasets save_to_disk folder"),
    ("corpus-fake-save-to-disk-dict", "run cache-activations {tiny} --set corpus.source={fake_saved_dict} --home {store}", "error: corpus.source: {fake_saved_dict} is not a readable datasets save_to_disk folder"),
    ("corpus-folder-with-a-bad-shard", "run cache-activations {tiny} --set corpus.source={shards} --home {store}", "error: corpus.source: {shards}/b.parquet is not a Parquet file"),
    # catalogs that cannot be opened or rebuilt, and --timeout
    ("sql-catalog-corrupt", "sql 'select 1' --home {corrupt_store}", "error: store: {corrupt_store}/catalog.duckdb is not a DuckDB database file; fix: run `selfexplain catalog`"),
    ("sql-catalog-is-a-folder", "sql 'select 1' --home {folder_store}", "error: store: {folder_store}/catalog.duckdb is a folder, not a DuckDB catalog"),
    ("sql-store-is-a-file", "sql 'select 1' --home {file_store}", "error: store: {file_store} is a file, not a store folder"),
    ("catalog-is-a-folder", "catalog --home {folder_store}", "error: store: {folder_store}/catalog.duckdb is a folder, not a DuckDB catalog"),
    ("catalog-store-is-a-file", "catalog --home {file_store}", "error: store: {file_store} is a file, not a store folder"),
    ("sql-timeout-inf", "sql 'select 1' --timeout inf --home {store}", "error: --timeout: 'inf' is not a number of seconds >= 0 (0: no limit)"),
    ("sql-timeout-overflow", "sql 'select 1' --timeout 1e999 --home {store}", "error: --timeout: '1e999' is not a number of seconds >= 0"),
    ("sql-timeout-negative", "sql 'select 1' --timeout -1 --home {store}", "error: --timeout: '-1' is not a number of seconds >= 0"),
    ("sql-timeout-nan", "sql 'select 1' --timeout nan --home {store}", "error: --timeout: 'nan' is not a number of seconds >= 0"),
    ("sql-timeout-word", "sql 'select 1' --timeout soon --home {store}", "error: --timeout: 'soon' is not a number of seconds >= 0"),
    # counts, sizes and seeds past a sane bound (a 400-digit batch size once loaded the model and wrote a cache)
    ("batch-size-400-digits", "run cache-activations {tiny} --set cache.batch_size=" + "9" * 400 + " --home {store}", "error: recipe field 'cache.batch_size': input should be less than or equal to 65536; fix: give a valid value (got 9999"),
    ("explainer-batch-size-huge", "run features {tiny_features} --set explainers.self.batch_size=1000000 --home {store}", "error: recipe field 'explainers.self.batch_size': input should be less than or equal to 65536"),
    ("patching-batch-size-huge", "run patching {tiny_patching} --set patching.batch_size=" + "1" * 40 + " --home {store}", "error: recipe field 'patching.batch_size': input should be less than or equal to 65536"),
    ("sae-batch-tokens-huge", "run features {tiny_features} --set sae.batch_tokens=99999999999 --home {store}", "error: recipe field 'sae.batch_tokens': input should be less than or equal to 1048576"),
    ("n-tokens-past-the-bound", "run calibrate {tiny_calibrate} --set corpus.n_tokens=10000000000000 --home {store}", "error: recipe field 'corpus.n_tokens': input should be less than or equal to 1000000000000"),
    ("seed-negative", "run cache-activations {tiny} --set cache.seed=-1 --home {store}", "error: recipe field 'cache.seed': input should be greater than or equal to 0"),
    ("grid-seed-too-large", "run experiment --set 'grid.seeds=[0, 4294967296]' --home {store}", "error: recipe field 'grid.seeds.1': input should be less than or equal to 4294967295"),
    # more tokens than the corpus holds
    ("n-tokens-beyond-a-text-file", "run cache-activations {tiny} --set corpus.source={small_txt} --home {store}", "error: corpus.n_tokens: 100000 tokens asked but the corpus {small_txt} holds at most 128 (at most a token per byte of its 128 bytes); fix: lower corpus.n_tokens to at most 128"),
    ("n-tokens-beyond-a-parquet-file", "run features {tiny_features} --set corpus.source={small_parquet} --set corpus.n_tokens=5000 --home {store}", "error: corpus.n_tokens: 5000 tokens asked but the corpus {small_parquet} holds at most 0 (at most a token per byte of its 55 bytes); fix: add text, or shorten the contexts"),
    ("n-tokens-beyond-a-folder", "run calibrate {tiny_calibrate} --set cache.layers=[1] --set corpus.source={small_shards} --set corpus.context_length=8 --home {store}", "error: corpus.n_tokens: 100000 tokens asked but the corpus {small_shards} holds at most 40 (at most a token per byte of its 37 bytes)"),
    ("n-tokens-between-the-exact-count-and-the-bound", "run cache-activations {tiny} --set corpus.source={many_short} --set corpus.n_tokens=256 --set corpus.context_length=8 --home {store}", "error: corpus.n_tokens: 256 tokens asked but the corpus {many_short} holds only 90; fix: lower corpus.n_tokens to at most 96, or add text"),
    ("n-tokens-between-the-exact-count-and-the-bound-in-features", "run features {tiny_features} --set corpus.source={many_short} --set corpus.n_tokens=384 --home {store}", "error: corpus.n_tokens: 384 tokens asked but the corpus {many_short} holds only 90; fix: add text, or shorten the contexts"),
    ("explain-an-empty-store", "explain --home {store} --text Paris --layer 1", "error: explainer: the store {store} holds no trained features explainer of role 'self'; fix: "),
    ("explain-two-questions", "explain --home {store} --text Paris --vector v.npy --layer 1", "error: recipe field 'text': text and vector to explain; fix: give exactly one of text, feature or vector"),
    ("explain-nothing", "explain --home {store} --layer 1", "error: recipe field 'text': nothing to explain; fix: "),
    ("explain-text-without-a-layer", "explain --home {store} --text Paris", "error: recipe field 'layer': missing; fix: "),
    ("explain-feature-not-layer-slash-id", "explain --home {store} --feature 3x", "error: recipe field 'feature': string should match pattern"),
    ("explain-position-not-an-index", "explain --home {store} --text Paris --layer 1 --position last", "error: --position: 'last' is not a token index or 'all'"),
    ("explain-unknown-key", "explain --home {store} --explainer abc123 --text Paris --layer 1", "error: explainer: 'abc123' is neither a checkpoint key of the store {store} nor a checkpoint folder"),
    ("bootstrap-an-empty-store", "run bootstrap --home {store}", "error: explainer: the store {store} holds no trained features explainer of role 'self'; fix: "),
    ("bootstrap-a-sample-of-one", "run bootstrap --set n_sample=1 --home {store}", "error: recipe field 'n_sample': input should be greater than 1"),
    ("import-archive-missing", "run features {tiny_features} --set sae.import_archive={no_archive} --home {store}", "error: sae.import_archive: {no_archive}/features/layer_1.pkl does not exist"),
    ("import-archive-with-load-from", "run features {tiny_features} --set sae.import_archive={no_archive} --set sae.load_from=x --home {store}", "error: recipe field 'sae.import_archive': given with load_from; fix: "),
    ("import-archive-carrying-a-callable", "run features {tiny_features} --set sae.import_archive={bomb_archive} --home {store}", "error: sae.import_archive: {bomb_archive}/explanations/train_explanations.pkl is refused: it names pathlib"),
    ("n-tokens-beyond-the-builtin-corpus", "run cache-activations {tiny} --set corpus.n_tokens=1000000000000 --home {store}", "error: corpus.n_tokens: 1000000000000 tokens asked but the corpus builtin:python-docs holds at most "),
    ("n-tokens-beyond-the-corpus-in-experiment", "run experiment --set target.name=tiny-llama --set tasks=[features] --set features.cache.layers=[1] --set features.corpus.source={small_txt} --home {store}", "error: features.corpus.n_tokens: 100000 tokens asked but the corpus {small_txt} holds at most 128"),
    # a store root no run can use, from --home or the recipe, refused before anything is created
    ("run-home-is-a-file", "run cache-activations {tiny} --home {file_store}", "error: store: {file_store} is a file, not a store folder; fix: point --home (or the recipe's home, or $SELFEXPLAIN_HOME) at a folder"),
    ("run-home-is-a-file-patching", "run patching {tiny_patching} --home {file_store}", "error: store: {file_store} is a file, not a store folder"),
    ("run-home-is-a-file-ablation", "run ablation {tiny_patching} --set home={file_store}", "error: store: {file_store} is a file, not a store folder"),
    ("run-home-is-a-file-experiment", "run experiment --home {file_store}", "error: store: {file_store} is a file, not a store folder"),
    ("run-home-is-a-file-calibrate", "run calibrate {tiny_calibrate} --home {file_store}", "error: store: {file_store} is a file, not a store folder"),
    ("run-home-under-a-file", "run features {tiny_features} --home {file_store}/store", "error: store: {file_store} is a file, so no store can be made at {file_store}/store"),
    ("run-catalog-is-a-folder", "run cache-activations {tiny} --home {folder_store}", "error: store: {folder_store}/catalog.duckdb is a folder, not a DuckDB catalog"),
    # positions per context beyond a context, exemplars fewer than the minimum: fields that must agree
    ("positions-beyond-a-context", "run cache-activations {tiny} --set corpus.context_length=16 --set cache.positions_per_context=16 --home {store}", "error: recipe field 'cache.positions_per_context': 16 asked but a context of 16 tokens holds 15 storable positions (skip_first 1); fix: use at most 15, or null to store all"),
    ("positions-beyond-a-context-features", "run features {tiny_features} --set cache.skip_first=100 --set cache.positions_per_context=50 --home {store}", "error: recipe field 'cache.positions_per_context': 50 asked but a context of 128 tokens holds 28 storable positions (skip_first 100)"),
    ("positions-beyond-a-context-experiment", "run experiment --set features.cache.positions_per_context=500 --home {store}", "error: recipe field 'features.cache.positions_per_context': 500 asked but a context of 128 tokens holds 127"),
    ("skip-first-skips-all", "run calibrate --set corpus.context_length=32 --set cache.skip_first=32 --home {store}", "error: recipe field 'cache.skip_first': 32 skips all 32 positions of a context; fix: lower it below corpus.context_length"),
    ("exemplars-fewer-than-min", "run features {tiny_features} --set sae.n_exemplars=5 --home {store}", "error: recipe field 'sae.n_exemplars': 5 is fewer than min_exemplars (10), so no feature would be kept; fix: keep at least 10 exemplars, or lower min_exemplars"),
    ("steps-cap-under-floor", "run patching {tiny_patching} --set explainers.self.min_steps=64 --set explainers.self.max_steps=32 --home {store}", "error: recipe field 'explainers.self.max_steps': 32 is below min_steps (64), so the step floor would not hold; fix: raise max_steps to 64 or more, or lower min_steps"),
    ("steps-cap-under-floor-experiment", "run experiment --set features.explainers.other.min_steps=300 --set features.explainers.other.max_steps=200 --home {store}", "error: recipe field 'features.explainers.other.max_steps': 200 is below min_steps (300)"),
    ("exemplars-fewer-than-min-experiment", "run experiment --set features.sae.min_exemplars=50 --home {store}", "error: recipe field 'features.sae.n_exemplars': 20 is fewer than min_exemplars (50)"),
    # fact and question files, read before the target is loaded
    ("facts-missing", "run patching {tiny_patching} --set patching.facts=/no/facts.jsonl --home {store}", "error: patching.facts: /no/facts.jsonl does not exist; fix: point it at a facts .jsonl"),
    ("facts-counterfact-missing", "run patching {tiny_patching} --set patching.facts=/no/counterfact.json --home {store}", "error: patching.facts: /no/counterfact.json does not exist"),
    ("facts-folder", "run patching {tiny_patching} --set patching.facts={saes} --home {store}", "error: patching.facts: {saes} is a folder, not a file"),
    ("facts-not-json", "run patching {tiny_patching} --set patching.facts={bad_facts} --home {store}", "error: patching.facts: {bad_facts}:2 is not JSON; fix: fix that line"),
    ("facts-too-few-to-pair", "run patching {tiny_patching} --set patching.facts={few_facts} --home {store}", "error: patching.facts: no relation offers 5 distinct objects in both splits"),
    ("facts-missing-in-experiment", "run experiment --set target.name=tiny-llama --set tasks=[patching] --set patching.patching.facts=/no/f.jsonl --home {store}", "error: patching.patching.facts: /no/f.jsonl does not exist"),
    ("chunks-beyond-the-layers", "run patching {tiny_patching} --set patching.n_chunks=9 --home {store}", "error: patching.n_chunks: 9 chunks for 4 layers; fix: use 1..4"),
    ("questions-missing", "run ablation {tiny_patching} --set ablation.questions=/no/q.jsonl --home {store}", "error: ablation.questions: /no/q.jsonl does not exist; fix: point it at an MMLU-format .jsonl or .parquet file"),
    ("questions-bad-answer", "run ablation {tiny_patching} --set ablation.questions={bad_answer} --home {store}", "error: ablation.questions: {bad_answer}:1: answer 9 is not 0, 1, 2 or 3"),
    ("questions-not-parquet", "run ablation {tiny_patching} --set ablation.questions={fake_parquet} --home {store}", "error: ablation.questions: {fake_parquet} is not a Parquet file"),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, capsys, case):
    _, command, expected = case
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    files = _files(inputs)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    store = tmp_path / "store"
    assert main(_argv(command, files, store)) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith(expected.format(**files, store=store)), err
    assert "; fix: " in err, err
    assert len(err) < 3 * MAX_PART_CHARS + 20  # long values are cut, never printed whole
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before  # no store, no catalog, nothing


@pytest.fixture
def catalogued(tmp_path) -> Path:
    ds = Dataset(tmp_path / "store", "numbers", "k")
    ds.create({})
    ds.write_shard(0, pa.table({"x": [1, 2, 3]}))
    ds.mark_complete({})
    refresh_catalog(tmp_path / "store")
    return tmp_path / "store"


@pytest.mark.parametrize(
    "query, expected",
    [("create table t as select 1", "error: query: create statements are refused"),
     ("copy numbers to '/tmp/selfexplain-leak.csv'", "error: query: copy statements are refused"),
     ("select * from read_csv('/etc/passwd')", "error: query: Permission Error"),
     ("attach '/tmp/x.duckdb'", "error: query: attach statements are refused"),
     ("install httpfs", "error: query: load statements are refused"),
     ("selec 1", "error: query: Parser Error")],
)  # fmt: skip
def test_bad_sql_is_one_line_exit_2_and_nothing_written(catalogued, capsys, query, expected):
    before = sorted(str(p) for p in catalogued.rglob("*"))
    assert main(["sql", query, "--home", str(catalogued)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith(expected), err
    assert sorted(str(p) for p in catalogued.rglob("*")) == before
    assert not Path("/tmp/selfexplain-leak.csv").exists()


def test_sql_on_a_catalog_another_process_writes_is_one_line(catalogued, capsys):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time, duckdb; c = duckdb.connect(sys.argv[1]); print('held', flush=True); "
         "time.sleep(120)", str(catalogued / "catalog.duckdb")],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        before = sorted(str(p) for p in catalogued.rglob("*"))
        for query in ("select 1", "show tables", "select count(*) from numbers"):
            assert main(["sql", query, "--home", str(catalogued)]) == 2
            err = capsys.readouterr().err
            expected = f"error: store: {catalogued}/catalog.duckdb is locked by another process (PID {holder.pid})"
            assert len(err.strip().splitlines()) == 1 and err.startswith(expected), err
        assert sorted(str(p) for p in catalogued.rglob("*")) == before
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("home", ["store", "store/not-made-yet"])
def test_catalog_of_a_read_only_store_is_one_line(catalogued, capsys, monkeypatch, home):
    # os.access is what the CLI asks first (a read-only mount or folder); root passes it, so it is faked here
    root = catalogued.parent / home
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: real_access(p, mode) and Path(p) != catalogued)
    before = sorted(str(p) for p in catalogued.parent.rglob("*"))
    assert main(["catalog", "--home", str(root)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (f"error: store: {catalogued} is read-only; fix: make the store writable, or copy it and "
                           "point --home at the copy")  # fmt: skip
    assert sorted(str(p) for p in catalogued.parent.rglob("*")) == before


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES, errno.EPERM])
def test_catalog_refused_a_write_is_one_line(catalogued, capsys, monkeypatch, code):
    # a write refused although os.access allowed it (a remount since, ACLs): the refusal, not a traceback
    def refuse(root: Path) -> Path:
        raise OSError(code, os.strerror(code), str(root / ".catalog.duckdb.tmp-1"))

    monkeypatch.setattr(storage.catalog, "refresh_catalog", refuse)
    assert main(["catalog", "--home", str(catalogued)]) == 2
    err = capsys.readouterr().err
    assert err.strip().startswith(
        f"error: store: {catalogued}/.catalog.duckdb.tmp-1 cannot be written ({os.strerror(code)}); fix: "
    ), err


@pytest.mark.parametrize("name", ["someorg/some-model", "HuggingFaceTB/not-cached-here"])
def test_an_uncached_hub_id_fails_at_once_without_the_network(tmp_path, capsys, monkeypatch, name):
    # With the hub allowed (and pointed at a port nothing listens on), nothing is looked up: no retries.
    import huggingface_hub.constants as hf

    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf, "ENDPOINT", "http://127.0.0.1:9")
    start = time.monotonic()
    assert main(["run", "cache-activations", "--set", f"model.name={name}", "--home", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert time.monotonic() - start < 5, "looked the id up on the hub"
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"error: model.name: '{name}' is not a registry name, a local folder, or a hub id in the "
                          "local HF cache; fix: ")  # fmt: skip
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("flow", sorted(FLOWS))
def test_every_flow_runs_its_recipe_check_first_and_is_never_retried(tmp_path, flow):
    # a run started from a deployment (the UI, the API, a schedule) skips the CLI: the flow's own first step is
    # the check the CLI runs, so bad input fails that run the same way, before anything is written
    (tmp_path / "afile").write_text("not a store")
    recipe = RECIPES[flow].model_validate({**ASKED.get(flow, {}), "home": str(tmp_path / "afile")})
    with pytest.raises(UserInputError) as by_the_cli:
        VALIDATORS[flow](recipe)
    with pytest.raises(UserInputError) as by_the_flow:
        FLOWS[flow].fn(recipe)  # the flow's body, without Prefect
    assert str(by_the_flow.value) == str(by_the_cli.value)
    assert str(by_the_flow.value).startswith(f"store: {tmp_path}/afile is a file, not a store folder; fix: ")
    assert [p.name for p in tmp_path.iterdir()] == ["afile"]
    assert FLOWS[flow].retries == 0 and fan_out.retries == 0  # bad input fails once, whatever the Prefect default
