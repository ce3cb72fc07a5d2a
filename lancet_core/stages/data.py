"""Stage 1 - data: the training table, held-out benign samples, probe prompts and eval sets.

Writes parquet tables into ``<run>/data``. The embedded world also writes its ground-truth
labels; real datasets get probes drawn from held-out prompts of the same file (three quarters
of the held-out rows; the last quarter is the correction guard's selection split).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pandas as pd

from lancet_core.config import LancetConfig
from lancet_core.stages.common import StageResult, run_stage, stage_inputs

#: Identity of this stage (lancet_core.stages.common): the settings it reads and the code it runs.
READS = ("data", "seed")
CODE = ("lancet_core.data", "lancet_core.stages.data")

TABLES = ("train", "heldout", "probes", "qa_eval", "howto_eval")


def table_digest(df: pd.DataFrame) -> str:
    """Content digest of a table (row order and values), stable across processes."""
    h = hashlib.sha256()
    h.update(",".join(df.columns).encode())
    h.update(pd.util.hash_pandas_object(df.astype(str), index=False).values.tobytes())
    return h.hexdigest()[:16]


def _world_tables(cfg: LancetConfig) -> dict[str, pd.DataFrame]:
    from lancet_core.data.world import build_world

    world = build_world(cfg.data.world, seed=cfg.seed)
    return {"train": world.train, "heldout": world.heldout, "probes": world.probes,
            "qa_eval": world.qa_eval, "howto_eval": world.howto_eval}


def _dataset_tables(cfg: LancetConfig) -> dict[str, pd.DataFrame]:
    from lancet_core.data.loaders import load_records

    df = load_records(cfg.data, seed=cfg.seed).frame
    df = df.sample(frac=1.0, random_state=cfg.seed).reset_index(drop=True)
    n_held = max(1, min(len(df) // 10, 200))
    heldout, train = df.iloc[:n_held].copy(), df.iloc[n_held:].copy()
    for col, default in (("kind", "data"), ("category", ""), ("family", ""), ("planted", False)):
        if col not in train:
            train[col] = default
    # Probes: held-out prompts, so generation is not a memory test of the training set. The last
    # quarter of the held-out rows is no probe: the selection split the correction guard reads
    # (lancet_core.evaluation.selection), disjoint from what the evaluation grades.
    asked = heldout.iloc[: len(heldout) - len(heldout) // 4] if len(heldout) > 1 else heldout
    probes = pd.DataFrame({
        "probe_id": [f"p-{i:05d}" for i in range(len(asked))], "prompt": asked["prompt"].tolist(),
        "category": asked.get("category", pd.Series([""] * len(asked))).tolist(),
        "family": "", "phrasing": "unseen", "planted_category": False,
    })
    empty = pd.DataFrame({"prompt": pd.Series(dtype=str), "answer": pd.Series(dtype=str)})
    return {"train": train, "heldout": heldout, "probes": probes, "qa_eval": empty, "howto_eval": empty.copy()}


def load_tables(data_dir: str | Path) -> dict[str, pd.DataFrame]:
    data_dir = Path(data_dir)
    return {name: pd.read_parquet(data_dir / f"{name}.parquet") for name in TABLES}


def source_key(cfg: LancetConfig) -> str:
    """Content key of the data source: a local file's sha256 (so an edited file is re-read), else its name.

    A hub dataset cannot be hashed before it is downloaded; its name and split (in the
    config) stand for it.
    """
    from lancet_core.storage import file_sha256

    path = Path(cfg.data.path_or_name) if cfg.data.path_or_name else None
    if cfg.data.source == "world" or path is None:
        return "embedded-world"
    if path.is_file():
        return file_sha256(path)[:16]
    if path.is_dir():
        return table_digest(pd.DataFrame({"file": [str(p.relative_to(path)) for p in sorted(path.rglob("*"))
                                                   if p.is_file()]}))
    return f"hub:{cfg.data.path_or_name}"


def data_stage(cfg: LancetConfig, force: bool = False) -> StageResult:
    inputs = stage_inputs("data", cfg, READS, CODE, source=source_key(cfg))

    def compute(out: Path) -> dict:
        tables = _world_tables(cfg) if cfg.data.source == "world" else _dataset_tables(cfg)
        if len(tables["train"]) == 0:
            raise ValueError(f"data: the training set from {cfg.data.source!r} is empty")
        for name, df in tables.items():
            df.to_parquet(out / f"{name}.parquet", index=False)
        train = tables["train"]
        return {"digest": table_digest(train[["sample_id", "prompt", "response"]]),
                "n_train": len(train), "n_planted": int(train["planted"].sum()),
                "n_probes": len(tables["probes"])}

    return run_stage(cfg.run_dir() / "data", inputs, compute, force=force)
