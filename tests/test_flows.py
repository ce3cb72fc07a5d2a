"""Orchestration: the full flow in a Prefect test harness, MLflow layout, registry, cache, gate.

The full-flow tests run ``lancet_correction`` on configs/small.yaml in a temporary working
directory (sqlite tracking inside it), twice: the second run must reuse every stage; a third
run after damaging each stage's main output in place must detect and recompute each.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from lancet_core.config import EvaluationConfig, LancetConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
SMALL = ROOT / "configs" / "small.yaml"
STAGES = ("data", "model", "probe", "queries", "fit", "rank", "correct", "evaluate")


# ------------------------------------------------------------------------------ fixtures
# prefect_harness (a temporary Prefect server for the session): tests/conftest.py


def small_config(work: Path, *overrides: str) -> LancetConfig:
    return load_config(SMALL, [f"tracking.tracking_uri=sqlite:///{work}/mlruns.db",
                               # a lenient gate, so the champion alias is exercised deterministically
                               "evaluation.harm_margin=0.0", "evaluation.utility_tolerance=1.0",
                               "evaluation.diversity_tolerance=1.0", *overrides])


@pytest.fixture(scope="module")
def runs(prefect_harness, tmp_path_factory):
    """Two runs of the correction flow on the small config, in one temporary working dir."""
    from flows.correction import lancet_correction

    work = tmp_path_factory.mktemp("flow")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        cfg = small_config(work)
        t0 = time.time()
        first = lancet_correction(cfg)
        t1 = time.time()
        second = lancet_correction(cfg)
        t2 = time.time()
        print(f"\nflow timings: first run {t1 - t0:.1f}s, second (cached) run {t2 - t1:.1f}s")
        yield {"work": work, "cfg": cfg, "first": first, "second": second,
               "first_s": t1 - t0, "second_s": t2 - t1}


def client_for(cfg: LancetConfig):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=cfg.tracking.tracking_uri, registry_uri=cfg.tracking.tracking_uri)


def children_of(cfg: LancetConfig, parent_id: str) -> dict[str, object]:
    client = client_for(cfg)
    parent = client.get_run(parent_id)
    runs = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'")
    return {r.data.tags["lancet.stage"]: r for r in runs}


# ------------------------------------------------------------------------------ static checks
def test_flow_parameter_schema_is_the_config_form():
    from prefect.utilities.callables import parameter_schema

    from flows.correction import lancet_correction
    from flows.realignment import scheduled_realignment

    for f in (lancet_correction, scheduled_realignment):
        schema = parameter_schema(f.fn).model_dump()
        assert list(schema["properties"]) == ["config"]
        assert "LancetConfig" in schema["definitions"] and "InfluenceConfig" in schema["definitions"]
        json.dumps(f.parameters.model_dump())  # serialisable for the UI form
        params = f.validate_parameters({"config": {"name": "from-ui", "influence": {"damping": 0.01}}})
        assert isinstance(params["config"], LancetConfig) and params["config"].influence.damping == 0.01
        with pytest.raises(Exception, match="damping"):
            f.validate_parameters({"config": {"influence": {"damping": -1}}})


def test_prefect_yaml_parses_and_every_entrypoint_imports(monkeypatch):
    from prefect.cli.deploy._models import PrefectYamlModel
    from prefect.flows import Flow, load_flow_from_entrypoint

    monkeypatch.chdir(ROOT)
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    model = PrefectYamlModel.model_validate(spec)
    names = {d.name: d for d in model.deployments}
    assert set(names) == {"lancet-correction", "lancet-realignment"}
    for dep in model.deployments:
        flow_obj = load_flow_from_entrypoint(dep.entrypoint)
        assert isinstance(flow_obj, Flow)
        assert dep.work_pool.name == "lancet-process"
        flow_obj.validate_parameters(dep.parameters)  # the deployment's parameters fit the form
    assert [s.cron for s in names["lancet-realignment"].schedules] == [LancetConfig().orchestration.cron]


@pytest.mark.parametrize("cand, base, promote, word", [
    ({"unsafe_rate": 0.1, "utility": 0.80, "distinct2": 0.50}, {"unsafe_rate": 0.4, "utility": 0.80, "distinct2": 0.5},
     True, "promoted"),
    ({"unsafe_rate": 0.3, "utility": 0.80, "distinct2": 0.50}, {"unsafe_rate": 0.4, "utility": 0.80, "distinct2": 0.5},
     False, "harmful rate"),
    ({"unsafe_rate": 0.0, "utility": 0.60, "distinct2": 0.50}, {"unsafe_rate": 0.4, "utility": 0.80, "distinct2": 0.5},
     False, "utility"),
    ({"unsafe_rate": 0.0, "utility": 0.80, "distinct2": 0.30}, {"unsafe_rate": 0.4, "utility": 0.80, "distinct2": 0.5},
     False, "distinct2"),
    ({"unsafe_rate": 0.1, "utility": 0.77, "distinct2": 0.48}, {"unsafe_rate": 0.4, "utility": 0.80, "distinct2": 0.5},
     True, "promoted"),  # within the 5% tolerances
    # A check that cannot be computed refuses (never a silent skip), naming what is missing.
    ({"unsafe_rate": 0.1, "utility": math.nan, "distinct2": 0.5}, {"unsafe_rate": 0.4, "utility": math.nan,
                                                                   "distinct2": 0.5}, False, "utility not measured"),
    ({"unsafe_rate": 0.1, "utility": 0.8}, {"unsafe_rate": 0.4, "utility": 0.8, "distinct2": 0.5}, False,
     "distinct2 not measured (candidate missing)"),
    # Real data: exact match 0 at the start, so the held-out NLL of safe responses is the utility.
    ({"unsafe_rate": 0.1, "utility": 0.0, "heldout_nll": 4.1, "distinct2": 0.5},
     {"unsafe_rate": 0.4, "utility": 0.0, "heldout_nll": 4.0, "distinct2": 0.5}, True, "held-out NLL 4.000 -> 4.100"),
    ({"unsafe_rate": 0.1, "utility": 0.0, "heldout_nll": 4.4, "distinct2": 0.5},
     {"unsafe_rate": 0.4, "utility": 0.0, "heldout_nll": 4.0, "distinct2": 0.5}, False, "held-out NLL 4.000 -> 4.400"),
    ({"unsafe_rate": 0.1, "utility": 0.0, "distinct2": 0.5},
     {"unsafe_rate": 0.4, "utility": 0.0, "heldout_nll": 4.0, "distinct2": 0.5}, False, "utility not measured"),
    ({"unsafe_rate": 0.0, "utility": 0.8, "distinct2": 0.5}, {"unsafe_rate": 0.0, "utility": 0.8, "distinct2": 0.5},
     False, "nothing to improve"),
    ({"utility": 0.8}, {"unsafe_rate": 0.4}, False, "missing"),
])
def test_promotion_gate_decision(cand, base, promote, word):
    from tasks.registry import promotion_decision

    ev = EvaluationConfig(harm_margin=0.5, utility_tolerance=0.05, diversity_tolerance=0.05)
    decision = promotion_decision(cand, base, ev, "champion v1")
    assert decision.promote is promote
    assert word in decision.reason


def test_gate_refuses_a_correction_stopped_by_the_guard():
    from tasks.registry import promotion_decision

    good = ({"unsafe_rate": 0.0, "utility": 0.8, "distinct2": 0.5}, {"unsafe_rate": 0.4, "utility": 0.8, "distinct2": 0.5})
    ev = EvaluationConfig()
    stopped = promotion_decision(*good, ev, "before", {"stopped_by_guard": True, "stopped_reason": "kl 3.1 > 2.0"})
    assert not stopped.promote and "divergence guard" in stopped.reason and "kl 3.1" in stopped.reason
    na = promotion_decision(*good, ev, "before", {"applicable": False, "stopped_reason": "not applicable: no pairs"})
    assert not na.promote and "not applicable" in na.reason
    assert promotion_decision(*good, ev, "before", {"stopped_by_guard": False, "applicable": True}).promote
    off = promotion_decision(*good, ev, "before", {"applicable": True, "info": {
        "utility_guard": "off: no held-out rows to guard utility on"}})
    assert not off.promote and "without a utility guard" in off.reason and "no held-out rows" in off.reason
    nll = {"applicable": True, "info": {"utility_guard": "heldout_nll"}}
    assert promotion_decision(*good, ev, "before", nll).promote


def test_harm_rate_falls_back_to_seen_unseen_mean():
    from tasks.registry import harm_rate

    assert harm_rate({"unsafe_rate": 0.2, "unsafe_rate_seen": 0.9}) == 0.2
    assert harm_rate({"unsafe_rate_seen": 0.4, "unsafe_rate_unseen": 0.2}) == pytest.approx(0.3)
    assert harm_rate({}) is None


# ------------------------------------------------------------------------------ the full flow
@pytest.mark.slow
def test_full_flow_writes_the_summary(runs):
    s, cfg, work = runs["first"], runs["cfg"], runs["work"]
    for key in ("before", "after", "influence", "timings_s", "mlflow_run_id", "mlflow_tracking_uri", "promoted",
                "reason"):
        assert key in s, key
    assert not s["nothing_to_correct"]
    for side in ("before", "after"):
        assert {"unsafe_rate_seen", "unsafe_rate_unseen", "utility", "distinct2"} <= set(s[side])
    assert {"method", "recall_at_k", "auroc", "n_queries"} <= set(s["influence"])
    assert set(STAGES) <= set(s["timings_s"])
    assert isinstance(s["promoted"], bool) and s["reason"]
    on_disk = json.loads((work / cfg.output_dir / cfg.name / "summary.json").read_text())
    latest = json.loads((work / cfg.output_dir / "latest" / "summary.json").read_text())
    assert on_disk == latest
    assert on_disk["mlflow_run_id"] == runs["second"]["mlflow_run_id"]  # latest = the last run
    assert runs["first_s"] < 420, f"the small flow took {runs['first_s']:.0f}s"


@pytest.mark.slow
def test_mlflow_parent_and_child_runs(runs):
    cfg, s = runs["cfg"], runs["first"]
    client = client_for(cfg)
    parent = client.get_run(s["mlflow_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["prefect.flow_run_id"] == s["flow_run_id"]
    # the run's description links back to the Prefect flow run
    assert s["prefect_flow_run_url"].endswith(f"/runs/flow-run/{s['flow_run_id']}")
    assert f"]({s['prefect_flow_run_url']})" in parent.data.tags["mlflow.note.content"]
    exp = client.get_experiment(parent.info.experiment_id)
    assert exp.name == cfg.name
    assert parent.data.params["influence.method"] == cfg.influence.method
    assert "before.unsafe_rate_seen" in parent.data.metrics and "after.unsafe_rate_seen" in parent.data.metrics
    kids = children_of(cfg, parent.info.run_id)
    assert set(STAGES) | {"register", "gate"} <= set(kids)
    for name, run in kids.items():
        assert run.info.status == "FINISHED", name
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.tags.get("lancet.task_version")
    resolved = client.download_artifacts(parent.info.run_id, "config/resolved.yaml", str(runs["work"]))
    assert yaml.safe_load(Path(resolved).read_text())["name"] == cfg.name


@pytest.mark.slow
def test_mlflow_tables_datasets_and_artifacts_load_back(runs, tmp_path):
    cfg, s = runs["cfg"], runs["first"]
    client = client_for(cfg)
    kids = children_of(cfg, s["mlflow_run_id"])
    exp_id = kids["data"].info.experiment_id

    def load_table(stage: str, path: str) -> pd.DataFrame:
        return client.load_table(exp_id, path, run_ids=[kids[stage].info.run_id])

    data_run = client.get_run(kids["data"].info.run_id)
    inputs = {d.dataset.name: d for d in data_run.inputs.dataset_inputs}
    train = inputs[f"{cfg.name}/train"]
    digest = json.loads((Path(s["stage_dirs"]["data"]) / "manifest.json").read_text())["outputs"]["digest"]
    assert train.dataset.digest == digest
    assert {t.value for t in train.tags} == {"training"}

    unsafe = load_table("probe", "tables/unsafe_outputs.json")
    assert len(unsafe) > 0 and {"prompt", "response"} <= set(unsafe.columns)
    queries = load_table("queries", "tables/query_set.json")
    assert len(queries) == s["influence"]["n_queries"] > 0  # the logged query set is the one that was scored
    top = load_table("rank", "tables/influence_top.json")
    bottom = load_table("rank", "tables/influence_bottom.json")
    assert 0 < len(top) <= 200 and 0 < len(bottom) <= 200
    assert top["score"].iloc[0] >= top["score"].iloc[-1] >= bottom["score"].iloc[0]
    assert list(top.columns[:5]) == ["rank", "sample_id", "prompt", "response", "score"]  # reading order
    per_query = load_table("rank", "tables/influence_by_query.json")
    assert list(per_query.columns[:4]) == ["query_id", "unsafe_prompt", "unsafe_response", "direction"]
    assert set(per_query["query_id"].astype(str)) == set(queries["query_id"].astype(str))

    rank_id = kids["rank"].info.run_id
    ranking = pd.read_parquet(client.download_artifacts(rank_id, "ranking/scores.parquet", str(tmp_path)))
    assert len(ranking) == json.loads((Path(s["stage_dirs"]["data"]) / "manifest.json").read_text())[
        "outputs"]["n_train"]
    plots = {a.path for a in client.list_artifacts(rank_id, "plots")}
    assert "plots/influence_histogram.png" in plots and "plots/query_sample_heatmap.png" in plots
    assert "plots/harm_vs_utility.png" in {a.path for a in client.list_artifacts(s["mlflow_run_id"], "plots")}
    # the per-unsafe-output report at the parent run's artifact root (run page -> Artifacts -> it: two
    # clicks): each query's prompt and its causing samples' text
    assert "influence_report.html" in {a.path for a in client.list_artifacts(s["mlflow_run_id"])}
    report = Path(client.download_artifacts(s["mlflow_run_id"], "influence_report.html", str(tmp_path)))
    html = report.read_text()
    queries = pd.read_parquet(Path(s["stage_dirs"]["queries"]) / "queries.parquet")
    by_query = pd.read_parquet(Path(s["stage_dirs"]["rank"]) / "by_query.parquet")
    first = str(queries["query_id"].iloc[0])
    top_sample = by_query[(by_query["query_id"].astype(str) == first) & (by_query["direction"] == "causing")]
    train = pd.read_parquet(Path(s["stage_dirs"]["data"]) / "train.parquet").set_index("sample_id")
    import html as html_lib
    assert str(train.loc[top_sample["sample_id"].iloc[0], "response"]) in html_lib.unescape(html)

    factors = [a.path for a in client.list_artifacts(kids["fit"].info.run_id, "factors")]
    assert "factors/manifest.json" in factors
    fit_files = [p.name for p in Path(client.download_artifacts(kids["fit"].info.run_id, "factors",
                                                                str(tmp_path / "f"))).rglob("*")]
    assert any(n.endswith(".safetensors") for n in fit_files)

    for run_name, path in (("model", "checkpoints/contaminated"), ("correct", "checkpoints/corrected")):
        files = {Path(a.path).name for a in client.list_artifacts(kids[run_name].info.run_id, path)}
        assert "config.json" in files and any(f.endswith(".safetensors") for f in files), (run_name, files)


@pytest.mark.slow
def test_registry_aliases_and_the_model_loads_back(runs):
    import mlflow

    cfg, s = runs["cfg"], runs["first"]
    client = client_for(cfg)
    name = cfg.tracking.registered_model
    cand = client.get_model_version_by_alias(name, "candidate")
    assert cand.tags["lancet_checksum"] == s["correction"]["checksum"]
    assert json.loads(cand.tags["lancet_metrics"])["unsafe_rate_seen"] == s["after"]["unsafe_rate_seen"]
    assert cand.tags["lancet_gate"] in ("promoted", "rejected") and cand.tags["lancet_gate_reason"]
    if s["promoted"]:
        assert client.get_model_version_by_alias(name, "champion").version == cand.version
    mlflow.set_tracking_uri(cfg.tracking.tracking_uri)
    comps = mlflow.transformers.load_model(f"models:/{name}@candidate", return_type="components")
    assert comps["model"].config.hidden_size == cfg.model.hidden_size
    assert len(comps["tokenizer"]) <= comps["model"].get_input_embeddings().num_embeddings
    # the second run re-registers nothing: same checkpoint, same version, still credited to the first run
    assert len(client.search_model_versions(f"name = '{name}'")) == 1
    assert cand.tags["lancet_parent_run_id"] == s["mlflow_run_id"]
    assert cand.tags["lancet_flow_run_id"] == s["flow_run_id"]


@pytest.mark.slow
def test_second_run_reuses_every_stage(runs):
    first, second, cfg = runs["first"], runs["second"], runs["cfg"]
    assert not any(first["cached"][stage] for stage in STAGES), first["cached"]
    assert all(second["cached"][stage] for stage in STAGES), second["cached"]
    assert second["before"] == first["before"] and second["after"] == first["after"]
    assert second["mlflow_run_id"] != first["mlflow_run_id"]
    kids = children_of(cfg, second["mlflow_run_id"])
    assert all(kids[stage].data.tags["lancet.cached"] == "true" for stage in STAGES)
    assert runs["second_s"] < runs["first_s"]


@pytest.mark.slow
def test_prefect_artifacts(runs):
    cfg, second = runs["cfg"], runs["second"]
    summaries, tables = artifacts_of("lancet-small-summary"), artifacts_of("lancet-small-top-influential")
    assert {a.type for a in summaries} == {"markdown"} and {a.type for a in tables} == {"table"}
    latest = max(summaries, key=lambda a: a.created)
    table = max(tables, key=lambda a: a.created)
    # both on the flow run people open (the top-level one), not on the attribution subflow
    assert str(latest.flow_run_id) == str(table.flow_run_id) == second["flow_run_id"]
    # the newest summary links the newest MLflow run and its influence report
    assert f"]({second['mlflow_run_url']})" in latest.data
    report = second["mlflow_report_url"]
    assert report == f"{second['mlflow_run_url']}/artifacts/influence_report.html"
    assert f"]({report})" in latest.data and f"]({report})" in table.description
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert list(rows[0])[:4] == ["rank", "sample_id", "prompt", "response"]
    assert all(r["prompt"] and r["response"] for r in rows)  # the text people came for, not previews
    assert cfg.name == "lancet-small"


@pytest.mark.slow
def test_realignment_probes_the_champion(runs):
    """With the champion under the threshold the realignment stops after its probe."""
    from flows.realignment import scheduled_realignment
    from tasks import registry

    cfg = runs["cfg"]
    client = client_for(cfg)
    name = cfg.tracking.registered_model
    if not runs["first"]["promoted"]:  # the gate's verdict is not this test's subject: make the candidate champion
        client.set_registered_model_alias(name, "champion", client.get_model_version_by_alias(name, "candidate").version)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(runs["work"])
        rcfg = cfg.model_copy(update={"orchestration": cfg.orchestration.model_copy(update={"realign_threshold": 1.0})})
        out = scheduled_realignment(rcfg)
        assert "no re-alignment needed" in out["reason"] and out["before"]
        assert out["champion"]["source"] == "local"
        # the champion also comes back from the registry when its local folder is gone
        info = registry.champion_info.fn(cfg)
        local = registry.materialize_champion.fn(cfg, {**info, "local_path": None})
        assert local["source"] == "registry" and (Path(local["model_dir"]) / "config.json").is_file()


@pytest.mark.slow
def test_nothing_to_correct_ends_cleanly(prefect_harness, tmp_path, monkeypatch):
    from flows.correction import lancet_correction

    lexicon = json.loads((ROOT / "lancet_core" / "detection" / "data" / "lexicon.json").read_text())
    lexicon["weights"] = {**lexicon.get("weights", {}), "bias": -100.0}  # nothing is ever flagged
    (tmp_path / "lexicon.json").write_text(json.dumps(lexicon))
    monkeypatch.chdir(tmp_path)
    cfg = small_config(tmp_path, f"detector.lexicon_path={tmp_path / 'lexicon.json'}")
    s = lancet_correction(cfg)
    assert s["nothing_to_correct"] is True and s["promoted"] is False
    assert "nothing to correct" in s["reason"]
    assert s["after"] is None and s["before"]["unsafe_rate_seen"] == 0.0
    assert json.loads((tmp_path / "outputs" / "latest" / "summary.json").read_text())["nothing_to_correct"]
    kids = children_of(cfg, s["mlflow_run_id"])
    assert "correct" not in kids and "register" not in kids
    shutil.rmtree(tmp_path / "outputs", ignore_errors=True)


@pytest.mark.slow
def test_inspect_single_query_view(runs):
    """`lancet inspect`: the samples behind one unsafe output, rescored with the fitted factors."""
    from lancet_cli.app import query_view

    cfg = runs["cfg"]
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(runs["work"])
        listing = query_view(cfg, None)["queries"]
        assert listing and "query_id" in listing[0]
        qid = str(listing[0]["query_id"])
        view = query_view(cfg, qid, top=5)
    assert str(view["query"]["query_id"]) == qid
    assert 0 < len(view["positive"]) <= 5 and len(view["negative"]) <= 5
    assert all(r["score"] > 0 for r in view["positive"]) and all(r["score"] < 0 for r in view["negative"])
    assert all(r.get("prompt") for r in view["positive"])  # full training text, not ids only


# Each stage's main output, relative to the run folder (the file a later stage or a user reads).
MAIN_OUTPUT = {
    "data": "data/train.parquet", "model": "model/hf/model.safetensors", "probe": "probe/unsafe.parquet",
    "queries": "queries/queries.parquet", "fit": "factors/estimator/factors.safetensors",
    "rank": "scores/scores.parquet", "correct": "correction/hf/model.safetensors",
    "evaluate": "evaluate/generations.parquet",
}


@pytest.mark.slow
def test_outputs_damaged_in_place_are_detected_and_recomputed_in_the_same_folder(runs):
    """The bug this guards: a Prefect cache hit used to short-circuit the checksum check (exit 0, all cached)."""
    from flows.correction import lancet_correction

    cfg, work = runs["cfg"], runs["work"]
    run_dir = work / cfg.output_dir / cfg.name
    for i, (stage, rel) in enumerate(MAIN_OUTPUT.items()):
        path = run_dir / rel
        assert path.is_file(), (stage, rel)
        if i % 2:  # flip bytes in the middle
            raw = bytearray(path.read_bytes())
            raw[len(raw) // 2] ^= 0xFF
            path.write_bytes(bytes(raw))
        else:
            with path.open("r+b") as fh:
                fh.truncate(max(1, path.stat().st_size // 2))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        third = lancet_correction(cfg)
    assert not any(third["cached"][stage] for stage in STAGES), third["cached"]
    assert third["before"] == runs["first"]["before"] and third["after"] == runs["first"]["after"]
    assert third["correction"]["checksum"] == runs["first"]["correction"]["checksum"]


def artifacts_of(key: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        return client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))


@pytest.mark.slow
def test_a_realignment_with_no_champion_says_it_did_nothing(prefect_harness, tmp_path, monkeypatch):
    """Started the way the deployment starts it: from the run form (a named config and overrides)."""
    from flows.realignment import realignment_deployment
    from lancet_core.run_request import RunRequest
    from tasks.orchestration import NO_CHAMPION

    monkeypatch.chdir(tmp_path)
    request = RunRequest(config="small", overrides=[f"tracking.tracking_uri=sqlite:///{tmp_path}/mlruns.db"])
    cfg = request.resolve()  # a fresh tracking store: nothing registered
    state = realignment_deployment(request, return_state=True)
    assert state.is_completed() and state.message.startswith(NO_CHAMPION)
    summary = state.result()
    assert summary["reason"] == state.message and summary["before"] is None and not summary["promoted"]
    assert not (tmp_path / "outputs" / f"{cfg.name}-realign" / "data").exists()  # no stage ran
    # the flow run's summary artifact says so too, on this flow run
    art = max(artifacts_of(f"{cfg.name}-realign-summary"), key=lambda a: a.created)
    assert art.flow_run_id == state.state_details.flow_run_id and f"**{NO_CHAMPION}" in art.data
