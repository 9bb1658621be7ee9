"""End to end against a real Prefect server: `selfexplain serve`, runs triggered the way the UI triggers them.

A module fixture starts `prefect server start` on 127.0.0.1 (SQLite in a private PREFECT_HOME) and
`selfexplain serve` beside it; the tests use the server's API exactly as the UI does.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from flows import VALIDATORS
from storage.catalog import connect_read_only
from storage.errors import UserInputError
from tasks.common.config import as_recipe
from tasks.recipes import RECIPES
from tests.factories import save_checkpoint, tiny_ablation_recipe, tiny_features_recipe, tiny_patching_recipe

SERVER_START_TIMEOUT_S = 240
RUN_TIMEOUT_S = 600
API_PATIENCE_S = 180
SERVER_LOGS: list[Path] = []  # the running server's log, quoted when it stops answering


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(predicate, timeout_s: float, what: str, every_s: float = 1.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every_s)
    raise TimeoutError(f"{what} within {timeout_s} s")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(api_url, ui_url, store, env) of a running server with every deployment served."""
    tmp = tmp_path_factory.mktemp("serve")
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp / "prefect"), "PREFECT_API_URL": api, "PREFECT_UI_API_URL": api,
           "PREFECT_SERVER_API_HOST": "127.0.0.1", "PREFECT_SERVER_API_PORT": str(port),
           "PREFECT_LOGGING_LEVEL": "WARNING",
           "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect.server.concurrency.lease_storage.filesystem"}  # fmt: skip
    logs = tmp / "logs"
    logs.mkdir()
    SERVER_LOGS.append(logs / "server.log")
    server = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=open(logs / "server.log", "w"), stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    serve = None
    try:
        _wait(lambda: _healthy(api), SERVER_START_TIMEOUT_S, "the Prefect server did not start")
        serve = subprocess.Popen(
            [sys.executable, "-m", "deploy.cli", "serve", "--home", str(tmp / "store")],
            env=env, cwd=Path(__file__).resolve().parents[2], stdout=open(logs / "serve.log", "w"),
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        _wait(lambda: len(_deployments(api)) >= 9, 120, "the deployments were not served")
        yield api, f"http://127.0.0.1:{port}", tmp / "store", env
    finally:
        for proc in (serve, server):
            if proc is not None:
                os.killpg(proc.pid, 15)
                proc.wait(timeout=30)


def _healthy(api: str) -> bool:
    try:
        return httpx.get(f"{api}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _call(method: str, url: str, **kwargs) -> httpx.Response:
    """One API call as Prefect's own client makes it: a timeout or a 503 (SQLite busy, or the server starved
    while flow-run processes import torch on two cores) is retried for up to API_PATIENCE_S; any other answer
    is returned as it is."""
    deadline = time.monotonic() + API_PATIENCE_S
    while True:
        try:
            response = httpx.request(method, url, timeout=30, **kwargs)
        except (httpx.TimeoutException, httpx.ConnectError) as exc:
            if time.monotonic() > deadline:
                tail = "".join(SERVER_LOGS[-1].read_text().splitlines(keepends=True)[-40:]) if SERVER_LOGS else ""
                raise TimeoutError(f"{method} {url}: no answer in {API_PATIENCE_S} s; server log:\n{tail}") from exc
        else:
            if response.status_code != 503 or time.monotonic() > deadline:
                return response
        time.sleep(2)


def _deployments(api: str) -> dict[str, dict]:
    rows = _call("POST", f"{api}/deployments/filter", json={}).json()
    return {d["name"]: d for d in rows}


def _trigger(api: str, deployment: str, parameters: dict) -> httpx.Response:
    """What the UI's 'Run' form does: POST the form's parameters to create a run of the deployment."""
    dep = _deployments(api)[deployment]
    return _call("POST", f"{api}/deployments/{dep['id']}/create_flow_run", json={"parameters": parameters})


def _run(api: str, run_id: str) -> dict:
    return _call("GET", f"{api}/flow_runs/{run_id}").json()


def _state(api: str, run_id: str) -> str:
    return _run(api, run_id)["state"]["type"]


def tiny_experiment_parameters(store: Path) -> dict:
    ablation = tiny_ablation_recipe(store).model_dump(mode="json")
    return {"recipe": {"home": str(store), "target": ablation["target"], "tasks": ["ablation"],
                       "grid": {"n_train": [4, 8], "seeds": [0]}, "ablation": ablation}}  # fmt: skip


def _bad_recipes(root: Path) -> dict[str, tuple[str, dict, str]]:
    """{name: (deployment, parameters, start of the one-line error)}: recipes the server's parameter schema
    takes, refused only by the flow's own recipe check (before it, each failed mid-run, e.g. with a KeyError)."""
    patching = tiny_patching_recipe(root / "patching").model_dump(mode="json")
    patching["eval"]["omission_roles"] = ["ghost"]
    ablation = tiny_ablation_recipe(root / "ablation").model_dump(mode="json")
    ablation["ablation"]["questions"] = str(root / "no-questions.jsonl")
    experiment = tiny_experiment_parameters(root / "experiment")["recipe"]
    experiment["tasks"] = ["patching"]
    experiment["patching"] = tiny_patching_recipe(root / "experiment").model_dump(mode="json")
    experiment["patching"]["patching"]["facts"] = str(root / "no-facts.jsonl")
    # cross-field mistakes (model validators) that the server's schema cannot see: the flow's own validation
    features = tiny_features_recipe(root / "features", root / "corpus.txt").model_dump(mode="json")
    features["sae"]["n_exemplars"] = 2  # below min_exemplars (5)
    cache = {"home": str(root / "cache"), "model": {"name": "tiny-llama"}, "corpus": {"context_length": 16},
             "cache": {"layers": [1], "positions_per_context": 40}}  # fmt: skip
    return {
        "patching": ("patching", {"recipe": patching}, "eval.omission_roles: ['ghost'] are not explainer roles; fix: "),
        "ablation": ("ablation", {"recipe": ablation}, f"ablation.questions: {root}/no-questions.jsonl does not exist"),
        "experiment": ("experiment", {"recipe": experiment},
                       f"patching.patching.facts: {root}/no-facts.jsonl does not exist; fix: "),
        "features": ("features", {"recipe": features},
                     "recipe field 'sae.n_exemplars': 2 is fewer than min_exemplars (5), so no feature would be kept"),
        "cache": ("cache-activations", {"recipe": cache}, "recipe field 'cache.positions_per_context': 40 asked but a "
                  "context of 16 tokens holds 15 storable positions"),
        "explain": ("explain", {"recipe": {"home": str(root / "explain"), "text": "Paris", "vector": "v.npy",
                                           "layer": 1}}, "recipe field 'text': text and vector to explain; fix: "),
    }  # fmt: skip


def test_a_bad_recipe_run_from_a_deployment_fails_at_once_in_one_line_and_writes_nothing(served):
    api, _, store, _ = served
    root = store.parent / "bad-recipes"
    bad = _bad_recipes(root)
    runs = {}
    for name, (deployment, parameters, _) in bad.items():
        created = _trigger(api, deployment, parameters)
        assert created.status_code == 201, created.text  # the schema takes it: only the flow's check can refuse it
        runs[name] = created.json()["id"]
    for name, run_id in runs.items():
        deployment, parameters, start = bad[name]
        _wait(lambda i=run_id: _state(api, i) in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"), RUN_TIMEOUT_S,
              f"the {name} run did not finish")  # fmt: skip
        run = _run(api, run_id)
        # the same line the CLI prints, as the run's state message; not retried; no task ran (no model loaded)
        with pytest.raises(UserInputError) as cli:
            VALIDATORS[deployment](as_recipe(RECIPES[deployment], parameters["recipe"]))
        assert str(cli.value).startswith(start), str(cli.value)
        message = run["state"]["message"]
        assert run["state"]["type"] == "FAILED" and message.endswith(f"UserInputError: {cli.value}"), message
        assert "\n" not in message and run["run_count"] == 1
        tasks = _call("POST", f"{api}/task_runs/filter", json={"flow_runs": {"id": {"any_": [run_id]}}})
        assert tasks.json() == []
    assert not root.exists()  # no store, no lock, no Prefect result under it


def test_deployments_forms_schedule_and_parameter_validation(served):
    api, _, store, _ = served
    deps = _deployments(api)
    assert {"cache-activations", "calibrate", "features", "patching", "ablation", "experiment", "explain", "bootstrap",
            "nightly-data-efficiency"} <= set(deps)  # fmt: skip
    nightly = deps["nightly-data-efficiency"]
    assert [s["schedule"]["cron"] for s in nightly["schedules"]] == ["0 2 * * *"]
    assert nightly["global_concurrency_limit"]["limit"] == 1
    # the nightly sweep carries the full experiment recipe (five sizes on a log grid)
    recipe = Path(__file__).resolve().parents[2] / "recipes" / "experiment_smollm2.yaml"
    shipped = yaml.safe_load(recipe.read_text())["grid"]["n_train"]
    assert nightly["parameters"]["recipe"]["grid"]["n_train"] == shipped == [16, 32, 64, 128, 256]
    # the form: the parameter schema carries every field's description
    schema = nightly["parameter_openapi_schema"]
    assert "recipe" in schema["properties"] and "GridConfig" in str(schema)
    assert "Training-set sizes (a log grid; nested subsets)." in str(schema)
    bad = _trigger(api, "experiment", {"recipe": {"grid": {"n_train": "lots"}}})
    assert bad.status_code == 409 and "n_train" in bad.text, bad.text


def test_the_explain_deployment_answers_in_a_table_artifact(served):
    api, _, store, _ = served
    root = store.parent / "explain-store"
    save_checkpoint(root, "tinyself")  # a features explainer (tiny-llama, layers 1 and 3)
    created = _trigger(api, "explain", {"recipe": {"home": str(root), "explainer": "tinyself", "text": "Paris",
                                                   "layer": 1, "position": "all"}})  # fmt: skip
    assert created.status_code == 201, created.text
    run_id = created.json()["id"]
    final = _wait(lambda: (s := _state(api, run_id)) in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") and s,
                  RUN_TIMEOUT_S, "the explain run did not finish")  # fmt: skip
    assert final == "COMPLETED", _run(api, run_id)["state"]
    artifacts = _call("POST", f"{api}/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [run_id]}}})
    (table,) = [a for a in artifacts.json() if a["key"] == "explanations"]
    rows = json.loads(table["data"]) if isinstance(table["data"], str) else table["data"]
    assert table["type"] == "table" and [(r["position"], r["token"]) for r in rows] == list(enumerate("Paris"))
    assert sorted(p.name for p in (root / "tables").iterdir()) == ["explainers"]  # nothing written by the run


def test_a_run_triggered_like_the_ui_completes_with_artifacts_and_metrics(served):
    api, _, store, _ = served
    created = _trigger(api, "experiment", tiny_experiment_parameters(store))
    assert created.status_code == 201, created.text
    run_id = created.json()["id"]
    final = _wait(lambda: (s := _state(api, run_id)) in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") and s,
                  RUN_TIMEOUT_S, "the run did not finish")  # fmt: skip
    assert final == "COMPLETED"
    artifacts = _call("POST", f"{api}/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [run_id]}}})
    artifacts = artifacts.json()
    by_key = {a["key"]: a for a in artifacts}
    assert by_key["ablation-metrics"]["type"] == "table" and "exact_match" in str(by_key["ablation-metrics"]["data"])
    assert (
        by_key["experiment-report"]["type"] == "markdown"
        and "Task C: input ablation" in by_key["experiment-report"]["data"]
    )
    assert any(a["type"] == "progress" for a in artifacts)
    gpu = _call("GET", f"{api}/v2/concurrency_limits/gpu").json()
    assert (gpu["limit"], gpu["active_slots"]) == (1, 0)  # the accelerator slot exists and was given back
    with connect_read_only(store) as con:
        rows = con.execute("select count(distinct n_train) from metrics where method = 'trained'").fetchone()
    assert rows == (2,)


def test_nightly_sweep_runs_one_at_a_time(served):
    api, _, store, _ = served
    params = tiny_experiment_parameters(store.parent / "nightly-store")
    ids = [_trigger(api, "nightly-data-efficiency", params).json()["id"] for _ in range(2)]
    seen_both_running = False
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline:
        states = [_state(api, i) for i in ids]
        seen_both_running |= states == ["RUNNING", "RUNNING"]
        if all(s in ("COMPLETED", "FAILED", "CRASHED") for s in states):
            break
        time.sleep(0.5)
    assert states == ["COMPLETED", "COMPLETED"] and not seen_both_running


def test_the_served_ui_lists_the_deployments_in_headless_chromium(served, tmp_path):
    """The deployments page rendered by Debian's chromium (installed by `make test`); a screenshot is kept."""
    _, ui, _, _ = served
    chromium = shutil.which("chromium")
    assert chromium, "chromium is missing: `make test` installs it (apt-get install chromium)"
    args = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--window-size=1400,1000", "--virtual-time-budget=20000"]  # fmt: skip
    shot = tmp_path / "deployments.png"
    subprocess.run([*args, f"--screenshot={shot}", f"{ui}/deployments"], check=True, capture_output=True, timeout=180)
    assert shot.stat().st_size > 10_000
    dom = subprocess.run([*args, "--dump-dom", f"{ui}/deployments"], check=True, capture_output=True, text=True,
                         timeout=180).stdout  # fmt: skip
    for name in ("nightly-data-efficiency", "patching", "ablation", "features", "experiment"):
        assert name in dom, name
