"""Bounded work per row: huge or unencodable text is a bad row, found before any tokenizer work."""

from __future__ import annotations

import json
import time

import pytest

from lancet_core.config import DataConfig
from lancet_core.data.loaders import MAX_CHARS, BadRowError, load_records


def write(tmp_path, rows: list[str]):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def ok(i: int) -> str:
    return json.dumps({"prompt": f"question {i}", "response": f"answer {i}"})


@pytest.mark.parametrize("bad, field, says", [
    (json.dumps({"prompt": "q", "response": "x" * (MAX_CHARS + 1)}), "response", f"at most {MAX_CHARS}"),
    ('{"prompt": "lone \\ud800 surrogate", "response": "a"}', "prompt", "unencodable"),
])
def test_bad_text_is_a_bad_row_with_file_and_line(tmp_path, bad, field, says):
    path = write(tmp_path, [ok(1), bad, ok(3)])
    cfg = DataConfig(source="generic", path_or_name=str(path))
    with pytest.raises(BadRowError) as err:
        load_records(cfg)
    assert err.value.where == f"{path} line 2" and err.value.field == field and says in str(err.value)
    loaded = load_records(cfg.model_copy(update={"on_bad_rows": "skip"}))
    assert loaded.report.n_skipped == 1 and len(loaded.frame) == 2


def test_a_10_mb_row_is_refused_fast(tmp_path):
    path = write(tmp_path, [json.dumps({"prompt": "q", "response": "y" * 10_000_000})])
    t0 = time.monotonic()
    with pytest.raises(BadRowError, match="10000000 characters"):
        load_records(DataConfig(source="generic", path_or_name=str(path)))
    assert time.monotonic() - t0 < 5  # generous (under load): reading and one len(), no tokenizer


def test_text_at_the_limit_is_kept(tmp_path):
    path = write(tmp_path, [json.dumps({"prompt": "q", "response": "z" * MAX_CHARS})])
    assert len(load_records(DataConfig(source="generic", path_or_name=str(path))).frame) == 1
