"""The catalogue of bad inputs: each is one line naming the field and the fix, exit code 2, nothing written.

Every case runs the CLI in-process against a fresh store path under tmp_path and checks that the store was
never created (no directory, no catalog, no Prefect state of ours) and that stderr is exactly one line.
"""

import json
import struct
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from deploy.cli import main
from storage.catalog import refresh_catalog
from storage.store import Dataset

TINY = ["--set", "model.name=tiny-llama", "--set", "model.autocast=none", "--set", "cache.layers=[1]"]
TINY_FEATURES = ["--set", "target.name=tiny-llama", "--set", "cache.layers=[1]"]
TINY_CALIBRATE = ["--set", "target.name=tiny-llama", "--set", "explainer.model.name=tiny-llama"]
TINY_PATCHING = ["--set", "target.name=tiny-llama", "--set", "explainers.self.model.name=tiny-llama",
                 "--set", "explainers.other.model.name=tiny-gemma3"]  # fmt: skip


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
    return {k: str(tmp / v) for k, v in {
        "bad": "bad.yaml", "list": "list.yaml", "typo": "typo.yaml", "latin1": "latin1.txt", "empty": "empty.txt",
        "notext": "notext.jsonl", "csv": "corpus.csv", "noconfig": "noconfig", "truncated": "truncated-model",
        "saes": "saes", "missing_cols": "act_patch_missing.parquet"}.items()}  # fmt: skip


# (id, argv given the input paths f and the store s, the start of the one stderr line)
CASES = [
    ("unknown-flow", lambda f, s: ["run", "nope", "--home", s], "error: flow: unknown flow 'nope'"),
    ("recipe-missing", lambda f, s: ["run", "features", "-c", "/no/such.yaml", "--home", s], "error: --config: recipe file '/no/such.yaml' not found"),
    ("yaml-malformed", lambda f, s: ["run", "features", "-c", f["bad"], "--home", s], "error: --config: "),
    ("yaml-not-a-mapping", lambda f, s: ["run", "features", "-c", f["list"], "--home", s], "error: --config: "),
    ("unknown-key-in-file", lambda f, s: ["run", "cache-activations", "-c", f["typo"], "--home", s], "error: recipe field 'cache.batchsize': unknown key"),
    ("unknown-key-set", lambda f, s: ["run", "patching", "--set", "eval.n_trian=5", "--home", s], "error: recipe field 'eval.n_trian': unknown key"),
    ("wrong-type", lambda f, s: ["run", "cache-activations", "--set", "cache.layers=abc", "--home", s], "error: recipe field 'cache.layers'"),
    ("negative-tokens", lambda f, s: ["run", "cache-activations", "--set", "corpus.n_tokens=-5", "--home", s], "error: recipe field 'corpus.n_tokens': input should be greater than 0"),
    ("set-without-equals", lambda f, s: ["run", "cache-activations", "--set", "cache.layers", "--home", s], "error: --set: 'cache.layers' has no '='"),
    ("set-into-a-value", lambda f, s: ["run", "cache-activations", "--set", "model.name=x", "--set", "model.name.y=1", "--home", s], "error: --set model.name.y: 'name' is not a section"),
    ("unknown-model", lambda f, s: ["run", "cache-activations", "--set", "model.name=no-such-model", "--home", s], "error: model.name: 'no-such-model' is not a registry name"),
    ("layer-out-of-range", lambda f, s: ["run", "cache-activations", *TINY, "--set", "cache.layers=[1,7]", "--home", s], "error: cache.layers: layer 7 is out of range"),
    ("device-cuda-without-gpu", lambda f, s: ["run", "cache-activations", *TINY, "--set", "model.device=cuda", "--home", s], "error: model.device: cuda requested but no GPU is visible"),
    ("device-unknown", lambda f, s: ["run", "cache-activations", *TINY, "--set", "model.device=tpu9", "--home", s], "error: model.device: 'tpu9' is not a device"),
    ("corpus-missing", lambda f, s: ["run", "cache-activations", *TINY, "--set", "corpus.source=/no/such.txt", "--home", s], "error: corpus.source: /no/such.txt does not exist"),
    ("corpus-unsupported", lambda f, s: ["run", "cache-activations", *TINY, "--set", f"corpus.source={f['csv']}", "--home", s], "error: corpus.source: "),
    ("corpus-not-utf8", lambda f, s: ["run", "cache-activations", *TINY, "--set", f"corpus.source={f['latin1']}", "--home", s], "error: corpus.source: "),
    ("corpus-empty", lambda f, s: ["run", "cache-activations", *TINY, "--set", f"corpus.source={f['empty']}", "--home", s], "error: corpus.source: "),
    ("corpus-no-text-field", lambda f, s: ["run", "cache-activations", *TINY, "--set", f"corpus.source={f['notext']}", "--home", s], "error: corpus.text_field: "),
    ("corpus-unknown-builtin", lambda f, s: ["run", "cache-activations", *TINY, "--set", "corpus.source=builtin:wiki", "--home", s], "error: corpus.source: unknown built-in corpus 'builtin:wiki'"),
    ("model-folder-without-config", lambda f, s: ["run", "cache-activations", "--set", f"model.name={f['noconfig']}", "--home", s], "error: model.name: "),
    ("model-weights-truncated", lambda f, s: ["run", "cache-activations", "--set", f"model.name={f['truncated']}", "--home", s], "error: model.name: "),
    ("sae-folder-without-saes", lambda f, s: ["run", "features", *TINY_FEATURES, "--set", f"sae.load_from={f['saes']}", "--home", s], "error: sae.load_from: "),
    ("explainer-model-unknown", lambda f, s: ["run", "features", *TINY_FEATURES, "--set", "explainers.self.model.name=nope-model", "--home", s], "error: explainers.self.model.name: 'nope-model' is not a registry name"),
    ("import-file-missing", lambda f, s: ["run", "patching", *TINY_PATCHING, "--set", "patching.import_train=/no/train.parquet", "--set", "patching.import_test=/no/test.parquet", "--home", s], "error: patching.import_train: /no/train.parquet does not exist"),
    ("import-half", lambda f, s: ["run", "patching", *TINY_PATCHING, "--set", f"patching.import_train={f['missing_cols']}", "--home", s], "error: patching.import_test: is missing"),
    ("import-missing-columns", lambda f, s: ["run", "patching", *TINY_PATCHING, "--set", f"patching.import_train={f['missing_cols']}", "--set", f"patching.import_test={f['missing_cols']}", "--home", s], "error: patching.import_train: "),
    ("unknown-role", lambda f, s: ["run", "patching", *TINY_PATCHING, "--set", "eval.ablation_roles=[ghost]", "--home", s], "error: eval.ablation_roles: ['ghost'] are not explainer roles"),
    ("unknown-rotated-role", lambda f, s: ["run", "patching", *TINY_PATCHING, "--set", "eval.rotated_basis_roles=[ghost]", "--home", s], "error: eval.rotated_basis_roles: ['ghost'] are not explainer roles"),
    ("ablation-has-no-basis", lambda f, s: ["run", "ablation", *TINY_PATCHING, "--set", "eval.rotated_basis_roles=[self]", "--home", s], "error: eval.rotated_basis_roles: ablation questions carry no vector"),
    ("ablation-has-no-activation", lambda f, s: ["run", "ablation", *TINY_PATCHING, "--set", "eval.prompt_ablations=[no_activation]", "--home", s], "error: eval.prompt_ablations: ablation questions carry no vector"),
    ("unknown-prompt-ablation", lambda f, s: ["run", "patching", *TINY_PATCHING, "--set", "eval.prompt_ablations=[no_vibes]", "--home", s], "error: recipe field 'eval.prompt_ablations.0'"),
    ("residual-after-last-block", lambda f, s: ["run", "calibrate", *TINY_CALIBRATE, "--set", "cache.layers=[1,3]", "--set", "calibration.injections=[residual]", "--home", s], "error: explainer.injection: 'residual' writes target layer 3's vector after the explainer's last block"),
    ("early-add-after-last-block", lambda f, s: ["run", "features", *TINY_FEATURES, "--set", "explainers.self.model.name=tiny-llama", "--set", "explainers.self.injection=early_add", "--set", "explainers.self.inject_layer=3", "--home", s], "error: explainers.self.inject_layer: 3 leaves no block"),
    ("unknown-injection", lambda f, s: ["run", "calibrate", *TINY_CALIBRATE, "--set", "calibration.injections=[lasers]", "--home", s], "error: recipe field 'calibration.injections.0'"),
    ("experiment-size-zero", lambda f, s: ["run", "experiment", "--set", "grid.n_train=[0,8]", "--home", s], "error: recipe field 'grid.n_train'"),
    ("experiment-task-section", lambda f, s: ["run", "experiment", "--set", "target.name=tiny-llama", "--set", "tasks=[patching]", "--set", "patching.explainers.self.model.name=nope", "--home", s], "error: patching.explainers.self.model.name: "),
    ("sql-without-store", lambda f, s: ["sql", "select 1", "--home", s], "error: store: no catalog at"),
    ("report-without-experiment", lambda f, s: ["report", "--home", s], "error: experiment: no finished experiment"),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, capsys, case):
    _, argv, expected = case
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    files = _files(inputs)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    store = tmp_path / "store"
    assert main(argv(files, str(store))) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith(expected) and "; fix: " in err, err
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
