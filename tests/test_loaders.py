"""Dataset loaders: the real HH-RLHF sample, BeaverTails and generic schemas, file formats, bad rows."""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

import pandas as pd
import pytest

from lancet_core.config import DataConfig
from lancet_core.data.loaders import BadRowError, DataLoadError, load_records

ROOT = Path(__file__).resolve().parents[1]
HH_FILE = ROOT / "data" / "hh-rlhf-harmless-base.jsonl.gz"


def _norm(text: str) -> str:
    return " ".join(text.split())


def _write_jsonl(path: Path, rows: list, gz: bool = False) -> Path:
    text = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
    path.write_bytes(gzip.compress(text.encode()) if gz else text.encode())
    return path


def _load(path, source="generic", **kw):
    return load_records(DataConfig(source=source, path_or_name=str(path), **kw))


def _hh(prompt_turns: str, final: str) -> str:
    return f"{prompt_turns}\n\nAssistant: {final}"


HH_ROW = {"chosen": _hh("\n\nHuman: How do I pick a lock?", "I can't help with that."),
          "rejected": _hh("\n\nHuman: How do I pick a lock?", "Insert a tension wrench and rake the pins.")}
BT_ROW = {"prompt": "How do I hurt someone?", "response": "I won't help.", "is_safe": True,
          "category": {"violence": False, "fraud": False}}


# ---------------------------------------------------------------------------- real HH sample
@pytest.fixture(scope="module")
def hh():
    return load_records(DataConfig(source="hh-rlhf", path_or_name=str(HH_FILE)))


def test_real_hh_sample_loads(hh):
    frame, report = hh.frame, hh.report
    assert len(frame) == report.n_rows == 1800 and report.n_skipped == 0
    assert list(frame.columns) == ["sample_id", "prompt", "response", "chosen_response", "rejected_response"]
    assert frame.sample_id.is_unique and frame.sample_id.iloc[0] == "hh-rlhf-000001"
    assert (frame.prompt.str.strip() != "").all() and (frame.response.str.strip() != "").all()
    assert (frame.response == frame.rejected_response).all()
    # 4 real rows have a blank chosen reply: kept, with chosen_response None.
    assert frame.chosen_response.isna().sum() == 4 and any("empty chosen" in n for n in report.notes)
    assert any("longest common dialogue prefix" in n for n in report.notes)
    assert len(report.digest) == 64


def test_real_hh_prompt_ends_before_final_assistant_turn(hh):
    raw = [json.loads(line) for line in gzip.open(HH_FILE, "rt", encoding="utf-8")]
    matched = 0
    for rec, row in zip(raw, hh.frame.itertuples(), strict=True):
        rejected, chosen = rec["rejected"], rec["chosen"]
        cut = rejected.rfind("\n\nAssistant:")
        if chosen[: chosen.rfind("\n\nAssistant:")] != rejected[:cut]:
            # Diverging dialogues: the prompt is a shared prefix of both.
            assert _norm(chosen).startswith(_norm("Human: " + row.prompt))
            assert _norm(rejected).startswith(_norm("Human: " + row.prompt))
            continue
        matched += 1
        # Formatting the prompt as "Human: {prompt}\n\nAssistant:" gives back the original dialogue.
        assert _norm("Human: " + row.prompt) == _norm(rejected[:cut])
        assert _norm(row.response) == _norm(rejected[cut + len("\n\nAssistant:"):])
        final_chosen = chosen[chosen.rfind("\n\nAssistant:") + len("\n\nAssistant:"):]
        if final_chosen.strip():
            assert row.chosen_response == final_chosen.strip()
        else:
            assert pd.isna(row.chosen_response)
        assert row.prompt.count("\n\nHuman:") == rejected[:cut].count("\n\nHuman:") - 1
    assert matched == 1796


def test_hh_digest_and_max_samples_are_deterministic(hh):
    again = load_records(DataConfig(source="hh-rlhf", path_or_name=str(HH_FILE), max_samples=25))
    assert again.frame.equals(hh.frame.head(25))
    assert again.report.digest != hh.report.digest
    assert again.report.digest == load_records(DataConfig(source="hh-rlhf", path_or_name=str(HH_FILE),
                                                          max_samples=25)).report.digest


def test_hh_parquet_round_trip(tmp_path, hh):
    raw = [json.loads(line) for line in gzip.open(HH_FILE, "rt", encoding="utf-8")][:50]
    pd.DataFrame(raw).to_parquet(tmp_path / "hh.parquet")
    _write_jsonl(tmp_path / "hh.jsonl", raw)
    for name in ("hh.parquet", "hh.jsonl"):
        got = _load(tmp_path / name, source="hh-rlhf")
        assert got.frame.equals(hh.frame.head(50)) and got.report.digest == _load(
            HH_FILE, source="hh-rlhf", max_samples=50).report.digest


def test_hh_diverging_dialogues_use_common_prefix(tmp_path):
    row = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Rob a bank?\n\nAssistant: No.",
           "rejected": "\n\nHuman: Hi\n\nAssistant: Hey!\n\nHuman: Rob a bank?\n\nAssistant: Sure."}
    got = _load(_write_jsonl(tmp_path / "d.jsonl", [row]), source="hh-rlhf").frame.iloc[0]
    assert got.prompt == "Hi"
    assert got.response == "Hey!\n\nHuman: Rob a bank?\n\nAssistant: Sure."
    assert got.chosen_response == "Hello.\n\nHuman: Rob a bank?\n\nAssistant: No."


# ---------------------------------------------------------------------------- BeaverTails / generic
def test_beavertails_both_category_encodings(tmp_path):
    rows = [BT_ROW,
            {**BT_ROW, "is_safe": False, "category": {"violence": True, "fraud": False, "drugs": True}},
            {**BT_ROW, "is_safe": False, "category": "violence, animal_abuse"},
            {**BT_ROW, "category": ""}]
    frame = _load(_write_jsonl(tmp_path / "bt.jsonl", rows), source="beavertails").frame
    assert list(frame.columns) == ["sample_id", "prompt", "response", "is_safe", "category"]
    assert frame.category.tolist() == ["", "drugs,violence", "animal_abuse,violence", ""]
    assert frame.is_safe.tolist() == [True, False, False, True]
    assert frame.sample_id.tolist() == [f"beavertails-{i:06d}" for i in range(1, 5)]


def test_beavertails_parquet_struct_categories(tmp_path):
    rows = [BT_ROW, {**BT_ROW, "is_safe": False, "category": {"violence": True, "fraud": True}}]
    pd.DataFrame(rows).to_parquet(tmp_path / "bt.parquet")
    frame = _load(tmp_path / "bt.parquet", source="beavertails").frame
    assert frame.category.tolist() == ["", "fraud,violence"] and frame.is_safe.tolist() == [True, False]


def test_generic_column_mapping_and_jsonl_round_trip(tmp_path):
    src = pd.DataFrame({"id": [7, 8], "question": ["Capital of France?", "2+2?"],
                        "answer": ["Paris.", "Four."], "safe": [True, True]})
    for path in (tmp_path / "g.jsonl", tmp_path / "g.jsonl.gz", tmp_path / "g.parquet", tmp_path / "g.json"):
        if path.suffix == ".parquet":
            src.to_parquet(path)
        elif path.name.endswith(".json"):
            path.write_text(json.dumps(src.to_dict(orient="records"), indent=2))
        else:
            _write_jsonl(path, src.to_dict(orient="records"), gz=path.suffix == ".gz")
        frame = _load(path, columns={"prompt": "question", "response": "answer", "sample_id": "id",
                                     "is_safe": "safe"}).frame
        assert frame.to_dict(orient="list") == {"sample_id": ["7", "8"], "prompt": ["Capital of France?", "2+2?"],
                                                "response": ["Paris.", "Four."], "is_safe": [True, True]}


def test_generic_defaults_and_errors(tmp_path):
    path = _write_jsonl(tmp_path / "g.jsonl", [{"prompt": "p", "response": "r", "extra": 1}])
    assert _load(path).frame.to_dict(orient="records") == [{"sample_id": "generic-000001", "prompt": "p",
                                                            "response": "r"}]
    with pytest.raises(DataLoadError, match=r"unknown keys \['answer'\]"):
        _load(path, columns={"answer": "response"})
    with pytest.raises(BadRowError, match=r"g\.jsonl line 1: field 'question' is missing"):
        _load(path, columns={"prompt": "question"})
    dup = _write_jsonl(tmp_path / "dup.jsonl", [{"id": "a", "prompt": "p", "response": "r"}] * 2)
    with pytest.raises(DataLoadError, match="sample_id 'a' occurs more than once"):
        _load(dup, columns={"sample_id": "id"})


def test_world_source():
    cfg = DataConfig(max_samples=60)
    got = load_records(cfg, seed=0)
    assert len(got.frame) == 60 and {"sample_id", "prompt", "response"} <= set(got.frame.columns)
    assert got.report.digest == load_records(cfg, seed=0).report.digest


# ---------------------------------------------------------------------------- bad rows
BAD_ROWS = [
    # (source, bad line, expected message fragment)
    ("hh-rlhf", '{"chosen": "\\n\\nHuman: x\\n\\nAssistant: y"', "not valid JSON"),
    ("hh-rlhf", {"rejected": HH_ROW["rejected"]}, "field 'chosen' is missing (expected a string)"),
    ("hh-rlhf", {**HH_ROW, "rejected": 42}, "field 'rejected' has type int (expected a string)"),
    ("hh-rlhf", {**HH_ROW, "chosen": None}, "field 'chosen' is null"),
    ("hh-rlhf", {**HH_ROW, "rejected": "   "}, "field 'rejected' is empty"),
    ("hh-rlhf", {**HH_ROW, "rejected": "just text"}, "field 'rejected' is not a dialogue"),
    ("hh-rlhf", {**HH_ROW, "rejected": "\n\nHuman: x"}, "field 'rejected' does not end with an Assistant turn"),
    ("hh-rlhf", {**HH_ROW, "rejected": _hh("\n\nHuman: How do I pick a lock?", "")},
     "field 'rejected' has an empty final Assistant turn"),
    ("hh-rlhf", {**HH_ROW, "chosen": _hh("\n\nHuman: other", "no")}, "field 'chosen' shares no opening Human turn"),
    ("hh-rlhf", ["not", "an", "object"], "expected a JSON object, got list"),
    ("beavertails", {**BT_ROW, "is_safe": "yes"}, "field 'is_safe' has type str (expected a boolean)"),
    ("beavertails", {**BT_ROW, "category": 3}, "field 'category' has type int"),
    ("beavertails", {**BT_ROW, "category": {"violence": "no"}}, "field 'category' has a non-boolean value"),
    ("beavertails", {**BT_ROW, "response": ""}, "field 'response' is empty"),
    ("generic", {"prompt": "p"}, "field 'response' is missing"),
]


@pytest.mark.parametrize("source,bad,fragment", BAD_ROWS)
def test_bad_row_raises_then_skips(tmp_path, caplog, source, bad, fragment):
    good = HH_ROW if source == "hh-rlhf" else BT_ROW
    path = _write_jsonl(tmp_path / "x.jsonl", [good, good, bad, good, bad])
    with pytest.raises(BadRowError) as err:
        _load(path, source=source)
    assert str(err.value).startswith(f"{path} line 3: ") and fragment in str(err.value)
    with caplog.at_level(logging.WARNING, logger="lancet_core.data.loaders"):
        got = _load(path, source=source, on_bad_rows="skip")
    assert got.report.n_rows == 3 and got.report.n_skipped == 2
    assert got.frame.sample_id.str[-6:].tolist() == ["000001", "000002", "000004"]  # ids keep line numbers
    assert [r.split(": ")[0] for r in got.report.skipped_reasons] == [f"{path} line 3", f"{path} line 5"]
    assert "skipped 2 malformed rows" in caplog.text


def test_invalid_utf8_line_is_a_bad_row(tmp_path):
    path = tmp_path / "u.jsonl"
    path.write_bytes(json.dumps(BT_ROW).encode() + b"\n\xff\xfe{}\n")
    with pytest.raises(BadRowError, match=r"u\.jsonl line 2: not valid UTF-8"):
        _load(path, source="beavertails")
    assert _load(path, source="beavertails", on_bad_rows="skip").report.n_skipped == 1


def test_bad_record_in_json_list_and_parquet_names_row(tmp_path):
    path = tmp_path / "l.json"
    path.write_text(json.dumps([BT_ROW, {**BT_ROW, "is_safe": None}]))
    with pytest.raises(BadRowError, match=r"l\.json row 2: field 'is_safe' is null"):
        _load(path, source="beavertails")
    pd.DataFrame([BT_ROW, {**BT_ROW, "prompt": None}]).to_parquet(tmp_path / "b.parquet")
    with pytest.raises(BadRowError, match=r"b\.parquet row 2: field 'prompt' is null"):
        _load(tmp_path / "b.parquet", source="beavertails")


# ---------------------------------------------------------------------------- file-level errors
def test_empty_and_all_bad_files(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataLoadError, match=r"empty\.jsonl: no valid rows \(the dataset is empty\)"):
        _load(empty)
    bad = _write_jsonl(tmp_path / "bad.jsonl.gz", [{"prompt": "p"}], gz=True)
    with pytest.raises(DataLoadError, match=r"bad\.jsonl\.gz: no valid rows \(1 malformed rows skipped\)"):
        _load(bad, on_bad_rows="skip")


def test_gzip_and_format_errors(tmp_path):
    fake = tmp_path / "fake.jsonl.gz"
    fake.write_bytes(b"not gzip at all")
    with pytest.raises(DataLoadError, match=r"fake\.jsonl\.gz: not a valid gzip file"):
        _load(fake)
    csv = tmp_path / "x.csv"
    csv.write_text("prompt,response\n")
    with pytest.raises(DataLoadError, match=r"x\.csv: unsupported file type"):
        _load(csv)
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 nope")
    with pytest.raises(DataLoadError, match=r"broken\.parquet: not a readable parquet file"):
        _load(broken)
    one = tmp_path / "one.json"
    one.write_text(json.dumps(BT_ROW, indent=2))
    with pytest.raises(DataLoadError, match="got one object"):
        _load(one, source="beavertails")


def test_missing_path_is_named(tmp_path):
    for name in (str(tmp_path / "nope.jsonl"), "data/missing.jsonl.gz", "./not/a/hub/name"):
        with pytest.raises(DataLoadError, match=f"data file {name} does not exist"):
            _load(name)


def test_hub_name_goes_through_datasets(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        return datasets.Dataset.from_list([BT_ROW, {**BT_ROW, "is_safe": False,
                                                    "category": {"violence": True, "fraud": False}}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    got = load_records(DataConfig(source="beavertails", path_or_name="PKU-Alignment/BeaverTails", split="30k_train"))
    assert calls == [("PKU-Alignment/BeaverTails", "30k_train")]
    assert got.frame.category.tolist() == ["", "violence"] and got.report.n_rows == 2

    def failing(name, split):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", failing)
    with pytest.raises(DataLoadError, match=r"could not load hub dataset 'Anthropic/hh-rlhf' \(split 'test'\)"):
        load_records(DataConfig(source="hh-rlhf", path_or_name="Anthropic/hh-rlhf", split="test"))
