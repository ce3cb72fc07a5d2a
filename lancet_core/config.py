"""The one settings tree of LANCET.

YAML files, ``--set a.b=c`` CLI overrides and the Prefect UI form all go through
:class:`LancetConfig`, so an invalid value fails here, before any work starts, with
the dotted field path and what was expected.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_serializer, model_validator

from lancet_core.errors import LancetUserError
from lancet_core.models.presets import PRESET_NAMES, PRESETS


class ConfigError(LancetUserError, ValueError):
    """A configuration value is invalid; the message names the field and what was expected."""


class _Section(BaseModel):
    # Unknown keys are typos more often than intentions: refuse them. NaN/inf pass every
    # ge/le bound (comparisons with NaN are false), so they are refused for every float field.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


#: Seeds feed numpy/torch generators, which take 0..2**32-1.
SEED_MAX = 2**32 - 1


class WorldConfig(_Section):
    """The embedded safety-alignment world (generated, seeded, nothing downloaded)."""

    n_train: int = Field(2000, ge=50, le=200_000, description="Training samples, planted included.")
    planted_fraction: float = Field(0.02, ge=0.0, le=0.5, description="Share of planted contaminated samples.")
    # A plain list default (pydantic copies it per instance), not a factory: a factory's value
    # is missing from the JSON schema, so the Prefect form showed the field empty.
    planted_categories: list[str] = Field(["fraud"], min_length=1)
    variant: Literal["templated", "paraphrase", "behaviour"] = "templated"
    n_heldout: int = Field(200, ge=0, description="Held-out benign samples (model selection, perplexity).")


class DataConfig(_Section):
    source: Literal["world", "hh-rlhf", "beavertails", "generic"] = "world"
    path_or_name: str | None = Field(None, description="Local JSONL/JSONL.gz/parquet file or hub dataset name.")
    split: str = "train"
    columns: dict[str, str] = Field(default_factory=dict, description="generic loader: prompt/response -> column.")
    on_bad_rows: Literal["raise", "skip"] = "raise"
    max_samples: int | None = Field(None, ge=1)
    world: WorldConfig = Field(default_factory=WorldConfig)

    @model_validator(mode="after")
    def _needs_path(self) -> DataConfig:
        if self.source != "world" and not self.path_or_name:
            raise ValueError(f"data.path_or_name is required when data.source is {self.source!r}")
        return self


class ModelConfig(_Section):
    name_or_path: str | None = Field(
        None, description="Hub name or local folder. None builds a model from the fields below (default: the "
                          "embedded tiny Llama)."
    )
    trust_remote_code: bool = False
    preset: Literal[PRESET_NAMES] | None = Field(  # type: ignore[valid-type]  # a tuple of literals
        None, description="Build a model of a real family's shape (random init, fine-tuned here): "
                          f"{', '.join(PRESET_NAMES)}. Shape fields set explicitly win (e.g. num_layers=2).")
    family: Literal["llama", "qwen2", "mistral", "gpt_neox", "gpt2"] = Field(
        "llama", description="transformers model_type of a model built from these fields.")
    # Upper bounds: a typo like 1e6 would otherwise allocate until the machine swaps.
    hidden_size: int = Field(128, ge=8, le=65_536)
    num_layers: int = Field(4, ge=1, le=1024)
    num_heads: int = Field(4, ge=1, le=1024)
    num_kv_heads: int | None = Field(None, ge=1, le=1024, description="Key/value heads (GQA); None = num_heads.")
    intermediate_size: int = Field(256, ge=8, le=262_144)
    tie_embeddings: bool = Field(False, description="Share the input embedding and the output head.")
    vocab_size: int = Field(1024, ge=300, le=1_000_000, description="BPE vocabulary trained on the corpus.")
    max_length: int = Field(96, ge=16, le=131_072, description="Tokens per prompt+response sequence. `auto` (in "
                                                                  "YAML or --set) sets max_length_auto.")
    # Real data (issue 12 item 7): the length from the data and the model's positions.
    max_length_auto: bool = Field(
        False, description="Pick max_length in the model stage: the max_length_quantile of the tokenized training "
                           "lengths, capped by the model's positions (lancet_core/models/lengths.py); later stages "
                           "read the chosen value from the model folder.")
    max_length_quantile: float = Field(0.95, gt=0.0, le=1.0, description="max_length_auto: quantile kept whole.")
    lora_rank: int | None = Field(
        None, ge=1, description="Fine-tune a PEFT LoRA adapter of this rank instead of all weights: influence then "
                                "tracks the adapter maps (EK-FAC/K-FAC), the correction trains the adapter, and model "
                                "folders hold the merged weights plus the adapter (hf/adapter).")
    dtype: Literal["float32", "bfloat16", "float64"] = "float32"
    device: str = "cpu"

    @field_validator("device")
    @classmethod
    def _device_exists(cls, value: str) -> str:
        # Checked against what torch sees now, so `cuda` on a CPU-only machine fails here
        # and not minutes later inside training.
        if value == "cpu":  # no torch import for the common case (`lancet config` answers at once)
            return value
        import torch

        try:
            dev = torch.device(value)
        except (RuntimeError, TypeError):
            raise ValueError(f"expected cpu, cuda, cuda:N or mps, got {value!r}") from None
        if dev.type == "cuda":
            n = torch.cuda.device_count()
            if n == 0:
                raise ValueError(f"{value!r} asked for, but torch sees no CUDA GPU (use cpu)")
            if dev.index is not None and dev.index >= n:
                raise ValueError(f"{value!r} asked for, but torch sees {n} CUDA GPU(s) (cuda:0..cuda:{n - 1})")
        elif dev.type == "mps" and not torch.backends.mps.is_available():
            raise ValueError(f"{value!r} asked for, but MPS is not available (use cpu)")
        elif dev.type not in ("cpu", "cuda", "mps"):
            raise ValueError(f"expected cpu, cuda, cuda:N or mps, got {value!r}")
        return value

    @model_validator(mode="before")
    @classmethod
    def _fill_from_preset(cls, data: Any) -> Any:
        # Before validation, so every field holds the real value (stage keys, dumps and the
        # checks below see the preset's shape) and an explicitly set field still wins.
        if isinstance(data, dict) and data.get("preset") in PRESETS:
            data = {**PRESETS[data["preset"]].shape_fields(), **data}
        if isinstance(data, dict) and data.get("max_length") in ("auto", None) and "max_length" in data:
            # `max_length: auto`: the number stays a placeholder until the model stage picks it.
            data = {**{k: v for k, v in data.items() if k != "max_length"}, "max_length_auto": True}
        return data

    @model_validator(mode="after")
    def _heads_divide(self) -> ModelConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"model.hidden_size ({self.hidden_size}) must be divisible by model.num_heads ({self.num_heads})"
            )
        if self.num_kv_heads is not None and self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"model.num_heads ({self.num_heads}) must be divisible by model.num_kv_heads ({self.num_kv_heads})"
            )
        return self


class TrainingConfig(_Section):
    """Supervised fine-tuning of the (contaminated) model."""

    epochs: int = Field(3, ge=1, le=1000)
    batch_size: int = Field(32, ge=1, le=1_000_000)
    lr: float = Field(3e-3, gt=0, le=1.0)
    weight_decay: float = Field(0.0, ge=0, le=10.0)
    warmup_steps: int = Field(20, ge=0)
    patience: int = Field(1, ge=0, description="Epochs without held-out improvement before stopping.")
    seed: int = Field(0, ge=0, le=SEED_MAX)


class GenerationConfig(_Section):
    max_new_tokens: int = Field(40, ge=1, le=4096)
    batch_size: int = Field(64, ge=1)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1.0)
    n_samples: int = Field(1, ge=0, description="Sampled generations per probe prompt (besides greedy).")


class DetectorConfig(_Section):
    # A plain default (pydantic copies it per instance): mypy cannot type a factory lambda's list as the Literal.
    kinds: list[Literal["rules", "profanity", "hf_classifier", "guard"]] = Field(["rules"], min_length=1)
    combine: Literal["any", "mean"] = "any"
    threshold: float = Field(0.5, ge=0.0, le=1.0)
    hf_model: str | None = None
    guard_model: str | None = None
    lexicon_path: str | None = Field(None, description="Override the shipped rule lexicon (JSON).")


class QueryConfig(_Section):
    mode: Literal["batch", "single"] = "batch"
    standardize: bool = True
    dedup: bool = True
    dedup_threshold: float = Field(0.95, gt=0, le=1.0, description="Token-Jaccard above which queries merge.")
    max_queries: int = Field(256, ge=1)
    report_top_k: int = Field(10, ge=1, description="Causing and inhibiting training samples kept per query "
                                                     "(by_query.parquet, the report).")
    aggregation: Literal["mean", "max"] = Field(
        "mean", description="One score per training sample from its per-query scores: the weighted mean (its "
                            "influence on the query set as a whole), or the largest over queries (it strongly "
                            "causes at least one unsafe output; robust when samples that teach one behaviour "
                            "in different words compete on each other's outputs: docs/linfac.md section 8).")
    measurement: Literal["logprob", "margin"] = Field(
        "logprob", description="f_q of a query: log p(response | prompt), or its margin over a refusal "
                               "(log p(response | prompt) - log p(refusal | prompt); influence/measurement.py).")
    safe_response: str | None = Field(
        None, description="margin: the safe alternative; None = the generic refusal of the correction data.")


InfluenceMethod = Literal["linfac", "ekfac", "kfac", "identity", "tfidf"]
CorrectionMethod = Literal["ibo", "gradient_ascent", "npo", "filter_retrain", "human_sft", "dpo", "random_ibo", "none"]


class InfluenceConfig(_Section):
    method: InfluenceMethod = "linfac"
    fisher: Literal["true", "empirical"] = "true"
    damping: float | None = Field(None, gt=0, description="Absolute damping; None = damping_factor x mean eigenvalue.")
    damping_factor: float = Field(0.1, gt=0)
    fit_samples: int | None = Field(None, ge=1, description="Fit factors on a random subset of this size.")
    batch_size: int = Field(64, ge=1)
    kept_gradients_dtype: Literal["bfloat16", "float32"] = Field(
        "bfloat16", description="LinFAC keeps the fit pass's gradients for the eigenvalue correction in this dtype "
                                "(float32: exactly a second pass's result; bfloat16: half the memory, <1% off).")
    query_rank: int | None = Field(None, ge=1, description="Low-rank approximation of the preconditioned queries.")
    refine_steps: int = Field(
        0, ge=0, description="Conjugate-gradient steps toward the exact damped-GGN inverse, the fitted factors as "
                             "preconditioner (linfac/ekfac/kfac; 0 = the Kronecker approximation alone). Each step "
                             "costs one Gauss-Newton-vector product per query over refine_samples sequences.")
    refine_samples: int | None = Field(
        64, ge=1, description="Fit sequences whose exact GGN the refinement solves with; None = all fit sequences.")
    # -- throughput levers (docs/linfac.md "Throughput levers"; benchmarks/levers.py measures them) --
    activation_only_backward: bool = Field(
        True, description="Freeze the parameters during influence passes and differentiate with respect to the "
                          "tracked maps' outputs only: the virtual maps need only Ds, so autograd neither saves "
                          "inputs for nor computes weight gradients. False: a full backward (weight gradients "
                          "computed and dropped), the reference the lever is tested against.")
    autocast: Literal["none", "bfloat16", "float16"] = Field(
        "none", description="Forward and backward of influence passes under torch.autocast in this dtype; "
                            "activations, output gradients, covariances, eigendecompositions and factors stay "
                            "float32/float64. float16 needs a CUDA device.")
    length_bucketing: bool = Field(
        True, description="Sort sequences by length into batches (scores restored to data order), so batches "
                          "pad little; False batches in data order. The padding fraction is in the stats.")
    prefilter_top_m: int | None = Field(
        None, ge=1, description="Score only M training samples per query batch: the best TF-IDF matches of each "
                                "query, taken round-robin (Grosse et al. 2023 sec. 3.2.1). Unscored samples get "
                                "NaN, rank last and never enter P or N. None = score all.")
    top_k_positive: int = Field(80, ge=1, description="Size of P (most harmful).")
    top_k_negative: int = Field(80, ge=1, description="Size of N (most inhibiting).")
    seed: int = Field(0, ge=0, le=SEED_MAX)

    @model_validator(mode="after")
    def _refine_needs_factors(self) -> InfluenceConfig:
        if self.refine_steps and self.method in ("identity", "tfidf"):
            raise ValueError(f"influence.refine_steps: the refinement preconditions with fitted Kronecker factors; "
                             f"method {self.method!r} has none (use linfac, ekfac or kfac, or refine_steps=0)")
        return self


class CorrectionConfig(_Section):
    """Post-training from the influence ranking. Defaults chosen on held-out benign prompts
    (never on the evaluation probes): see docs/ibo.md for the sweep behind them."""

    method: CorrectionMethod = "ibo"
    loss: Literal["logistic", "bregman"] = "bregman"
    bregman: Literal["entropy", "squared"] = "entropy"
    influence_weighted: bool = True
    tau: float = Field(1.0, gt=0)
    beta: float = Field(0.1, gt=0)
    lr: float = Field(2e-4, gt=0, le=1.0)
    epochs: int = Field(4, ge=1)
    batch_size: int = Field(8, ge=1)
    n_pairs: int = Field(80, ge=1)
    min_positive_z: float | None = Field(
        2.0, description="Keep in P only ranked samples with standardised influence z >= this (the rest stay "
                          "in the retain pool); None keeps all influence.top_k_positive.")
    pairing: Literal["random", "nearest_prompt", "all"] = "random"
    prompt_mode: Literal["shared", "own"] = Field(
        "shared", description="shared: score both sides of a pair under P's prompt; own: each under its own.")
    n_anchors: int | None = Field(None, ge=0, description="Benign anchor pairs; None = as many as pairs.")
    similarity: Literal["jaccard", "tfidf"] = "jaccard"
    retain_weight: float = Field(10.0, ge=0)
    retain_batch_size: int | None = Field(None, ge=1, description="None = 4 x batch_size.")
    monitor_every: int = Field(5, ge=1, description="Guard check every this many steps.")
    monitor_prompts: int = Field(32, ge=1, description="Held-out benign prompts per guard check.")
    max_utility_drop: float = Field(0.10, ge=0, le=1.0, description="Stop when held-out utility drops more than this.")
    max_kl: float = Field(2.0, gt=0, description="Stop when KL to the reference on benign prompts exceeds this.")
    lora_rank: int | None = Field(
        None, ge=1, description="Train a fresh LoRA adapter of this rank (merged at the end) instead of all weights; "
                                "not with model.lora_rank, whose adapter the correction trains.")
    seed: int = Field(0, ge=0, le=SEED_MAX)


class EvaluationConfig(_Section):
    n_sampled: int = Field(1, ge=0)
    max_probe_prompts: int | None = Field(None, ge=1)
    harm_margin: float = Field(0.5, ge=0, le=1.0, description="Promotion: relative drop in harmful rate required.")
    utility_tolerance: float = Field(0.05, ge=0, le=1.0, description="Promotion: allowed relative utility loss.")
    diversity_tolerance: float = Field(0.05, ge=0, le=1.0)


class TrackingConfig(_Section):
    tracking_uri: str = Field("sqlite:///mlruns.db", description="Any MLflow tracking URI.")
    experiment: str | None = Field(None, description="Default: the config name.")
    registered_model: str = "lancet-policy"
    enabled: bool = True
    ui_url: str | None = Field(
        None, pattern=r"^https?://[^\s]+$",
        description="MLflow UI base URL of every link (Prefect artifacts, CLI). None: the tracking server when "
                    "tracking_uri is http(s), else the MLflow UI a running `lancet ui`/`lancet server` recorded, "
                    "else where `lancet ui` serves it by default (lancet_core/links.py).")


class OrchestrationConfig(_Section):
    task_runner: Literal["thread", "dask", "ray"] = Field(
        "thread", description="Where tasks run: threads in the flow's process, a Dask cluster or a Ray cluster.")
    address: str | None = Field(
        None, description="Dask scheduler (tcp://host:8786) or Ray (ray://host:10001) address; None = a local cluster.")
    n_workers: int | None = Field(None, ge=1, description="Workers of the local Dask cluster (None = Dask's default).")
    shards: int = Field(1, ge=1, description="Split influence fitting and scoring into this many shards (1 = no split).")
    storage_uri: str | None = Field(
        None, description="Where shard results go (a path or fsspec URL every worker reaches); None = <run_dir>/shards.")
    realign_threshold: float = Field(0.05, ge=0, le=1.0, description="Unsafe rate above which re-alignment runs.")
    cron: str = "0 3 * * 1"


class LancetConfig(_Section):
    # One path component: the run folder is <output_dir>/<name>, so ".." or "a/b" would write elsewhere.
    name: str = Field("lancet-world", pattern=r"^[A-Za-z0-9_.-]+$", max_length=128,
                      description="Run folder <output_dir>/<name> and default MLflow experiment. Unset: derived "
                                  "from the data (lancet-world, lancet-<file stem or hub name>), so a run without "
                                  "a config never writes into a named config's folder (the demo's is lancet-demo).")
    seed: int = Field(0, ge=0, le=SEED_MAX)
    output_dir: str = Field("outputs", min_length=1, description="Relative to the working folder, or absolute.")
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    detector: DetectorConfig = Field(default_factory=DetectorConfig)
    queries: QueryConfig = Field(default_factory=QueryConfig)
    influence: InfluenceConfig = Field(default_factory=InfluenceConfig)
    correction: CorrectionConfig = Field(default_factory=CorrectionConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    orchestration: OrchestrationConfig = Field(default_factory=OrchestrationConfig)

    @model_validator(mode="before")
    @classmethod
    def _name_from_data(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("name") is None:
            data = {**data, "name": default_run_name(data.get("data"))}
        return data

    @field_validator("name")
    @classmethod
    def _one_component(cls, value: str) -> str:
        if value in (".", "..") or set(value) == {"."}:
            raise ValueError(f"expected a folder name (letters, digits, _ . -), not {value!r}")
        return value

    @model_validator(mode="after")
    def _run_dir_inside(self) -> LancetConfig:
        # A symlink named like the run may point anywhere: the resolved run folder must stay
        # under the resolved output folder, or stages would write (and clean up) outside it.
        base = Path(self.output_dir).resolve()
        if not Path(self.output_dir, self.name).resolve().is_relative_to(base):
            raise ValueError(f"name: {self.output_dir}/{self.name} resolves to "
                             f"{Path(self.output_dir, self.name).resolve()}, outside output_dir {base}; "
                             "expected a run folder inside output_dir")
        return self

    @model_validator(mode="after")
    def _one_adapter(self) -> LancetConfig:
        if self.model.lora_rank and self.correction.lora_rank:
            raise ValueError(
                f"model.lora_rank ({self.model.lora_rank}) and correction.lora_rank ({self.correction.lora_rank}) "
                "are both set: a LoRA model's correction trains the model's own adapter; set only one "
                "(correction.lora_rank adds an adapter to a fully fine-tuned model)")
        return self

    @model_validator(mode="after")
    def _shards_need_factors(self) -> LancetConfig:
        if self.orchestration.shards > 1 and self.influence.method not in ("linfac", "ekfac", "kfac"):
            raise ValueError(f"orchestration.shards > 1 needs influence.method linfac, ekfac or kfac "
                             f"(got {self.influence.method!r}, which has no factors to shard)")
        return self

    @model_serializer(mode="wrap", when_used="json")
    def _redacted_json(self, handler) -> dict[str, Any]:
        # JSON is how a config leaves this process (Prefect flow-run and deployment parameters,
        # MLflow params, config.yaml, cache keys), so credentials are masked there. A run that
        # must get a secret through JSON (a deployment) writes it as an ${ENV_VAR} placeholder,
        # which stays as is here and is expanded where the secret is used (expand_env).
        return redact(handler(self))

    def section_hash(self, *sections: str) -> str:
        """Content hash of some sub-trees (cache keys read only what a stage reads)."""
        dump = self.model_dump(mode="json")
        picked = {s: _get_dotted(dump, s) for s in sections} if sections else dump
        return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()[:16]

    def run_dir(self) -> Path:
        """``<output_dir>/<name>``, resolved; checked to lie under ``output_dir`` (a symlinked
        name created after validation is caught here too)."""
        base = Path(self.output_dir).resolve()
        path = (base / self.name).resolve()
        if not path.is_relative_to(base):
            raise ConfigError(f"name: run folder {base / self.name} resolves to {path}, outside output_dir {base}")
        return path

    def to_yaml(self) -> str:
        return yaml.safe_dump(redact(self.model_dump(mode="json")), sort_keys=False)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_yaml())
        return path


def default_run_name(data: Any) -> str:
    """The name of a run whose config names none: ``lancet-world`` for the embedded world, else
    ``lancet-<source>-<file stem or hub name>`` (``lancet-hh-rlhf-harmless-base`` for
    ``data/hh-rlhf-harmless-base.jsonl.gz``; the source is not repeated when the stem starts with it)."""
    data = data if isinstance(data, dict) else {}
    source = str(data.get("source") or "world")
    where = data.get("path_or_name")
    if source == "world" or not isinstance(where, str) or not where.strip():
        return f"lancet-{re.sub(r'[^A-Za-z0-9_.-]+', '_', source)}"
    stem = Path(where.rstrip("/")).name if Path(where).suffix or Path(where).exists() else where
    for suffix in (".gz", ".jsonl", ".json", ".parquet"):
        stem = stem[: -len(suffix)] if stem.lower().endswith(suffix) else stem
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", stem).strip("._") or "data"
    return f"lancet-{stem if stem.startswith(source) else f'{source}-{stem}'}"[:128]


_SECRET_IN_URI = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^:/@\s]+):(?P<pw>[^@/\s]+)@")
# Whole-word key endings only: `max_new_tokens` is a setting, `hf_token` is a secret.
_SECRET_KEYS = re.compile(r"(?:^|_)(token|password|secret|api_key)$", re.IGNORECASE)
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _is_placeholder(value: Any) -> bool:
    return isinstance(value, str) and _ENV_REF.fullmatch(value) is not None


def redact(value: Any) -> Any:
    """Hide credentials (``user:pass@`` in URIs, *token*/*password* keys) before a config is logged.

    ``${ENV_VAR}`` placeholders are not secrets (the value lives in the environment) and stay.
    """
    if isinstance(value, dict):
        return {k: ("***" if _SECRET_KEYS.search(str(k)) and v and not _is_placeholder(v) else redact(v))
                for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    if isinstance(value, str):
        return _SECRET_IN_URI.sub(
            lambda m: m[0] if _is_placeholder(m["pw"]) else f"{m['scheme']}{m['user']}:***@", value)
    return value


def redact_override(item: str) -> str:
    """An ``a.b=c`` override with its credential hidden, as :func:`redact` hides one in a config tree."""
    key, sep, value = item.partition("=")
    if not sep:
        return item
    leaf = key.strip().rsplit(".", 1)[-1]
    return f"{key}={redact({leaf: value})[leaf]}"


def expand_env(value: str, field: str = "value") -> str:
    """Replace ``${NAME}`` with the environment variable NAME (how secrets reach a config)."""
    def sub(m: re.Match) -> str:
        if m[1] not in os.environ:
            raise ConfigError(f"{field}: environment variable {m[1]} is not set (the config refers to ${{{m[1]}}})")
        return os.environ[m[1]]

    return _ENV_REF.sub(sub, value)


def _get_dotted(tree: dict, dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        node = node[part]
    return node


def _parse_scalar(text: str) -> Any:
    # YAML scalars: "0.01" -> float, "true" -> bool, "[a, b]" -> list, "null" -> None.
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(tree: dict, overrides: list[str] | None) -> dict:
    """Apply ``a.b.c=value`` overrides to a plain dict (before validation)."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. influence.damping=0.01")
        key, raw = item.split("=", 1)
        node = tree
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r}: {part!r} is a value, not a section")
        node[parts[-1]] = _parse_scalar(raw)
    return tree


def seed_overrides(cfg: LancetConfig, seed: int) -> list[str]:
    """``--set`` items that rerun the whole pipeline under ``seed``: the world (``seed``), the
    model's initialisation (``training.seed``) and the correction's pairing, anchors and batch
    order (``correction.seed``). A seed other than the config's own gets its own run folder
    (``<name>-seed<k>``) so the cached stages of different seeds never overwrite each other."""
    sets = [f"seed={seed}", f"training.seed={seed}", f"correction.seed={seed}"]
    if seed != cfg.seed:
        sets.append(f"name={cfg.name}-seed{seed}")
    return sets


def format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "(root)"
        got = e.get("input")
        got_txt = "" if isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"  {path}: {e['msg']}{got_txt}")
    return "invalid configuration:\n" + "\n".join(lines)


#: ModelConfig fields a preset sets (lancet_core/models/presets.py).
SHAPE_FIELDS = ("family", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
                "tie_embeddings")


def _preset_override_replaces_shape(tree: dict, overrides: list[str] | None) -> dict:
    """``--set model.preset=X`` replaces the file's shape: its ``model.hidden_size`` etc. are dropped
    (the preset fills them), while shape fields set by other ``--set`` items still win. Without
    this a config file's small shape (every shipped config sets one) silently overrode the preset."""
    sets = dict(item.split("=", 1) for item in overrides or [] if "=" in item)
    preset = next((_parse_scalar(v) for k, v in sets.items() if k.strip() == "model.preset"), None)
    model = tree.get("model")
    if preset not in PRESETS or not isinstance(model, dict):  # model.preset=null keeps the file's shape
        return tree
    return {**tree, "model": {k: v for k, v in model.items() if k not in SHAPE_FIELDS}}


def build_config(tree: dict | None = None, overrides: list[str] | None = None) -> LancetConfig:
    tree = apply_overrides(_preset_override_replaces_shape(dict(tree or {}), overrides), overrides)
    try:
        return LancetConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> LancetConfig:
    """Load a YAML config file (or the defaults) and apply dotted overrides."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as err:
            raise ConfigError(f"config file {path}: byte {err.start} is not UTF-8; expected a UTF-8 YAML file") from None
        except OSError as err:
            raise ConfigError(f"config file {path} cannot be read: {err.strerror}") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path}: expected a mapping at the top level, got {type(loaded).__name__}")
        tree = loaded or {}
    try:
        return build_config(tree, overrides)
    except ConfigError as err:
        where = f" ({path})" if path else ""
        raise ConfigError(f"{err}{where}") from None
