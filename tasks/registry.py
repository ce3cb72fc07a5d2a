"""Model registry: register a corrected model as ``candidate``; the gate decides ``champion``.

* :func:`register_candidate` logs the model with ``mlflow.transformers.log_model`` into a
  ``register`` child run, registers it as ``cfg.tracking.registered_model`` and points the
  ``candidate`` alias at it. A checkpoint already registered (same content checksum) is
  reused instead of registered twice, so re-runs and retries do not pile up versions.
* :func:`promotion_decision` is the gate (a pure function): the candidate becomes champion
  only when its harmful rate drops by at least ``evaluation.harm_margin`` (relative) and
  its utility and diversity (distinct-2) stay within ``evaluation.utility_tolerance`` /
  ``evaluation.diversity_tolerance`` (relative) of the baseline. Utility is exact match when the
  baseline has some (the world), else the held-out NLL of safe responses (real data; may rise by
  at most the tolerance). A check that cannot be computed refuses promotion, with the reason. The baseline is the current
  champion measured on the same evaluation set; with no champion yet, it is the
  contaminated model's *before* metrics.
* :func:`promotion_gate` applies the decision: moves ``champion`` or leaves the model as
  ``candidate`` with the reason as a version tag.

Every version carries tags: ``lancet_checksum``, ``lancet_local_path`` (the HF folder on
disk), ``lancet_metrics`` (JSON), ``lancet_eval_key`` (which evaluation set the metrics are
from), ``lancet_gate`` and ``lancet_gate_reason``.

Retries: these tasks have none of their own; MLflow's HTTP client retries (bounded in
lancet_core/runtime_env.py) are the one retry layer, so failures do not multiply.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from lancet_core.config import EvaluationConfig, LancetConfig
from tasks import tracking

log = logging.getLogger(__name__)

VERSION = "2"
CANDIDATE, CHAMPION = "candidate", "champion"
TAG_CHECKSUM, TAG_PATH, TAG_METRICS, TAG_EVAL = "lancet_checksum", "lancet_local_path", "lancet_metrics", "lancet_eval_key"
TAG_GATE, TAG_REASON = "lancet_gate", "lancet_gate_reason"


# ------------------------------------------------------------------------------ the gate
def harm_rate(metrics: dict[str, Any]) -> float | None:
    """The harmful rate the gate compares: greedy unsafe rate over all probes (else seen/unseen mean)."""
    v = _num(metrics.get("unsafe_rate"))
    if v is not None:
        return v
    parts = [_num(metrics.get(k)) for k in ("unsafe_rate_seen", "unsafe_rate_unseen")]
    parts = [p for p in parts if p is not None]
    return sum(parts) / len(parts) if parts else None


@dataclass
class GateDecision:
    promote: bool
    reason: str
    checks: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _num(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _within(name: str, base: float | None, cand: float | None, tol: float) -> tuple[bool, str]:
    # A check that cannot be computed refuses: a candidate is never promoted on a skipped check.
    if base is None or cand is None:
        return False, f"{name} not measured ({base_or_cand(base, cand)}): cannot judge it, so no promotion"
    floor = base * (1.0 - tol)
    ok = cand >= floor - 1e-12
    change = (cand - base) / base if base else 0.0
    return ok, (f"{name} {base:.3f} -> {cand:.3f} ({change:+.0%}, allowed -{tol:.0%})")


def base_or_cand(base: float | None, cand: float | None) -> str:
    return " and ".join(w for w, v in (("baseline", base), ("candidate", cand)) if v is None) + " missing"


def _utility_check(baseline: dict[str, Any], candidate: dict[str, Any], tol: float) -> tuple[bool, str]:
    """Exact-match utility when the baseline has some; else the held-out NLL of safe responses
    (real data: free text is never matched exactly); neither measurable = refused."""
    from lancet_core.correction.base import MIN_GUARDED_UTILITY

    bu, cu = _num(baseline.get("utility")), _num(candidate.get("utility"))
    if bu is not None and bu >= MIN_GUARDED_UTILITY:
        return _within("utility", bu, cu, tol)
    bn, cn = _num(baseline.get("heldout_nll")), _num(candidate.get("heldout_nll"))
    why = "no exact-match utility" if bu is None else f"exact-match utility {bu:.3f} < {MIN_GUARDED_UTILITY}"
    if bn is None or cn is None or bn <= 0:
        return False, (f"utility not measured ({why}; held-out NLL {base_or_cand(bn, cn)}): cannot judge it, "
                       "so no promotion")
    ceiling = bn * (1.0 + tol)
    return cn <= ceiling + 1e-12, (f"held-out NLL {bn:.3f} -> {cn:.3f} ({(cn - bn) / bn:+.0%}, allowed +{tol:.0%}; "
                                   f"the utility measure: {why})")


def promotion_decision(candidate: dict[str, Any], baseline: dict[str, Any], ev: EvaluationConfig,
                       baseline_label: str = "baseline", correction: dict[str, Any] | None = None) -> GateDecision:
    """Promote only when harm drops by ``harm_margin`` and utility/diversity hold (all relative).

    ``correction`` (the correct stage's outputs) refuses the candidate outright when the
    divergence guard stopped the training or the method was not applicable.
    """
    hb, hc = harm_rate(baseline), harm_rate(candidate)
    checks: dict[str, Any] = {"baseline": baseline_label, "harm_before": hb, "harm_after": hc,
                              "harm_margin": ev.harm_margin}
    correction = correction or {}
    if correction.get("stopped_by_guard"):
        return GateDecision(False, "kept as candidate: the correction was stopped by the divergence guard "
                                   f"({correction.get('stopped_reason')})", checks)
    if correction.get("applicable") is False:
        return GateDecision(False, f"kept as candidate: the correction method was not applicable "
                                   f"({correction.get('stopped_reason')})", checks)
    guard = (correction.get("info") or {}).get("utility_guard")
    if isinstance(guard, str) and guard.startswith("off"):
        return GateDecision(False, f"kept as candidate: the correction ran without a utility guard ({guard})", checks)
    if hb is None or hc is None:
        return GateDecision(False, "harmful rate missing from the metrics; cannot judge", checks)
    if hb <= 0.0:
        return GateDecision(False, f"{baseline_label} has no harmful outputs (rate 0); nothing to improve", checks)
    drop = (hb - hc) / hb
    checks["harm_drop"] = drop
    harm_ok = drop >= ev.harm_margin - 1e-12
    harm_msg = f"harmful rate {hb:.3f} -> {hc:.3f} ({-drop:+.0%}, needs -{ev.harm_margin:.0%})"
    util_ok, util_msg = _utility_check(baseline, candidate, ev.utility_tolerance)
    div_ok, div_msg = _within("distinct2", _num(baseline.get("distinct2")), _num(candidate.get("distinct2")),
                              ev.diversity_tolerance)
    checks.update(harm_ok=harm_ok, utility_ok=util_ok, diversity_ok=div_ok)
    parts = [harm_msg, util_msg, div_msg]
    if harm_ok and util_ok and div_ok:
        return GateDecision(True, f"promoted over {baseline_label}: " + "; ".join(parts), checks)
    failed = [m for ok, m in ((harm_ok, harm_msg), (util_ok, util_msg), (div_ok, div_msg)) if not ok]
    return GateDecision(False, f"kept as candidate vs {baseline_label}: " + "; ".join(failed), checks)


def evaluation_key(cfg: LancetConfig, data_digest: str) -> str:
    """Which evaluation the metrics come from (same key = comparable numbers)."""
    blob = json.dumps({"data": data_digest, "eval": cfg.section_hash("generation", "detector", "evaluation"),
                       "seed": cfg.seed}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------ registry helpers
def _client(cfg: LancetConfig):
    return tracking.get_client(cfg.tracking.tracking_uri)


def _version_by_alias(cfg: LancetConfig, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return tracking.call(_client(cfg).get_model_version_by_alias, cfg.tracking.registered_model, alias)
    except MlflowException:
        return None


def _version_info(mv) -> dict[str, Any]:
    tags = dict(mv.tags or {})
    try:
        metrics = json.loads(tags.get(TAG_METRICS, "{}"))
    except json.JSONDecodeError:
        metrics = {}
    return {"version": str(mv.version), "checksum": tags.get(TAG_CHECKSUM), "local_path": tags.get(TAG_PATH),
            "metrics": metrics, "eval_key": tags.get(TAG_EVAL), "run_id": mv.run_id, "source": mv.source,
            "aliases": list(getattr(mv, "aliases", []) or []), "tags": tags}


def _find_by_checksum(cfg: LancetConfig, checksum: str):
    from mlflow.exceptions import MlflowException

    name = cfg.tracking.registered_model
    try:
        found = tracking.call(_client(cfg).search_model_versions,
                                 f"name = '{name}' and tags.{TAG_CHECKSUM} = '{checksum}'")
    except MlflowException:
        found = [mv for mv in tracking.call(_client(cfg).search_model_versions, f"name = '{name}'")
                 if (mv.tags or {}).get(TAG_CHECKSUM) == checksum]
    return max(found, key=lambda mv: int(mv.version)) if found else None


def _pip_requirements() -> list[str]:
    import importlib.metadata as md

    reqs = []
    for pkg in ("torch", "transformers", "tokenizers", "safetensors", "accelerate"):
        try:
            reqs.append(f"{pkg}=={md.version(pkg).split('+')[0]}")
        except md.PackageNotFoundError:
            continue
    return reqs


def _flat_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool)) or v is None}


# ------------------------------------------------------------------------------ tasks
@task(name="lancet-champion-info", version=VERSION, cache_policy=NO_CACHE)
def champion_info(cfg: LancetConfig) -> dict[str, Any] | None:
    """The registered ``champion`` (version, checksum, local path, metrics), or None."""
    if not cfg.tracking.enabled:
        return None
    mv = _version_by_alias(cfg, CHAMPION)
    return _version_info(mv) if mv is not None else None


@task(name="lancet-register-candidate", version=VERSION, timeout_seconds=3600,
      cache_policy=NO_CACHE)
def register_candidate(cfg: LancetConfig, model_dir: str, checksum: str, metrics: dict[str, Any],
                       eval_key: str, parent_run_id: str | None = None,
                       extra_tags: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Log the model (mlflow.transformers), register it, and point the ``candidate`` alias at it."""
    if not cfg.tracking.enabled:
        return None
    import mlflow

    client = _client(cfg)
    name = cfg.tracking.registered_model
    with tracking.child_run(cfg, parent_run_id, "register", VERSION, {"lancet.checksum": checksum}) as run:
        existing = _find_by_checksum(cfg, checksum)
        if existing is not None:
            version, model_uri, reused = str(existing.version), existing.source, True
        else:
            from lancet_core.stages.model import load_trained

            model, tokenizer = load_trained(model_dir, cfg)
            def log_model():
                with mlflow.start_run(run_id=run.run_id, nested=mlflow.active_run() is not None):
                    return mlflow.transformers.log_model(
                        {"model": model, "tokenizer": tokenizer}, name="model", task="text-generation",
                        pip_requirements=_pip_requirements(),
                        metadata={"lancet_checksum": checksum, "lancet_config": cfg.name},
                    )

            info = tracking.call(log_model)
            mv = tracking.call(mlflow.register_model, info.model_uri, name)
            version, model_uri, reused = str(mv.version), info.model_uri, False
        tags = {TAG_CHECKSUM: checksum, TAG_PATH: str(Path(model_dir).resolve()),
                TAG_METRICS: json.dumps(_flat_metrics(metrics), sort_keys=True), TAG_EVAL: eval_key,
                "lancet_config_name": cfg.name, "lancet_parent_run_id": parent_run_id or "",
                **{k: str(v) for k, v in (extra_tags or {}).items()}}
        # The producer's tags are written once: a later run that finds the same checkpoint
        # registered reuses the version and must not claim it (its flow run made nothing new).
        for key, value in ({} if reused else tags).items():
            tracking.call(client.set_model_version_tag, name, version, key, value)
        tracking.call(client.set_registered_model_alias, name, CANDIDATE, version)
        run.tags({"lancet.registered_model": name, "lancet.registered_version": version,
                  "lancet.model_uri": model_uri, "lancet.reused_version": str(reused).lower()})
        run.metrics(metrics)
        return {"name": name, "version": version, "model_uri": model_uri, "reused": reused,
                "alias_uri": f"models:/{name}@{CANDIDATE}", "mlflow_run_id": run.run_id}


@task(name="lancet-promotion-gate", version=VERSION, cache_policy=NO_CACHE)
def promotion_gate(cfg: LancetConfig, version: str | None, candidate_metrics: dict[str, Any],
                   baseline_metrics: dict[str, Any], baseline_label: str,
                   parent_run_id: str | None = None, correction: dict[str, Any] | None = None) -> dict[str, Any]:
    """Move ``champion`` to ``version`` when the gate passes; otherwise tag the reason."""
    champion = _version_by_alias(cfg, CHAMPION) if cfg.tracking.enabled else None
    if version is not None and champion is not None and str(champion.version) == str(version):
        decision = GateDecision(True, f"version {version} is already the champion", {"baseline": baseline_label})
    else:
        decision = promotion_decision(candidate_metrics, baseline_metrics, cfg.evaluation, baseline_label,
                                      correction)
    with tracking.child_run(cfg, parent_run_id, "gate", VERSION) as run:
        run.tags({"lancet.promoted": str(decision.promote).lower(), "lancet.gate_reason": decision.reason,
                  "lancet.registered_version": version})
        run.metrics({k: v for k, v in decision.checks.items() if not isinstance(v, str)}, prefix="gate.")
        run.dict(decision.as_dict(), "gate/decision.json")
    if cfg.tracking.enabled and version is not None:
        client, name = _client(cfg), cfg.tracking.registered_model
        tracking.call(client.set_model_version_tag, name, version, TAG_GATE,
                      "promoted" if decision.promote else "rejected")
        tracking.call(client.set_model_version_tag, name, version, TAG_REASON, decision.reason[:5000])
        if decision.promote:
            tracking.call(client.set_registered_model_alias, name, CHAMPION, version)
    log.info("promotion gate: %s", decision.reason)
    return {"promoted": decision.promote, "reason": decision.reason, "checks": decision.checks,
            "version": version, "baseline": baseline_label}


@task(name="lancet-materialize-champion", version=VERSION, timeout_seconds=3600,
      cache_policy=NO_CACHE)
def materialize_champion(cfg: LancetConfig, info: dict[str, Any]) -> dict[str, Any]:
    """An HF folder of the champion: its recorded local path when intact, else downloaded from MLflow."""
    from lancet_core.models.loading import folder_checksum, save_model

    local = info.get("local_path")
    if local and Path(local).is_dir() and folder_checksum(local) == info.get("checksum"):
        return {"model_dir": str(Path(local).resolve()), "checksum": info["checksum"], "version": info["version"],
                "source": "local"}
    import mlflow

    target = (cfg.run_dir() / f"champion-v{info['version']}").resolve()
    hf = target / "hf"
    if not (hf.is_dir() and info.get("checksum") and folder_checksum(hf) == info.get("checksum")):
        uri = f"models:/{cfg.tracking.registered_model}/{info['version']}"
        comps = tracking.call(mlflow.transformers.load_model, uri, return_type="components")
        tmp = target / "hf.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        save_model(comps["model"], comps["tokenizer"], tmp)
        shutil.rmtree(hf, ignore_errors=True)
        tmp.rename(hf)
    return {"model_dir": str(hf), "checksum": folder_checksum(hf), "version": info["version"], "source": "registry"}
