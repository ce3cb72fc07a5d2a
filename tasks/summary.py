"""The summary of one flow run: one typed object for summary.json, the Prefect artifact and the CLI.

``RunSummary.model_dump()`` is exactly what ``<output_dir>/<name>/summary.json`` holds
(and what the flows return), so a field added here shows up everywhere at once.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from lancet_core.config import LancetConfig, redact

#: The behaviour metrics shown in before/after tables.
#: How the reason of a run with no unsafe output begins (printers say it once, not twice).
NOTHING_TO_CORRECT = "nothing to correct: "
SUMMARY_METRICS = ("unsafe_rate_seen", "unsafe_rate_unseen", "utility", "distinct2", "unsafe_rate", "heldout_nll",
                   "probe_prompts_truncated")


def stage_metrics(payload: dict[str, Any] | None) -> dict[str, Any]:
    """The behaviour metrics a probe/evaluate payload measured (empty when there is none)."""
    return dict((payload or {}).get("outputs", {}).get("metrics", {}) or {})


def pick_metrics(metrics: dict[str, Any] | None) -> dict[str, Any] | None:
    """The summary's subset of behaviour metrics (NaN/inf as None)."""
    if metrics is None:
        return None
    values = {k: metrics.get(k) for k in SUMMARY_METRICS}
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in values.items()}


class RunSummary(BaseModel):
    """What one flow run did: behaviour before/after, influence quality, the gate, where things are."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    name: str
    flow: str
    flow_run_id: str | None = None
    mlflow_run_id: str | None = None
    mlflow_tracking_uri: str | None = None
    mlflow_run_url: str | None = None
    mlflow_report_url: str | None = None
    prefect_flow_run_url: str | None = None
    summary_path: str | None = None
    before: dict[str, Any] | None = None
    after: dict[str, Any] | None = None
    influence: dict[str, Any] | None = None
    correction: dict[str, Any] | None = None
    champion: dict[str, Any] | None = None
    realign_threshold: float | None = None
    sharded: dict[str, Any] | None = None
    timings_s: dict[str, float] = Field(default_factory=dict)
    cached: dict[str, bool] = Field(default_factory=dict)
    stage_runs: dict[str, str | None] = Field(default_factory=dict)
    stage_dirs: dict[str, str | None] = Field(default_factory=dict)
    wall_s: float = 0.0
    promoted: bool = False
    reason: str = ""
    nothing_to_correct: bool = False
    registered_model: dict[str, Any] | None = None

    @classmethod
    def start(cls, cfg: LancetConfig, flow_name: str, parent_run_id: str | None,
              flow_run_id: str | None) -> RunSummary:
        return cls(name=cfg.name, flow=flow_name, flow_run_id=flow_run_id, mlflow_run_id=parent_run_id,
                   mlflow_tracking_uri=redact(cfg.tracking.tracking_uri) if cfg.tracking.enabled else None)

    def record(self, name: str, payload: dict[str, Any] | None) -> None:
        """A stage's seconds, reuse, MLflow child run and folder."""
        if not payload:
            return
        self.timings_s = {**self.timings_s, name: round(float(payload.get("seconds") or 0.0), 3)}
        self.cached = {**self.cached, name: bool(payload.get("cached"))}
        self.stage_runs = {**self.stage_runs, name: payload.get("mlflow_run_id")}
        self.stage_dirs = {**self.stage_dirs, name: payload.get("path")}

    def record_attribution(self, cfg: LancetConfig, att: dict[str, Any], probe: dict[str, Any]) -> bool:
        """The attribution subflow's stages and influence quality; False when there is nothing to correct."""
        for name in ("queries", "fit", "rank"):
            self.record(name, att.get(name))
        sh = att.get("sharded")
        if sh:  # the map-reduce did the work; fit/rank only loaded and logged it
            self.timings_s = {**self.timings_s, "fit_sharded": sh["fit_s"], "rank_sharded": sh["score_s"]}
            self.sharded = {"task_runner": cfg.orchestration.task_runner, "fit_shards": sh["plan"]["fit_shards"],
                            "score_shards": sh["plan"]["score_shards"], "storage_uri": sh["plan"]["uri"],
                            "shards_reused": sh["shards_reused"], "shards_total": sh["shards_total"]}
        if att["queries"]["outputs"].get("nothing_to_correct") or "rank" not in att:
            self.nothing_to_correct = True
            self.reason = f"{NOTHING_TO_CORRECT}no unsafe output among {probe['outputs'].get('n_generations', '?')} probe generations"
            return False
        metrics = dict(att["rank"]["outputs"].get("metrics", {}) or {})
        self.influence = {
            "method": (att.get("fit") or {}).get("outputs", {}).get("method", cfg.influence.method),
            "recall_at_k": metrics.get("recall_at_k"), "auroc": metrics.get("auroc"),
            "n_queries": metrics.get("n_queries", att["queries"]["outputs"].get("n_queries")),
        }
        return True

    def record_correction(self, cfg: LancetConfig, correct: dict[str, Any], evaluate: dict[str, Any]) -> None:
        self.record("correct", correct)
        self.record("evaluate", evaluate)
        out = correct["outputs"]
        self.after = pick_metrics(stage_metrics(evaluate))
        self.correction = {"method": out.get("method", cfg.correction.method),
                           "stopped_reason": out.get("stopped_reason"), "checksum": out.get("checksum"),
                           "model_dir": out.get("model_dir")}

    def record_gate(self, gate: dict[str, Any], candidate_alias: str, champion_alias: str) -> None:
        self.promoted, self.reason = bool(gate["promoted"]), gate["reason"]
        reg = gate.get("registered")
        if reg:
            self.registered_model = {"name": reg["name"], "version": reg["version"], "model_uri": reg["model_uri"],
                                     "alias": champion_alias if self.promoted else candidate_alias}
