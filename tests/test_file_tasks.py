"""The `file` task: users' own prompt/completion and prompt/chosen/rejected data in JSONL, JSON, CSV, TSV
and Parquet (and hub datasets through datasets.load_dataset), with errors naming the file and line."""
from __future__ import annotations

import csv
import json
import math

import pandas as pd
import pytest

from postlab.config import TaskConfig
from postlab.errors import ConfigError, DataError
from postlab.models import load_lm
from postlab.tasks import get_task
from postlab.tasks.files import is_hub_id, read_records

SFT = [{"prompt": "Translate: chat\n", "completion": "cat", "id": "a"},
       {"prompt": 'Say "hi", twice:\n', "completion": "hi, hi\nhi", "id": "b"},
       {"prompt": "Ünïcode?\t", "completion": "ja, bitte", "id": "c"}]
PREF = [{"prompt": "2+2=", "chosen": " 4", "rejected": " 5"},
        {"prompt": "Capital of France?", "chosen": " Paris", "rejected": " Lyon", "extra": 1}]


def write(path, records, fmt=None):
    fmt = fmt or path.suffix.lstrip(".")
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    elif fmt == "json":
        path.write_text(json.dumps(records, indent=1), encoding="utf-8")
    elif fmt in ("csv", "tsv"):
        pd.DataFrame(records).to_csv(path, sep="," if fmt == "csv" else "\t", index=False)
    elif fmt == "parquet":
        pd.DataFrame(records).to_parquet(path)
    return path


def task(**kw):
    return get_task(TaskConfig(name="file", **{k: (str(v) if k in ("train", "dev") else v) for k, v in kw.items()}))


@pytest.mark.parametrize("ext", ["jsonl", "json", "csv", "tsv", "parquet"])
def test_sft_round_trip(tmp_path, ext):
    path = write(tmp_path / f"train.{ext}", SFT)
    t = task(train=path)
    assert t.primary_metrics == ("loss",) and t.append_eos
    exs = t.train_examples()
    assert [(e.prompt, e.completion, e.id) for e in exs] == [(r["prompt"], r["completion"], r["id"]) for r in SFT]
    assert len(task(train=path, train_limit=2).train_examples()) == 2
    assert t.dev_examples() == []


@pytest.mark.parametrize("ext", ["jsonl", "csv", "parquet"])
def test_preference_round_trip(tmp_path, ext):
    path = write(tmp_path / f"pairs.{ext}", PREF)
    t = task(train=path, dev=path, dev_limit=1)
    pairs = t.preference_pairs("train")
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [(r["prompt"], r["chosen"], r["rejected"])
                                                                 for r in PREF]
    assert pairs[0].id == f"pairs.{ext}:{2 if ext == 'csv' else 1}"  # CSV line 2 (after the header), row/line 1
    assert len(t.preference_pairs("dev")) == 1
    # a preference file also serves SFT: the chosen completion is the target
    assert [(e.prompt, e.completion) for e in t.train_examples()] == [(r["prompt"], r["chosen"]) for r in PREF]


def test_preference_needs_pairs(tmp_path):
    path = write(tmp_path / "sft.jsonl", SFT)
    with pytest.raises(DataError, match=r"line 1: missing column\(s\) \['chosen', 'rejected'\].*an SFT file"):
        task(train=path).preference_pairs()
    with pytest.raises(ConfigError, match="task.dev"):
        task(train=path).preference_pairs("dev")
    with pytest.raises(ConfigError, match="task.train"):
        task().train_examples()


def test_shared_reader_names_columns(tmp_path):
    path = write(tmp_path / "x.csv", SFT)
    cols, recs = read_records(str(path), [("prompt", "completion")])
    assert cols == ("prompt", "completion") and recs[0] == {"prompt": SFT[0]["prompt"], "completion": "cat", "id": "a"}


def _bad(tmp_path, name, data: bytes | str):
    p = tmp_path / name
    p.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return p


@pytest.mark.parametrize("name, data, match", [
    ("empty.jsonl", b"", "empty"),
    ("blank.jsonl", b"\n  \n", "empty"),
    ("empty.csv", b"", "empty"),
    ("badjson.jsonl", '{"prompt": "a", "completion": "b"}\n{"prompt": "a", completion: "b"}\n',
     "line 2: invalid JSON .* column 17"),
    ("badarray.json", '[\n{"prompt": "a",\n "completion": }\n]', "line 3: invalid JSON"),
    ("latin1.jsonl", b'{"prompt": "a", "completion": "b"}\n{"prompt": "caf\xe9", "completion": "b"}\n',
     "line 2: not UTF-8"),
    ("latin1.csv", b"prompt,completion\na,b\nc,caf\xe9\n", "line 3: not UTF-8"),
    ("nocol.jsonl", '{"prompt": "a", "answer": "b"}\n',
     r"line 1: missing column\(s\) \['completion'\]; keys found: \['prompt', 'answer'\]"),
    ("laterow.jsonl", '{"prompt": "a", "completion": "b"}\n{"prompt": "a", "response": "b"}\n',
     r"line 2: missing \['completion'\]; keys found: \['prompt', 'response'\]"),
    ("nocol.csv", "question,answer\na,b\n",
     r"missing column\(s\) \['prompt', 'completion'\]; columns found: \['question', 'answer'\]"),
    ("number.jsonl", '{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": 3}\n',
     "line 2: column 'completion' must be a string, got int 3"),
    ("null.jsonl", '{"prompt": null, "completion": "b"}\n', "line 1: column 'prompt' must be a string, got null"),
    ("chat.jsonl", '{"prompt": [{"role": "user", "content": "hi"}], "completion": "b"}\n',
     "line 1: column 'prompt' must be a string, got list .*chat template"),
    ("notobj.jsonl", '["a", "b"]\n', "line 1: expected an object"),
    ("emptyval.csv", "prompt,completion\na,b\n  ,b\n", "line 3: column 'prompt' is empty"),
    ("fields.csv", "prompt,completion\na,b\na,b,c\n", r"line 3: 3 field\(s\), expected 2"),
    ("multiline.csv", 'prompt,completion\n"a\nb",c\nd\n', r"line 4: 1 field\(s\), expected 2"),
    ("notparquet.parquet", b"PAR1 this is not parquet", "not a readable Parquet file"),
    ("data.txt", "prompt,completion\n", "unsupported file type '.txt'"),
])
def test_malformed(tmp_path, name, data, match):
    path = _bad(tmp_path, name, data)
    with pytest.raises(DataError, match=match) as e:
        task(train=path).train_examples()
    assert name in str(e.value)


def test_parquet_bad_values(tmp_path):
    path = tmp_path / "ints.parquet"
    pd.DataFrame({"prompt": ["a", "b"], "completion": [1, 2]}).to_parquet(path)
    with pytest.raises(DataError, match="ints.parquet: row 1: column 'completion' must be a string, got int 1"):
        task(train=path).train_examples()
    path = tmp_path / "nulls.parquet"
    pd.DataFrame({"prompt": ["a", None], "completion": ["x", "y"]}).to_parquet(path)
    with pytest.raises(DataError, match="nulls.parquet: row 2: column 'prompt' must be a string, got null"):
        task(train=path).train_examples()
    path = tmp_path / "cols.parquet"
    pd.DataFrame({"prompt": ["a"], "response": ["x"]}).to_parquet(path)
    with pytest.raises(DataError, match=r"cols.parquet: missing column\(s\) \['completion'\]; columns found: "
                                        r"\['prompt', 'response'\]"):
        task(train=path).train_examples()


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl: data file not found"):
        task(train=tmp_path / "nope.jsonl").train_examples()
    with pytest.raises(DataError, match="data/nope.csv: data file not found"):  # a path, not a hub id
        task(train="data/nope.csv").train_examples()


def test_hub_ids():
    assert is_hub_id("trl-lib/ultrafeedback_binarized")
    assert is_hub_id("owner/name:subset@test")
    assert not is_hub_id("data/train.jsonl") and not is_hub_id("./x") and not is_hub_id("a/b/c")


def test_hub_dataset_path(tmp_path, monkeypatch):
    """The hub code path, fed by datasets' own JSON builder on a local file (no network here)."""
    import datasets

    real = datasets.load_dataset
    path = write(tmp_path / "hub.jsonl", PREF)
    calls = []

    def fake(repo, subset=None, split=None, **kw):
        calls.append((repo, subset, split))
        if repo == "missing/dataset":
            raise FileNotFoundError("Dataset 'missing/dataset' doesn't exist on the Hub")
        return real("json", data_files=str(path), split="train", cache_dir=str(tmp_path / "cache"))

    monkeypatch.setattr(datasets, "load_dataset", fake)
    t = task(train="owner/prefs", dev="owner/prefs:main@test")
    assert [p.chosen for p in t.preference_pairs("train")] == [" 4", " Paris"]
    assert [e.completion for e in t.dev_examples()] == [" 4", " Paris"]
    assert calls == [("owner/prefs", None, "train"), ("owner/prefs", "main", "test")]
    with pytest.raises(DataError, match="missing/dataset: no such local file, and cannot load split 'train'"):
        task(train="missing/dataset").train_examples()
    with pytest.raises(DataError, match=r"owner/prefs: missing column\(s\) \['completion'\]; columns found: "
                                        r"\['prompt', 'chosen', 'rejected', 'extra'\]"):
        read_records("owner/prefs", [("prompt", "completion")])


def test_evaluate_tiny_llama(tiny_llama, tmp_path):
    lm = load_lm(str(tiny_llama), device="cpu", precision="fp32")
    train = write(tmp_path / "train.jsonl", SFT)
    assert task(train=train).evaluate(lm, tmp_path) == {}  # no dev set
    dev = write(tmp_path / "dev.csv", SFT)
    m = task(train=train, dev=dev).evaluate(lm, tmp_path, batch_size=2)
    assert m["n"] == 3.0 and m["tokens"] > 3
    assert math.isfinite(m["loss"]) and m["loss"] > 0
    assert m["perplexity"] == pytest.approx(math.exp(m["loss"]))
    from postlab.metrics import read_per_example

    per = read_per_example(tmp_path)
    assert len(per.ids) == 3 and per.value("loss") == pytest.approx(m["loss"]) and not per.specs["loss"].higher_is_better
    assert task(train=train, dev=dev, dev_limit=1).evaluate(lm)["n"] == 1.0
    # a preference dev file is scored on its chosen completions
    pref = write(tmp_path / "dev_pairs.parquet", PREF)
    m2 = task(train=train, dev=pref).evaluate(lm)
    assert math.isfinite(m2["loss"]) and m2["n"] == 2.0


def test_csv_quoting_round_trip(tmp_path):
    path = tmp_path / "quoted.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "prompt", "completion"])
        w.writerow([7, 'He said, "no"\nthen left.', "ok,\nfine"])
    (ex,) = task(train=path).train_examples()
    assert (ex.id, ex.prompt, ex.completion) == ("7", 'He said, "no"\nthen left.', "ok,\nfine")
