"""Load a training table from a file or the hub into LANCET's one row convention.

Every source ends as a DataFrame with ``sample_id``, ``prompt`` and ``response`` (the
sample whose influence is studied), plus, when the source has them, ``chosen_response``,
``rejected_response``, ``is_safe`` and ``category``. The prompt is the user text that
:func:`lancet_core.models.encoding.format_prompt` wraps; the response is the assistant text.

Sources (``DataConfig.source``)
-------------------------------
* ``hh-rlhf``: rows with ``chosen``/``rejected`` dialogues in the "\\n\\nHuman: ... \\n\\nAssistant: ..."
  format. As in the LANCET paper, prompt + *rejected* is the (unsafe) training data:
  ``response`` = ``rejected_response``; ``chosen_response`` is kept beside it as the
  human-preferred alternative for the DPO / human-corrected baselines. The prompt is the
  dialogue before the final assistant turn with the first "Human: " label and the last
  "Assistant:" cue removed, so ``format_prompt`` rebuilds the original text exactly on
  templateless models; earlier turns stay inline with their role labels.
  In a few real rows the two dialogues differ before the final turn: the prompt is then their
  longest common prefix that ends on a Human turn, and each response is the rest of its
  dialogue (turns after the first inline, with role labels). A blank *chosen* reply leaves
  ``chosen_response`` missing (``pd.isna``; the row stays: its rejected reply is what is
  studied); a blank *rejected* reply is a bad row.
* ``beavertails``: ``prompt``, ``response``, ``is_safe`` (bool), ``category`` (the real dict
  of category -> bool, or a string); active categories are stored sorted, comma-separated.
* ``generic``: ``cfg.columns`` maps our field names to the file's (``{"prompt": "question"}``).
* ``world``: the embedded world's train table (needs the run seed).

``cfg.columns`` renames raw fields for every file source (keys: the fields listed above).
Local files: ``.jsonl``, ``.json`` (a list of objects, or JSON lines), ``.parquet``, each
optionally ``.gz`` (not parquet). A path that does not exist but looks like ``owner/name`` is
read with ``datasets.load_dataset(name, split=cfg.split)``; ``split`` is ignored for files.

A malformed row raises :class:`BadRowError` naming file, line and field; with
``on_bad_rows: skip`` it is dropped, counted in the report and logged. ``sample_id`` is
``<source>-<line or record number>`` so ids survive skipping and truncation.
``max_samples`` keeps the first N valid rows in file order (reading stops there).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import math
import numbers
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from collections.abc import Iterator
from typing import Any

import pandas as pd

from lancet_core.config import DataConfig
from lancet_core.errors import LancetUserError

log = logging.getLogger(__name__)

COLUMN_ORDER = ["sample_id", "prompt", "response", "chosen_response", "rejected_response", "is_safe", "category"]
# Raw fields each source reads (the keys cfg.columns may rename) and which are required.
SOURCE_FIELDS: dict[str, dict[str, bool]] = {
    "hh-rlhf": {"chosen": True, "rejected": True},
    "beavertails": {"prompt": True, "response": True, "is_safe": True, "category": True},
    "generic": {"sample_id": False, "prompt": True, "response": True, "chosen_response": False,
                "rejected_response": False, "is_safe": False, "category": False},
}
MAX_REASONS = 10
#: Longest text field a row may have (characters). Tokenizer training (Rust, deaf to SIGINT)
#: and SFT work grow with the longest row, so a 10 MB row is a bad row, not minutes of work.
MAX_CHARS = 100_000
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".jsonl.gz", ".json.gz")
_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):")


class DataLoadError(LancetUserError, ValueError):
    """The dataset as a whole cannot be loaded (missing file, wrong format, no valid rows)."""


class BadRowError(LancetUserError, ValueError):
    """One row is malformed; the message names file, line (or record) and field."""

    def __init__(self, where: str, field: str | None, reason: str):
        self.where, self.field, self.reason = where, field, reason
        super().__init__(f"{where}: field {field!r} {reason}" if field else f"{where}: {reason}")


@dataclass
class LoadReport:
    source: str
    path_or_name: str | None
    n_rows: int
    n_skipped: int = 0
    skipped_reasons: list[str] = field(default_factory=list)  # the first MAX_REASONS
    notes: list[str] = field(default_factory=list)
    digest: str = ""  # sha256 of the canonical table: the cache key of everything downstream

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class LoadedData:
    frame: pd.DataFrame
    report: LoadReport


def load_records(cfg: DataConfig, seed: int = 0) -> LoadedData:
    """Load ``cfg``'s dataset; ``seed`` only matters for the embedded world."""
    if cfg.source == "world":
        from lancet_core.data.world import build_world

        frame = build_world(cfg.world, seed=seed).train
        frame = frame.head(cfg.max_samples).reset_index(drop=True) if cfg.max_samples else frame
        return LoadedData(frame, LoadReport("world", None, len(frame), digest=table_digest(frame)))

    names = _column_names(cfg)
    parse = {"hh-rlhf": _parse_hh, "beavertails": _parse_beavertails, "generic": _parse_generic}[cfg.source]
    label, unit, rows = _open_source(cfg)
    out: list[dict] = []
    report = LoadReport(cfg.source, cfg.path_or_name, 0)
    for n, rec in rows:
        where = f"{label} {unit} {n}"
        try:
            if isinstance(rec, BadRowError):
                raise BadRowError(where, None, rec.reason)
            if not isinstance(rec, dict):
                raise BadRowError(where, None, f"expected a JSON object, got {type(rec).__name__}")
            row = parse(rec, names, where)
        except BadRowError as err:
            if cfg.on_bad_rows == "raise":
                raise
            report.n_skipped += 1
            if len(report.skipped_reasons) < MAX_REASONS:
                report.skipped_reasons.append(str(err))
            continue
        row.setdefault("sample_id", f"{cfg.source}-{n:06d}")
        out.append(row)
        if cfg.max_samples and len(out) >= cfg.max_samples:
            break

    if report.n_skipped:
        log.warning("%s: skipped %d malformed rows (first: %s)", label, report.n_skipped, report.skipped_reasons[0])
    if not out:
        raise DataLoadError(f"{label}: no valid rows" + (f" ({report.n_skipped} malformed rows skipped)"
                                                         if report.n_skipped else " (the dataset is empty)"))
    frame = pd.DataFrame(out)
    report.notes = _notes(frame, cfg.source)
    frame = frame[[c for c in COLUMN_ORDER if c in frame.columns]]
    if frame["sample_id"].duplicated().any():
        dup = frame.loc[frame["sample_id"].duplicated(), "sample_id"].iloc[0]
        raise DataLoadError(f"{label}: sample_id {dup!r} occurs more than once")
    report.n_rows = len(frame)
    report.digest = table_digest(frame)
    return LoadedData(frame, report)


def table_digest(frame: pd.DataFrame) -> str:
    payload = json.dumps(frame.to_dict(orient="split"), sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()


# ---------------------------------------------------------------------------- reading
def _column_names(cfg: DataConfig) -> dict[str, str]:
    allowed = SOURCE_FIELDS[cfg.source]
    unknown = sorted(set(cfg.columns) - set(allowed))
    if unknown:
        raise DataLoadError(f"data.columns: unknown keys {unknown} for source {cfg.source!r}; "
                            f"expected some of {sorted(allowed)}")
    if cfg.source == "generic":  # optional fields are read only when mapped
        return {f: cfg.columns.get(f, f) for f, req in allowed.items() if req or f in cfg.columns}
    return {f: cfg.columns.get(f, f) for f in allowed}


def _open_source(cfg: DataConfig) -> tuple[str, str, Iterator[tuple[int, Any]]]:
    """(label, 'line' or 'row', iterator of (1-based number, raw record or BadRowError))."""
    name = str(cfg.path_or_name)
    path = Path(name)
    if path.is_file():
        return (name, *_read_file(path, name))
    if path.exists():
        raise DataLoadError(f"data path {name} is not a file")
    if not looks_like_hub_name(name):
        raise DataLoadError(f"data file {name} does not exist (and does not look like a hub dataset name)")
    return f"hub:{name}[{cfg.split}]", "row", _read_hub(name, cfg.split)


def looks_like_hub_name(name: str) -> bool:
    """Whether a path that does not exist would be read from the hub (``owner/name``)."""
    return not name.lower().endswith(_FILE_SUFFIXES) and _HUB_NAME.match(name) is not None


def _read_file(path: Path, label: str) -> tuple[str, Iterator[tuple[int, Any]]]:
    lower = path.name.lower()
    base = lower[:-3] if lower.endswith(".gz") else lower
    if base.endswith(".parquet") and base == lower:
        try:
            records = pd.read_parquet(path).to_dict(orient="records")
        except Exception as err:  # pyarrow raises several types for a broken file
            raise DataLoadError(f"{label}: not a readable parquet file ({err})") from None
        return "row", enumerate(records, 1)
    if not base.endswith((".jsonl", ".json")):
        raise DataLoadError(f"{label}: unsupported file type; expected one of {', '.join(_FILE_SUFFIXES)}")
    try:
        data = gzip.decompress(path.read_bytes()) if lower.endswith(".gz") else path.read_bytes()
    except (OSError, EOFError) as err:
        raise DataLoadError(f"{label}: not a valid gzip file ({err})") from None
    if base.endswith(".json"):
        # A .json file holds a list of objects, or JSON lines (as the hub's loader allows).
        try:
            whole = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError):
            whole = None
        if isinstance(whole, list):
            return "row", enumerate(whole, 1)
        if isinstance(whole, dict) and len(data.strip().split(b"\n")) > 1:
            raise DataLoadError(f"{label}: expected a JSON list of objects or JSON lines, got one object")
    return "line", _json_lines(data)


def _json_lines(data: bytes) -> Iterator[tuple[int, Any]]:
    # Decode line by line so one bad line is one bad row, not a failed file.
    for n, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        try:
            yield n, json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            yield n, BadRowError("", None, "not valid UTF-8")  # the caller fills in where
        except json.JSONDecodeError as err:
            yield n, BadRowError("", None, f"not valid JSON ({err.msg} at column {err.colno})")


def _read_hub(name: str, split: str) -> Iterator[tuple[int, Any]]:
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as err:  # offline, unknown name, unknown split: all end the same way
        raise DataLoadError(f"could not load hub dataset {name!r} (split {split!r}): {err}") from err
    return enumerate(ds, 1)


# ---------------------------------------------------------------------------- fields
def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _get(rec: dict, raw: str, where: str, kind: str) -> Any:
    """Fetch and type-check one field: kind is 'text', 'id', 'bool' or 'category'."""
    expected = {"text": "a string", "id": "a string or an integer", "bool": "a boolean",
                "category": "a dict of category -> bool, or a string"}[kind]
    if raw not in rec:
        raise BadRowError(where, raw, f"is missing (expected {expected})")
    value = rec[raw]
    if _missing(value):
        raise BadRowError(where, raw, f"is null (expected {expected})")
    if kind in ("text", "id"):
        ok = (str, numbers.Integral) if kind == "id" else str
        if isinstance(value, bool) or not isinstance(value, ok):
            raise BadRowError(where, raw, f"has type {type(value).__name__} (expected {expected})")
        text = str(value)
        if not text.strip():
            raise BadRowError(where, raw, "is empty (expected non-empty text)")
        if len(text) > MAX_CHARS:
            raise BadRowError(where, raw, f"has {len(text)} characters (expected at most {MAX_CHARS})")
        try:  # JSON "\ud800" decodes to a lone surrogate, which no tokenizer or parquet file can hold
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise BadRowError(where, raw, f"has unencodable text at character {err.start} "
                                          f"(expected valid Unicode, e.g. no lone surrogate)") from None
        return text.strip()
    if kind == "bool":
        if type(value).__name__ not in ("bool", "bool_"):  # Python or numpy (parquet) booleans
            raise BadRowError(where, raw, f"has type {type(value).__name__} (expected {expected})")
        return bool(value)
    if isinstance(value, str):
        return ",".join(sorted(c.strip() for c in value.split(",") if c.strip()))
    if isinstance(value, dict):
        # Parquet structs fill keys a row lacks with None: read as "not active".
        bad = [k for k, v in value.items() if not (_missing(v) or type(v).__name__ in ("bool", "bool_"))]
        if bad:
            raise BadRowError(where, raw, f"has a non-boolean value for {bad[0]!r} (expected {expected})")
        return ",".join(sorted(str(k) for k, v in value.items() if not _missing(v) and v))
    raise BadRowError(where, raw, f"has type {type(value).__name__} (expected {expected})")


def _parse_beavertails(rec: dict, names: dict[str, str], where: str) -> dict:
    return {"prompt": _get(rec, names["prompt"], where, "text"),
            "response": _get(rec, names["response"], where, "text"),
            "is_safe": _get(rec, names["is_safe"], where, "bool"),
            "category": _get(rec, names["category"], where, "category")}


def _parse_generic(rec: dict, names: dict[str, str], where: str) -> dict:
    kinds = {"sample_id": "id", "is_safe": "bool", "category": "category"}
    return {f: _get(rec, raw, where, kinds.get(f, "text")) for f, raw in names.items()}


def _turns(text: str, raw: str, where: str) -> list[tuple[str, str]]:
    parts = _TURN.split(text)
    if parts[0].strip() or len(parts) < 3 or parts[1] != "Human":
        raise BadRowError(where, raw, "is not a dialogue starting with '\\n\\nHuman:'")
    turns = [(parts[i], parts[i + 1].strip()) for i in range(1, len(parts), 2)]
    if turns[-1][0] != "Assistant":
        raise BadRowError(where, raw, "does not end with an Assistant turn")
    return turns


def _render(turns: list[tuple[str, str]]) -> str:
    # The first turn's label is left out: format_prompt adds "Human: ", and a response
    # continuation is assistant text from the start.
    return "".join([turns[0][1]] + [f"\n\n{role}: {text}" for role, text in turns[1:]]).strip()


def _parse_hh(rec: dict, names: dict[str, str], where: str) -> dict:
    chosen = _turns(_get(rec, names["chosen"], where, "text"), names["chosen"], where)
    rejected = _turns(_get(rec, names["rejected"], where, "text"), names["rejected"], where)
    k = 0
    while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
        k += 1
    # The prompt must end on a Human turn that both dialogues answer.
    while k > 0 and not (chosen[k - 1][0] == "Human" and k < len(chosen) and k < len(rejected)
                         and chosen[k][0] == rejected[k][0] == "Assistant"):
        k -= 1
    if k == 0:
        raise BadRowError(where, names["chosen"], f"shares no opening Human turn with {names['rejected']!r}")
    prompt, response = _render(chosen[:k]), _render(rejected[k:])
    if not response:
        raise BadRowError(where, names["rejected"], "has an empty final Assistant turn (expected non-empty text)")
    return {"prompt": prompt, "response": response, "chosen_response": _render(chosen[k:]) or None,
            "rejected_response": response, "_diverged": len(rejected) - k > 1 or len(chosen) - k > 1}


def _notes(frame: pd.DataFrame, source: str) -> list[str]:
    notes = []
    if "_diverged" in frame.columns:
        n = int(frame.pop("_diverged").sum())
        if n:
            notes.append(f"{n} rows: chosen and rejected differ before the final turn; prompt = their "
                         "longest common dialogue prefix, responses = the rest of each dialogue")
    if source == "hh-rlhf" and frame["chosen_response"].isna().any():
        notes.append(f"{int(frame['chosen_response'].isna().sum())} rows have an empty chosen reply "
                     "(chosen_response is missing; the rejected reply is kept)")
    return notes
