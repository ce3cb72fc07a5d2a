"""The ``lancet`` command line (typer).

    lancet run --config FILE [--set a.b=c ...]   the correction flow, then a before/after table
    lancet compare --config FILE                 IBO and every baseline on the same ranking
    lancet serve [--config FILE]                 both flows as deployments, in this process
    lancet ui                                    MLflow UI (127.0.0.1:5000) + Prefect UI (127.0.0.1:4200)
    lancet server                                the same two servers, headless, for Dask/Ray workers
    lancet report RUN_ID                         self-contained HTML report of an MLflow run
    lancet inspect --config FILE [--query ID]    the training samples behind one unsafe output
    lancet config show|validate                  the resolved configuration

A bad configuration value fails before any work starts: the message names the field path
and what was expected, and the exit code is 2. Any :class:`LancetUserError` (bad config, data,
model, paths, a locked run folder) prints one ``error: ...`` line and exits 2 without a
traceback; ``--debug`` (or ``LANCET_DEBUG=1``) shows the traceback. Prefect and MLflow are imported lazily so
``lancet config ...`` answers at once.
"""

from __future__ import annotations

import lancet_core  # noqa: F401  (environment defaults first)

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from lancet_core.config import ConfigError, LancetConfig, expand_env, load_config, redact
from lancet_core.errors import LancetUserError
from lancet_core.links import HOST, MLFLOW_PORT, PREFECT_PORT  # `lancet ui`'s ports, defined with the links


def debug_enabled() -> bool:
    return os.environ.get("LANCET_DEBUG", "").lower() in ("1", "true", "yes")


class _App(typer.Typer):
    """Typer whose entry point turns a user error into one line and exit code 2."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(*args, **kwargs)
        except LancetUserError as err:
            if debug_enabled():
                raise
            err_console.print(f"[bold red]error:[/] {escape(str(err))}")
            sys.exit(2)


app = _App(name="lancet", help="LANCET: find the training data behind unsafe outputs and correct the model.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
config_app = typer.Typer(help="Show or validate a configuration.", no_args_is_help=True)
app.add_typer(config_app, name="config")

console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)

ConfigOpt = typer.Option(None, "--config", "-c", help="YAML config file (default: built-in defaults).")
SetOpt = typer.Option(None, "--set", "-s", help="Override a value: --set influence.damping=0.01 (repeatable).")



# ------------------------------------------------------------------------------ helpers
def fail(message: str, code: int = 1) -> None:
    if message.lower().startswith("error:"):  # one prefix, never "error: error: ..."
        message = message[len("error:"):].lstrip()
    err_console.print(f"[bold red]error:[/] {escape(message)}")
    raise typer.Exit(code)


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show tracebacks of user errors too "
                                                            "(or set LANCET_DEBUG=1).")) -> None:
    if debug:
        os.environ["LANCET_DEBUG"] = "1"


def load(config: Path | None, sets: list[str] | None) -> LancetConfig:
    """The validated config, or a clean error and exit code 2 (before any work)."""
    try:
        return load_config(config, sets or [])
    except ConfigError as err:
        fail(str(err), code=2)
        raise  # unreachable (typer.Exit above)


def _profile_api_url() -> str | None:
    """``PREFECT_API_URL`` of the active Prefect profile (``prefect config set``), if any."""
    from prefect.settings import get_current_settings

    return get_current_settings().api.url


def use_local_prefect_server() -> tuple[str | None, str]:
    """The Prefect server to report to, and where that choice came from (for the first log line).

    ``PREFECT_API_URL`` (environment, else the Prefect profile), else the server a running
    ``lancet ui``/``lancet server`` recorded as its own (pid alive, healthy), else None (the caller
    starts a temporary one). Whatever else listens on :4200 is a stranger's: never attached to.
    """
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"], "PREFECT_API_URL"
    url = _profile_api_url()
    if url:
        return url, "PREFECT_API_URL of the active Prefect profile"
    from lancet_cli.servers import lancet_ui_server

    url = lancet_ui_server()
    if url:  # the caller points Prefect at it (servers.pointed_at): its settings were read at import
        return url, "the one a running `lancet ui`/`lancet server` recorded"
    return None, ("none: PREFECT_API_URL is unset and no `lancet ui`/`lancet server` runs, so a temporary one "
                  "is started for this run; its flow runs stay in the local Prefect database, where `lancet ui` "
                  "shows them")


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def print_summary(summary: dict[str, Any], cfg: LancetConfig) -> None:
    before, after = summary.get("before") or {}, summary.get("after") or {}
    table = Table(title=f"LANCET {escape(cfg.name)}: before / after", title_justify="left")
    table.add_column("metric")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_column("change", justify="right")
    for key in ("unsafe_rate_seen", "unsafe_rate_unseen", "unsafe_rate", "utility", "heldout_nll", "distinct2",
                "probe_prompts_truncated"):
        b, a = before.get(key), after.get(key)
        change = f"{a - b:+.3f}" if isinstance(a, (int, float)) and isinstance(b, (int, float)) else ""
        table.add_row(key, _fmt(b), _fmt(a), change)
    console.print(table)
    inf = summary.get("influence") or {}
    if inf:
        console.print(f"influence [bold]{escape(str(inf.get('method')))}[/]: recall@k {_fmt(inf.get('recall_at_k'))}, "
                      f"AUROC {_fmt(inf.get('auroc'))}, {inf.get('n_queries')} queries")
    timings = summary.get("timings_s") or {}
    if timings:
        cached = summary.get("cached") or {}
        console.print("stages: " + ", ".join(
            f"{escape(k)} {v:.1f}s{' (cached)' if cached.get(k) else ''}" for k, v in timings.items())
            + f"; wall {summary.get('wall_s', 0):.1f}s")
    reason = escape(str(summary.get("reason", "")))
    if summary.get("nothing_to_correct"):  # its reason begins "nothing to correct: ...": no verdict before it
        console.print(f"[bold green]{reason}[/]")
    else:
        verdict = "[bold green]promoted to champion[/]" if summary.get("promoted") else "[bold yellow]not promoted[/]"
        console.print(f"{verdict}: {reason}")
    reg = summary.get("registered_model")
    if reg:
        console.print(f"registered: models:/{escape(reg['name'])}/{reg['version']} (alias {reg['alias']})")
    console.print(f"summary: {escape(str(summary.get('summary_path', '')))}")
    if summary.get("mlflow_run_id"):
        console.print(f"browse ([bold]lancet ui[/]): MLflow run {escape(str(summary.get('mlflow_run_url')))}")
        if summary.get("mlflow_report_url"):
            console.print(f"  influence report {escape(str(summary['mlflow_report_url']))}")
        if summary.get("prefect_flow_run_url"):
            console.print(f"  Prefect flow run {escape(str(summary['prefect_flow_run_url']))}")
        console.print(f"  or as one HTML file: [bold]lancet report {summary['mlflow_run_id']}[/]")


# ------------------------------------------------------------------------------ run / compare / serve
@app.command()
def run(config: Path | None = ConfigOpt, set_: list[str] | None = SetOpt) -> None:
    """Run the correction flow (data, model, probe, influence, correction, evaluation, registry)."""
    cfg = load(config, set_)
    server, source = use_local_prefect_server()
    # The first line: which Prefect server this run reports to (a stranger's on :4200 never).
    console.print(f"Prefect server: {escape(server)} ({escape(source)})" if server
                  else f"Prefect server: {escape(source)}")
    from lancet_core.preflight import preflight

    for note in preflight(cfg):  # data, output folder, model, tracking: seconds, before any server
        err_console.print(f"[yellow]note:[/] {escape(note)}")
    if not server and cfg.orchestration.task_runner != "thread":
        fail(f"orchestration.task_runner={cfg.orchestration.task_runner} runs tasks in worker processes, which "
             "need a real Prefect server (the temporary one `lancet run` starts is known to this run only): "
             "start one with `lancet server` (or `lancet ui`), or set PREFECT_API_URL", code=2)
    from contextlib import ExitStack

    from lancet_core.runlock import run_lock

    from lancet_cli.servers import pointed_at, temporary_prefect_server

    with ExitStack() as stack:
        stack.enter_context(run_lock(cfg.run_dir()))  # a second `lancet run` here is refused, naming this pid
        if server:
            stack.enter_context(pointed_at(server))  # Prefect's settings and os.environ (workers inherit)
        else:
            server, pid = stack.enter_context(temporary_prefect_server(cfg.run_dir()))
            console.print(f"Prefect server: {escape(server)} (temporary, pid {pid}, stopped when this run ends)")
        summary = _run_flow(cfg)
    print_summary(summary, cfg)


def _run_flow(cfg: LancetConfig) -> dict[str, Any]:
    from flows.correction import lancet_correction
    from tasks.orchestration import with_runner

    try:
        return with_runner(lancet_correction, cfg)(config=cfg)
    except LancetUserError as err:
        if debug_enabled():
            raise
        fail(str(err), code=2)
    except Exception as err:  # Prefect has logged the traceback already
        if debug_enabled():
            raise
        fail(f"the run failed: {type(err).__name__}: {err}")
    raise AssertionError("unreachable")  # fail() raised


def _flow_ranking(cfg: LancetConfig) -> Path | None:
    """The ranking `lancet run` made for this config, if it belongs to the current model."""
    from lancet_core.storage import read_manifest

    scores_dir, model_dir = cfg.run_dir() / "scores", cfg.run_dir() / "model"
    scores, model = read_manifest(scores_dir), read_manifest(model_dir)
    if not scores or not model or not (scores_dir / "scores.parquet").is_file():
        return None
    from lancet_core.stages.common import loaded_model_id

    checksum = (model.get("outputs") or {}).get("checksum")
    ranked_model = (scores.get("inputs") or {}).get("model")
    return scores_dir / "scores.parquet" if checksum and ranked_model == loaded_model_id(cfg, checksum) else None


@app.command()
def compare(config: Path | None = ConfigOpt, set_: list[str] | None = SetOpt,
            methods: str | None = typer.Option(None, help="Comma-separated methods (default: all)."),
            ranking: str = typer.Option("auto", help="auto (the ranking of `lancet run` when it matches the "
                                                     "model, else project) | project | oracle | a scores parquet"),
            recommended: bool = typer.Option(False, help="Apply the recommended correction settings first."),
            out: Path | None = typer.Option(None, help="Output folder (default <run dir>/compare)."),
            seeds: str | None = typer.Option(None, help="Comma-separated seeds, e.g. 0,1,2: rerun everything per "
                                                           "seed (world, model, ranking, correction), print each "
                                                           "seed's table and the mean over seeds.")) -> None:
    """IBO and every baseline on the same contaminated model and ranking, as one table."""
    pre: list[str] = []
    if recommended:
        from lancet_core.correction import RECOMMENDED_CORRECTION

        pre = [f"correction.{k}={v}" for k, v in RECOMMENDED_CORRECTION.items()]
    cfg = load(config, pre + list(set_ or []))
    from lancet_core.correction import compare as module
    try:
        seed_list = [int(x) for x in seeds.replace(" ", ",").split(",") if x.strip()] if seeds else []
    except ValueError:
        fail(f"--seeds expects comma-separated integers, got {seeds!r}", code=2)

    def resolve(c: LancetConfig) -> str:
        if ranking != "auto":
            return ranking
        found = _flow_ranking(c)
        return str(found) if found else "project"

    chosen = [m.strip() for m in methods.split(",") if m.strip()] if methods else None
    try:
        if seed_list:
            per_seed, df = module.compare_seeds(lambda extra: load(config, pre + list(set_ or []) + extra),
                                                seed_list, chosen, resolve, out, progress=True)
        else:
            console.print(f"ranking: {escape(resolve(cfg))}")
            per_seed, df = {}, module.compare(cfg, chosen, resolve(cfg), out, progress=True)
    except ConfigError as err:
        fail(str(err), code=2)
    except (ValueError, RuntimeError) as err:
        fail(str(err))
    for seed, one in per_seed.items():
        _print_compare(one[[c for c in module.SHOW if c in one.columns]], f"seed {seed}")
    shown = [c for c in getattr(module, "MEAN_SHOW" if per_seed else "SHOW", df.columns) if c in df.columns]
    _print_compare(df[shown], f"mean over seeds {', '.join(map(str, seed_list))}" if per_seed else None)
    for name, ok in (df.attrs.get("targets") or {}).items():
        per_seed_note = f" (mean; {module.seed_outcomes(df, name)})" if per_seed else ""
        console.print(f"[{'green' if ok else 'red'}]{'pass' if ok else 'miss'}[/] {escape(name)}{escape(per_seed_note)}")
    if df.attrs.get("out_dir"):
        console.print(f"written to {escape(df.attrs['out_dir'])}")


def _print_compare(df, subtitle: str | None = None) -> None:
    """Methods as columns, metrics as rows (a handful of methods, many metrics)."""
    title = "Correction methods on the same model and ranking" + (f" ({subtitle})" if subtitle else "")
    table = Table(title=escape(title), title_justify="left")
    table.add_column("metric")
    methods = [str(m) for m in df["method"]] if "method" in df.columns else [str(i) for i in df.index]
    for m in methods:
        table.add_column(escape(m), justify="right")
    for col in [c for c in df.columns if c != "method"]:
        values = [v.item() if hasattr(v, "item") else v for v in df[col].tolist()]
        table.add_row(escape(str(col)), *[escape(_fmt(v)) for v in values])
    console.print(table)


def deployments(request, cron: str) -> list:
    """The two deployments of prefect.yaml, built in Python for ``serve``: the run form is ``request``."""
    from flows.correction import correction_deployment
    from flows.realignment import realignment_deployment

    params = {"request": request.model_dump(mode="json")}
    return [
        correction_deployment.to_deployment(name="lancet-correction", parameters=params, tags=["lancet"],
                                            description="Run by hand or from the UI form: a named config and a "
                                                        "few overrides."),
        realignment_deployment.to_deployment(name="lancet-realignment", parameters=params, tags=["lancet"],
                                             cron=cron,
                                             description="Probe the champion; correct it when it drifts unsafe."),
    ]


def run_request(config: Path | None, sets: list[str]):
    """The deployments' default run form for ``--config``/``--set`` (a config under configs/, by name)."""
    from pydantic import ValidationError

    from lancet_core.run_request import SCHEDULE_KEYS, RunRequest

    try:  # the schedule's settings (orchestration.cron) set the deployment's cron, not the form
        return RunRequest(**({"config": str(config)} if config else {}),
                          overrides=[s for s in sets if s.split("=", 1)[0].strip() not in SCHEDULE_KEYS])
    except ValidationError as err:
        fail("; ".join(e["msg"].removeprefix("Value error, ") for e in err.errors()), code=2)
        raise  # unreachable (fail raised)


@app.command()
def serve(config: Path | None = ConfigOpt, set_: list[str] | None = SetOpt) -> None:
    """Serve both flows from this process (flow.serve); the realignment runs on ``orchestration.cron``.

    ``--config`` names the run form's default config (a file under configs/), ``--set`` its overrides
    (``orchestration.cron`` sets the schedule instead).
    """
    cfg = load(config, set_)
    request = run_request(config, list(set_ or []))
    server, source = use_local_prefect_server()
    if not server:
        console.print("[yellow]no Prefect server to serve to: start one with `lancet ui` "
                      "(or set PREFECT_API_URL) to see and trigger the deployments[/]")
    else:
        console.print(f"Prefect server: {escape(server)} ({escape(source)})")
    from contextlib import nullcontext

    from prefect import serve as prefect_serve

    from lancet_cli.servers import pointed_at

    console.print(f"serving lancet-correction and lancet-realignment (config {escape(request.config)}, "
                  f"cron {escape(cfg.orchestration.cron)})")
    with pointed_at(server) if server else nullcontext():
        prefect_serve(*deployments(request, cfg.orchestration.cron))


# ------------------------------------------------------------------------------ ui
def ui_commands(tracking_uri: str, host: str = HOST, mlflow_port: int = MLFLOW_PORT,
                prefect_port: int = PREFECT_PORT) -> list[tuple[str, list[str], dict[str, str]]]:
    mlflow_env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    # The Prefect UI asks its API at PREFECT_UI_API_URL, which defaults to PREFECT_API_URL or else
    # PREFECT_SERVER_API_PORT (4200), never to --port: without these a UI on another port talks to :4200.
    api = f"http://{host}:{prefect_port}/api"
    prefect_env = {"PREFECT_SERVER_API_HOST": host, "PREFECT_SERVER_API_PORT": str(prefect_port),
                   "PREFECT_API_URL": api, "PREFECT_UI_API_URL": api, "PREFECT_UI_URL": f"http://{host}:{prefect_port}"}
    return [
        ("MLflow", [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", tracking_uri,
                    "--host", host, "--port", str(mlflow_port), "--workers", "1"], mlflow_env),
        ("Prefect", [sys.executable, "-m", "prefect", "server", "start", "--host", host,
                     "--port", str(prefect_port)], prefect_env),
    ]


@app.command()
def ui(config: Path | None = ConfigOpt, set_: list[str] | None = SetOpt,
       tracking_uri: str | None = typer.Option(None, help="MLflow backend (default: the config's)."),
       mlflow_port: int = MLFLOW_PORT, prefect_port: int = PREFECT_PORT,
       host: str = typer.Option(HOST, help="Interface to bind (127.0.0.1: this machine only)."),
       dry_run: bool = typer.Option(False, "--dry-run", help="Print the commands only.")) -> None:
    """Start the MLflow UI and a Prefect server on 127.0.0.1 (Ctrl-C stops both)."""
    _run_servers(config, set_, tracking_uri, mlflow_port, prefect_port, host, dry_run)


@app.command()
def server(config: Path | None = ConfigOpt, set_: list[str] | None = SetOpt,
           tracking_uri: str | None = typer.Option(None, help="MLflow backend (default: the config's)."),
           mlflow_port: int = MLFLOW_PORT, prefect_port: int = PREFECT_PORT,
           host: str = typer.Option(HOST, help="Interface to bind; workers on other machines need a reachable "
                                              "one (and a firewall: the servers have no authentication)."),
           dry_run: bool = typer.Option(False, "--dry-run", help="Print the commands only.")) -> None:
    """A real Prefect server and an MLflow tracking server, for Dask/Ray workers (Ctrl-C stops both).

    Workers (and `lancet run`) find them through the two variables this command prints.
    """
    _run_servers(config, set_, tracking_uri, mlflow_port, prefect_port, host, dry_run)


def _run_servers(config, set_, tracking_uri, mlflow_port, prefect_port, host, dry_run) -> None:
    cfg = load(config, set_)
    uri = tracking_uri or cfg.tracking.tracking_uri
    try:
        cmds = ui_commands(expand_env(uri, "tracking.tracking_uri"), host, mlflow_port, prefect_port)
    except ConfigError as err:
        fail(str(err), code=2)
    if dry_run:
        for name, cmd, extra in cmds:
            console.print(f"{name}: {' '.join(f'{k}={v}' for k, v in extra.items())} {escape(redact(' '.join(cmd)))}")
        return
    import signal

    def _stop(signum, frame):  # SIGTERM/SIGHUP: stop the servers too, as Ctrl-C does
        raise KeyboardInterrupt

    for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if sig is not None:
            signal.signal(sig, _stop)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started in the background
    procs: list[tuple[str, subprocess.Popen]] = []
    from lancet_core.links import marker_path, read_marker, write_marker

    api, mlflow_ui = f"http://{host}:{prefect_port}/api", f"http://{host}:{mlflow_port}"
    try:
        for name, cmd, extra in cmds:
            procs.append((name, subprocess.Popen(cmd, env={**os.environ, **extra})))
        # `lancet run` reports to this Prefect server (to no stranger's) and links go to this MLflow UI.
        write_marker(api, mlflow_ui)
        console.print(f"MLflow UI:  {mlflow_ui}   (tracking {escape(redact(uri))})")
        console.print(f"Prefect UI: http://{host}:{prefect_port}   (its API: {api})")
        console.print(f"for Dask/Ray workers: export PREFECT_API_URL={api} and run with "
                      f"--set tracking.tracking_uri={mlflow_ui}")
        console.print("`lancet run` reports to this Prefect server while it runs, and its links point to these "
                      "UIs. Ctrl-C stops both.")
        while True:
            for name, proc in procs:
                if proc.poll() is not None:
                    fail(f"the {name} server exited with code {proc.returncode}")
            time.sleep(1.0)
    except KeyboardInterrupt:
        console.print("stopping...")
    finally:
        mine = read_marker()
        if mine and mine["pid"] == os.getpid():  # a second `lancet ui` on other ports owns its own record
            marker_path().unlink(missing_ok=True)
        for _, proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for _, proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()


# ------------------------------------------------------------------------------ report / inspect
def _latest_run_id(output_dir: str) -> str | None:
    path = Path(output_dir) / "latest" / "summary.json"
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as err:  # torn write, garbage, not UTF-8
        fail(f"{path} is not a readable JSON summary ({type(err).__name__}); expected the summary.json "
             "`lancet run` writes: rerun it, or pass an MLflow run id instead of 'latest'", code=2)
    if not isinstance(summary, dict):
        fail(f"{path} holds a JSON {type(summary).__name__}; expected the JSON object `lancet run` writes", code=2)
    run_id = summary.get("mlflow_run_id")
    if run_id is not None and not isinstance(run_id, str):
        fail(f"{path}: mlflow_run_id is {type(run_id).__name__}; expected a run id string", code=2)
    return run_id


@app.command()
def report(run_id: str = typer.Argument(..., help="MLflow run id of a flow run ('latest' for the last one)."),
           config: Path | None = ConfigOpt, set_: list[str] | None = SetOpt,
           tracking_uri: str | None = typer.Option(None, help="MLflow tracking URI (default: the config's)."),
           output: Path | None = typer.Option(None, "--output", "-o", help="HTML file to write.")) -> None:
    """Write a self-contained HTML report (metrics, top influential samples, plots) of a run."""
    cfg = load(config, set_)
    if run_id == "latest":
        run_id = _latest_run_id(cfg.output_dir) or ""
        if not run_id:
            fail(f"no {cfg.output_dir}/latest/summary.json with an MLflow run id: run `lancet run` first")
    from lancet_cli.report import build_report

    out = output or Path(cfg.output_dir) / "reports" / f"{run_id}.html"
    try:
        path = build_report(run_id, tracking_uri or cfg.tracking.tracking_uri, out)
    except Exception as err:  # MlflowException for an unknown run id, mostly
        fail(f"could not build the report for run {run_id}: {err}")
    console.print(f"report: {escape(str(path))}")


class InspectError(RuntimeError):
    """The single-query view cannot be built (missing stage outputs, unknown query id)."""


def query_view(cfg: LancetConfig, query: str | None, top: int = 10, recompute: bool = False) -> dict[str, Any]:
    """Training samples that cause (score > 0) and inhibit (score < 0) one unsafe output.

    Reads ``<run_dir>/scores/by_query.parquet`` (each query's ``queries.report_top_k`` causing
    and inhibiting samples, saved by the ranking); for older runs the single-mode ``q_<id>``
    columns of scores.parquet; otherwise (or with ``recompute``) scores that one query again
    with the fitted factors.
    """
    import pandas as pd

    from lancet_core.influence.by_query import BY_QUERY_FILE

    run_dir = cfg.run_dir()
    qpath = run_dir / "queries" / "queries.parquet"
    if not qpath.is_file():
        raise InspectError(f"no query set at {qpath}: run `lancet run` with this config first")
    queries = pd.read_parquet(qpath)
    if query is None:
        return {"queries": queries.head(200).to_dict("records")}
    match = queries[queries["query_id"].astype(str) == str(query)]
    if match.empty and str(query).isdigit() and int(query) < len(queries):
        match = queries.iloc[[int(query)]]
    if match.empty:
        raise InspectError(f"unknown query id {query!r}; run `lancet inspect` without --query to list them")
    q = match.iloc[0].to_dict()
    qid = str(q["query_id"])
    train = pd.read_parquet(run_dir / "data" / "train.parquet")
    scores_path = run_dir / "scores" / "scores.parquet"
    scores = pd.read_parquet(scores_path) if scores_path.is_file() else None
    col = f"q_{qid}"
    text = train.assign(sample_id=train["sample_id"].astype(str)).set_index("sample_id")
    text = text[[c for c in ("prompt", "response", "planted") if c in text.columns]]
    query_out = {k: (v if not hasattr(v, "tolist") else v.tolist()) for k, v in q.items()}
    saved = run_dir / "scores" / BY_QUERY_FILE
    if saved.is_file() and not recompute:  # the ranking kept each query's top samples: no re-scoring
        mine = pd.read_parquet(saved).query("query_id == @qid").join(text, on="sample_id")
        side = {d: mine[mine["direction"] == d].sort_values("rank").head(top) for d in ("causing", "inhibiting")}
        return {"query": query_out, "source": f"saved per-query ranking {saved} (top {cfg.queries.report_top_k} "
                                              "each side)",
                "positive": side["causing"].to_dict("records"), "negative": side["inhibiting"].to_dict("records")}
    if scores is not None and col in scores.columns and not recompute:
        per = pd.DataFrame({"sample_id": scores["sample_id"].astype(str), "score": scores[col].astype(float)})
        source = f"single-mode ranking {scores_path}"
    else:
        per = _rescore_query(cfg, q, train)
        source = f"recomputed with the {cfg.influence.method} factors in {run_dir / 'factors'}"
    per = per.sort_values("score", ascending=False, kind="stable").reset_index(drop=True)
    per["rank"] = range(1, len(per) + 1)
    per = per.join(text, on="sample_id")
    positive = per[per["score"] > 0].head(top)
    negative = per[per["score"] < 0].tail(top).iloc[::-1]
    return {"query": query_out, "source": source,
            "positive": positive.to_dict("records"), "negative": negative.to_dict("records")}


def _rescore_query(cfg: LancetConfig, q: dict[str, Any], train) -> Any:
    import pandas as pd

    from lancet_core.stages.influence import rescore

    run_dir = cfg.run_dir()
    model_dir = run_dir / "model" / "hf"
    if not model_dir.is_dir():
        raise InspectError(f"no model at {model_dir}: run `lancet run` with this config first")
    try:
        matrix = rescore(cfg, model_dir, run_dir / "factors", pd.DataFrame([q]), train, train, progress=True)
    except FileNotFoundError:
        raise InspectError(f"no fitted factors under {run_dir / 'factors'}: run `lancet run` with this config "
                           "first") from None
    return pd.DataFrame({"sample_id": train["sample_id"].astype(str).tolist(), "score": matrix[0]})


@app.command()
def inspect(config: Path | None = ConfigOpt, set_: list[str] | None = SetOpt,
            query: str | None = typer.Option(None, "--query", "-q", help="Query id (see the list without it)."),
            top: int = typer.Option(10, min=1, max=10_000, help="Samples to show on each side."),
            recompute: bool = typer.Option(False, help="Score this query again even if the ranking has it.")) -> None:
    """Single-query view: the training samples that cause one unsafe output, and those that inhibit it."""
    cfg = load(config, set_)
    try:
        view = query_view(cfg, query, top=top, recompute=recompute)
    except InspectError as err:
        fail(str(err))
    if view.get("queries") is not None:
        t = Table(title="Influence queries (pass one with --query)", title_justify="left")
        for col in ("query_id", "n_merged", "prompt", "response"):
            t.add_column(col)
        for row in view["queries"]:
            t.add_row(*[escape(_fmt(row.get(c))) for c in ("query_id", "n_merged", "prompt", "response")])
        console.print(t)
        return
    q = view["query"]
    console.print(f"[bold]query {escape(str(q['query_id']))}[/] ({escape(view['source'])})")
    console.print(f"  prompt:   {escape(str(q.get('prompt')))}\n  response: {escape(str(q.get('response')))}")
    cols = ("rank", "sample_id", "score", "planted", "prompt", "response")
    for title, rows in (("causes it (score > 0)", view["positive"]), ("inhibits it (score < 0)", view["negative"])):
        t = Table(title=title, title_justify="left")
        for col in cols:
            t.add_column(col, justify="right" if col in ("rank", "score") else "left")
        for row in rows:
            t.add_row(*[escape(_fmt(row.get(c))) for c in cols])
        console.print(t)


# ------------------------------------------------------------------------------ config
@config_app.command("show")
def config_show(config: Path | None = ConfigOpt, set_: list[str] | None = SetOpt) -> None:
    """Print the resolved configuration (defaults + file + overrides; secrets redacted)."""
    cfg = load(config, set_)
    console.print(cfg.to_yaml(), markup=False, highlight=False, end="")


@config_app.command("validate")
def config_validate(config: Path | None = ConfigOpt, set_: list[str] | None = SetOpt) -> None:
    """Check a configuration; exit code 2 with the field path when a value is invalid."""
    cfg = load(config, set_)
    console.print(f"ok: {escape(str(config or '(defaults)'))} is a valid configuration (name {escape(cfg.name)})")


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    app()
