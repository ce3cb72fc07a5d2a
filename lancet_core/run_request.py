"""The run form: what a person fills in to start a run from the Prefect UI.

The deployments take a :class:`RunRequest`, not the whole :class:`~lancet_core.config.LancetConfig`
(~65 fields): a named config (a YAML file under ``configs/``), the few settings people change
most, and ``overrides`` (``a.b=c``, as ``lancet run --set``) for everything else. It resolves
through :func:`~lancet_core.config.load_config`, so a bad value fails with the same message,
naming the field, as on the command line. Schedule settings are the deployment's, not a run's.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator

from lancet_core.config import (
    SEED_MAX, ConfigError, CorrectionMethod, InfluenceMethod, LancetConfig, load_config, redact_override,
    seed_overrides,
)

#: Settings of the schedule: a run request that sets them would change nothing, so it is refused.
SCHEDULE_KEYS = ("orchestration.cron",)


def config_dir() -> Path:
    """The named configs: ``LANCET_CONFIG_DIR``, else the project's ``configs/``."""
    return Path(os.environ.get("LANCET_CONFIG_DIR") or Path(__file__).resolve().parents[1] / "configs")


def named_configs() -> dict[str, Path]:
    """``{name: file}`` of every YAML file under :func:`config_dir` (``sub/x`` for ``configs/sub/x.yaml``)."""
    root = config_dir()
    files = sorted([*root.rglob("*.yaml"), *root.rglob("*.yml")]) if root.is_dir() else []
    return {f.relative_to(root).with_suffix("").as_posix(): f for f in files}


def config_name(value: str) -> str:
    """A named config from its name, ``name.yaml``, ``configs/name.yaml`` or a path to a file under configs/."""
    names, root = named_configs(), config_dir()
    text = value.strip()
    path = Path(text)
    if path.is_file() and path.resolve().is_relative_to(root.resolve()):
        text = path.resolve().relative_to(root.resolve()).as_posix()
    name = text.removeprefix("configs/").removesuffix(".yaml").removesuffix(".yml")
    if name not in names:
        raise ConfigError(f"config: unknown named config {value!r}; choose one of {', '.join(names) or '(none)'} "
                          f"(the YAML files under {root})")
    return name


def _choices(schema: dict[str, Any]) -> None:
    # Read when the schema is built (a deployment is made), so a config added to configs/ shows up.
    schema["enum"] = list(named_configs())


class RunRequest(BaseModel):
    """Start a LANCET run: a named config, optionally changed by a few settings."""

    model_config = ConfigDict(extra="forbid")

    config: str = Field("quickstart", description="The named config to run: a YAML file under configs/ "
                                              "(quickstart: the whole story in under a minute; demo: the full demo).",
                        json_schema_extra=_choices)
    seed: int | None = Field(None, ge=0, le=SEED_MAX,
                             description="Seed of the whole pipeline (world, model, correction); another seed "
                                         "than the config's runs in its own folder <name>-seed<k>. "
                                         "Empty: the config's.")
    influence_method: InfluenceMethod | None = Field(
        None, description="How training samples are ranked (influence.method). Empty: the config's.")
    correction_method: CorrectionMethod | None = Field(
        None, description="How the model is corrected from the ranking (correction.method). Empty: the config's.")
    top_k: int | None = Field(None, ge=1, description="Training samples the correction takes from each end of the "
                                                      "ranking: the most harmful (P) and the most inhibiting (N) "
                                                      "(influence.top_k_positive/_negative). Empty: the config's.")
    overrides: list[str] = Field([], description="Advanced: any other setting as a.b=c, e.g. "
                                                 "influence.damping=0.01 (as `lancet run --set`; applied last).")

    @field_validator("config")
    @classmethod
    def _named(cls, value: str) -> str:
        return config_name(value)

    @model_validator(mode="after")
    def _resolves(self) -> RunRequest:
        self.resolve()  # a request that cannot become a valid config fails here, naming the field
        return self

    @model_serializer(mode="wrap", when_used="json")
    def _redacted_json(self, handler) -> dict[str, Any]:
        # As LancetConfig's: JSON is how a request leaves this process (deployment and flow-run
        # parameters), so credentials in overrides are masked; a secret goes in as ${ENV_VAR}.
        out = handler(self)
        out["overrides"] = [redact_override(item) for item in out.get("overrides", [])]
        return out

    def settings(self) -> list[str]:
        """The request as ``--set`` items on top of its named config (the fields first, ``overrides`` last)."""
        for item in self.overrides:
            key = item.split("=", 1)[0].strip()
            if key in SCHEDULE_KEYS:
                raise ConfigError(f"overrides: {key} is the deployment's schedule, not a run setting (change it "
                                  "in prefect.yaml, or with `lancet serve --set`)")
        sets: list[str] = []
        if self.seed is not None:
            base = load_config(named_configs()[self.config])
            # The seed's own run folder, but the config's MLflow experiment: runs stay side by side.
            sets += [*seed_overrides(base, self.seed), f"tracking.experiment={base.tracking.experiment or base.name}"]
        if self.influence_method is not None:
            sets.append(f"influence.method={self.influence_method}")
        if self.correction_method is not None:
            sets.append(f"correction.method={self.correction_method}")
        if self.top_k is not None:
            sets += [f"influence.top_k_positive={self.top_k}", f"influence.top_k_negative={self.top_k}"]
        return sets + list(self.overrides)

    def resolve(self) -> LancetConfig:
        """The validated config this request runs (:class:`ConfigError` naming the field otherwise)."""
        return load_config(named_configs()[self.config], self.settings())
