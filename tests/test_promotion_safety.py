"""Never promote a worse model: the gate against a real (sqlite) MLflow registry.

A diverged correction (stopped by the guard), a degraded one (utility lost) and one whose
evaluation produced no usable numbers all leave ``champion`` where it was, with the reason
on the model version and in the gate's MLflow run. A good candidate is promoted: the gate is
not simply closed.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from lancet_core.config import load_config
from tasks import registry, tracking

NAME = "gate-model"
CHAMPION_METRICS = {"unsafe_rate": 0.4, "utility": 0.8, "distinct2": 0.5}


@pytest.fixture(scope="module")
def template_db(tmp_path_factory):
    """A registry with five versions of one model, v1 the champion (built once: migrations are slow)."""
    folder = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{folder}/mlruns.db"
    client = tracking.get_client(uri)
    client.create_registered_model(NAME)
    for _ in range(5):
        client.create_model_version(NAME, source=str(folder))
    client.set_registered_model_alias(NAME, registry.CHAMPION, "1")
    return folder / "mlruns.db"


@pytest.fixture
def reg(template_db, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copy(template_db, tmp_path / "mlruns.db")
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    cfg = load_config(None, ["name=gate-test", f"tracking.tracking_uri={uri}", f"tracking.registered_model={NAME}"])
    client = tracking.get_client(uri)
    parent = tracking.start_parent_run(cfg, "lancet-correction")
    return cfg, client, parent


def champion(client) -> str:
    return str(client.get_model_version_by_alias(NAME, registry.CHAMPION).version)


def gate_runs(cfg, client, parent):
    return [r for r in tracking.child_runs(cfg, parent) if r.data.tags.get("lancet.stage") == "gate"]


@pytest.mark.parametrize("case", ["diverged", "degraded", "no_numbers"])
def test_a_diverged_or_degraded_correction_leaves_the_champion_untouched(reg, case):
    cfg, client, parent = reg
    better = {"unsafe_rate": 0.0, "utility": 0.8, "distinct2": 0.5}
    candidate, correction, words = {
        # The guard stopped training: refused even though its numbers look better.
        "diverged": (better, {"stopped_by_guard": True, "stopped_reason": "kl 3.10 > max_kl 2.0"},
                     "divergence guard (kl 3.10"),
        # Harm gone, but utility fell 40% (allowed: 5%).
        "degraded": ({"unsafe_rate": 0.0, "utility": 0.48, "distinct2": 0.5}, {}, "utility 0.800 -> 0.480"),
        # The evaluation of a broken model: NaN harmful rate.
        "no_numbers": ({"unsafe_rate": math.nan, "utility": 0.8, "distinct2": 0.5}, {}, "harmful rate missing"),
    }[case]
    out = registry.promotion_gate.fn(cfg, "2", candidate, CHAMPION_METRICS, "champion v1", parent, correction)
    assert out["promoted"] is False and words in out["reason"]
    assert champion(client) == "1"
    tags = client.get_model_version(NAME, "2").tags
    assert tags[registry.TAG_GATE] == "rejected" and words in tags[registry.TAG_REASON]
    (run,) = gate_runs(cfg, client, parent)
    assert run.data.tags["lancet.promoted"] == "false" and words in run.data.tags["lancet.gate_reason"]
    local = client.download_artifacts(run.info.run_id, "gate/decision.json", str(cfg.run_dir()))
    decision = json.loads(Path(local).read_text())
    assert decision["promote"] is False and words in decision["reason"]


def test_a_good_candidate_is_promoted(reg):
    cfg, client, parent = reg
    good = {"unsafe_rate": 0.1, "utility": 0.79, "distinct2": 0.5}
    out = registry.promotion_gate.fn(cfg, "3", good, CHAMPION_METRICS, "champion v1", parent, {"applicable": True})
    assert out["promoted"] is True
    assert champion(client) == "3"
    assert client.get_model_version(NAME, "3").tags[registry.TAG_GATE] == "promoted"
