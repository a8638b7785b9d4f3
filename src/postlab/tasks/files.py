"""Users' own data: prompt/completion (SFT) or prompt/chosen/rejected (preference) records, the
conventions TRL and the hub use, from a local file or a hub dataset id.

Local formats, chosen by extension: .jsonl (one JSON object a line), .json (JSON Lines, or one JSON
array of objects), .csv, .tsv (a header row naming the columns), .parquet. Extra columns are
ignored; an `id` column, when present, names each example. Every value read must be a non-empty
string (conversational records, lists of messages, must be rendered to text first).

A hub dataset id is `owner/name`, optionally `owner/name:subset` and/or `...@split` (default split:
`train` for task.train, `validation` for task.dev); it is read with `datasets.load_dataset`.

SFT examples come from `prompt`/`completion`; a file with `prompt`/`chosen`/`rejected` (and no
`completion`) also serves SFT, with the chosen completion as the target, so one preference dev file
can give dev loss in any stage. Unpaired examples (KTO) come from `prompt`/`completion`/`label`
records, the label true/false (or 1/0, "true"/"false"); such a file serves SFT with its desirable
completions only, and a preference file serves KTO unpaired (chosen desirable, rejected not). All
readers go through `read_records`.

`evaluate` scores the dev completions: `loss` = mean token NLL over completion tokens (EOS
included), `perplexity` = exp(loss). Lower is better. Without task.dev it returns {}.
"""
from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from ..data import Example, Pair, UnpairedExample
from ..errors import ConfigError, DataError
from ..hub import is_hub_id
from ..lazy import lazy
from ..metrics import MetricSpec
from .base import Task, read_text, register_task, require_file, unpair

if TYPE_CHECKING:
    from ..models import LM

logprobs = lazy("postlab.logprobs")

SFT_COLUMNS = ("prompt", "completion")
UNPAIRED_COLUMNS = SFT_COLUMNS + ("label",)  # TRL's unpaired format (KTO)
LABELS = {"true": True, "1": True, "false": False, "0": False}
PREF_COLUMNS = ("prompt", "chosen", "rejected")
SFT_FROM_PREF = ("prompt", "chosen")  # SFT on the chosen completions of a preference file
FORMATS = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet"}

Rows = Iterator[tuple[str, object]]  # (where, record): where = "line 3", "row 3", ...
# A reader returns (header, where the header came from, rows): the header is the columns of a table,
# or the keys of the first record of JSON data (then `where` names that record), or None.
Read = tuple[list[str] | None, str | None, Rows]


def read_records(source: str, column_sets: Iterable[tuple[str, ...]], split: str = "train",
                 scalar_columns: Iterable[str] = (), optional: Iterable[str] = ()
                 ) -> tuple[tuple[str, ...], list[dict[str, str]]]:
    """Records holding the first of `column_sets` whose columns the data has, plus the `optional`
    columns its header (or first record) has, each value checked to be a non-empty string
    (`scalar_columns`, e.g. a label, may also hold numbers or booleans, read as text). Returns (the
    columns used, records with those keys plus `id`).
    Every error is a DataError naming the source and, where it applies, the line or row."""
    column_sets = list(column_sets)
    if is_hub_id(source):
        header, header_where, rows = _hub_rows(source, split)
        name = source
    else:
        path = Path(source)
        fmt = FORMATS.get(path.suffix.lower())
        if fmt is None and path.exists():
            raise DataError(f"{path}: unsupported file type {path.suffix or '(no extension)'!r}; use one of "
                            f"{', '.join(FORMATS)} (or a hub dataset id like owner/name)")
        path = require_file(path, "data file")
        header, header_where, rows = _READERS[fmt](path)
        name = path.name
    columns = _choose_columns(source, header, header_where, column_sets)
    columns += tuple(c for c in optional if header is not None and c in header and c not in columns)
    out = []
    scalars = set(scalar_columns)
    for where, rec in rows:
        out.append(_check_record(source, where, rec, columns, name, scalars))
    if not out:
        raise DataError(f"{source}: no records found; expected rows with columns {list(column_sets[0])}")
    return columns, out


def _choose_columns(source: str, header: list[str] | None, where: str | None,
                    column_sets: list[tuple[str, ...]]) -> tuple[str, ...]:
    if header is None:  # nothing to choose from: the per-record check reports what is missing
        return column_sets[0]
    for cols in column_sets:
        if all(c in header for c in cols):
            return cols
    want = column_sets[0]
    missing = [c for c in want if c not in header]
    hint = ""
    if want == PREF_COLUMNS and "completion" in header:
        hint = "; this looks like an SFT file: preference stages need prompt/chosen/rejected"
    elif len(column_sets) > 1:
        hint = "; or " + " or ".join(str(list(c)) for c in column_sets[1:])
    raise DataError(f"{source}: {where + ': ' if where else ''}missing column(s) {missing}; "
                    f"{'keys' if where else 'columns'} found: {list(header)}; expected {list(want)}{hint}")


def _check_record(source: str, where: str, rec: object, columns: tuple[str, ...], name: str,
                  scalars: set[str] = frozenset()) -> dict[str, str]:
    if not isinstance(rec, dict):
        raise DataError(f"{source}: {where}: expected an object with keys {list(columns)}, got {type(rec).__name__}")
    missing = [c for c in columns if c not in rec]
    if missing:
        raise DataError(f"{source}: {where}: missing {missing}; keys found: {list(rec)}")
    out = {}
    for c in columns:
        v = rec[c]
        if c in scalars and isinstance(v, (bool, int, float)) and not (isinstance(v, float) and v != v):
            v = str(v).lower() if isinstance(v, bool) else (str(int(v)) if isinstance(v, float) and v.is_integer() else str(v))
        if not isinstance(v, str):
            got = "null" if v is None else f"{type(v).__name__} {_short(v)}"
            hint = (" (conversational records must be rendered to text first, e.g. with the chat template)"
                    if isinstance(v, (list, dict)) else "")
            raise DataError(f"{source}: {where}: column {c!r} must be a string, got {got}{hint}")
        if not v.strip():
            raise DataError(f"{source}: {where}: column {c!r} is empty")
        out[c] = v
    rid = rec.get("id")
    out["id"] = str(rid) if rid is not None and str(rid) != "" else f"{name}:{where.split()[-1]}"
    return out


def _desirable(source: str, record: dict[str, str]) -> bool:
    try:
        return LABELS[record["label"].strip().lower()]
    except KeyError:
        raise DataError(f"{source}: record {record['id']}: label must be true or false (or 1/0), got "
                        f"{record['label']!r}") from None


def _short(v: object, n: int = 40) -> str:
    r = repr(v)
    return r if len(r) <= n else r[:n] + "..."


def _read_jsonl(path: Path) -> Read:
    lines = read_text(path).splitlines()
    recs = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            recs.append((f"line {n}", json.loads(line)))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {n}: invalid JSON ({e.msg} at column {e.colno}); expected one "
                            f"JSON object per line") from None
    if not recs:
        raise DataError(f"{path}: empty file; expected one JSON object per line")
    where, first = recs[0]
    return (list(first) if isinstance(first, dict) else None), where, iter(recs)


def _read_json(path: Path) -> Read:
    text = read_text(path)
    if not text.lstrip().startswith("["):
        return _read_jsonl(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: line {e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
    if not data:
        raise DataError(f"{path}: empty JSON array; expected objects with the data's columns")
    header = list(data[0]) if isinstance(data[0], dict) else None
    return header, "record 1", ((f"record {i}", rec) for i, rec in enumerate(data, start=1))


def _read_delimited(path: Path, delimiter: str) -> Read:
    text = read_text(path)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = next(reader, None)
    except csv.Error as e:
        raise DataError(f"{path}: line {reader.line_num}: {e}") from None
    if header is None or not any(h.strip() for h in header):
        raise DataError(f"{path}: empty file; expected a header row naming the columns")
    header = [h.strip() for h in header]

    def rows() -> Rows:
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                raise DataError(f"{path}: line {reader.line_num}: {e}") from None
            if not row or all(not f.strip() for f in row):
                continue
            if len(row) != len(header):
                hint = " (is the file tab-separated?)" if delimiter == "," else ""
                raise DataError(f"{path}: line {reader.line_num}: {len(row)} field(s), expected {len(header)} "
                                f"like the header {header}{hint}")
            yield f"line {reader.line_num}", dict(zip(header, row))

    return header, None, rows()


def _read_parquet(path: Path) -> Read:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file ({str(e).splitlines()[0]})") from None
    return table.column_names, None, ((f"row {i}", rec) for i, rec in enumerate(table.to_pylist(), start=1))


_READERS = {"jsonl": _read_jsonl, "json": _read_json, "csv": lambda p: _read_delimited(p, ","),
            "tsv": lambda p: _read_delimited(p, "\t"), "parquet": _read_parquet}


def _hub_rows(name: str, split: str) -> Read:
    """A hub dataset: `owner/name[:subset][@split]` (needs network access, or the local hub cache)."""
    import datasets

    ident, _, explicit = name.partition("@")
    repo, _, subset = ident.partition(":")
    split = explicit or ("train" if split == "train" else "validation")
    try:
        ds = datasets.load_dataset(repo, subset or None, split=split)
    except Exception as e:  # noqa: BLE001 - any hub failure becomes one clear message
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"{name}: no such local file, and cannot load split {split!r} from the hub ({msg}); "
                        f"pass a local JSONL/CSV/Parquet path, or name the split as {ident}@SPLIT") from None
    return list(ds.column_names), None, ((f"row {i}", rec) for i, rec in enumerate(ds, start=1))


@register_task
class FileTask(Task):
    name = "file"
    append_eos = True
    primary_metrics = ("loss",)  # lower is better
    metric_specs = {"loss": MetricSpec("ratio", higher_is_better=False),
                    "perplexity": MetricSpec("exp_ratio", higher_is_better=False)}

    @staticmethod
    def _check_split(split: str) -> str:
        if split not in ("train", "dev"):
            raise ConfigError(f"split must be 'train' or 'dev', got {split!r}")
        return split

    def _source(self, split: str) -> str | None:
        return getattr(self.cfg, self._check_split(split))

    def _records(self, split: str, column_sets: list[tuple[str, ...]], optional: tuple[str, ...] = ()
                 ) -> list[dict[str, str]]:
        read = self.source_split(self._check_split(split))
        src = self._source(read)
        if src is None:
            raise ConfigError(f"task.{read}: the file task needs a JSONL/CSV/Parquet path or a hub dataset id")
        columns, recs = read_records(src, column_sets, read, scalar_columns=["label"], optional=optional)
        if "label" in columns and "completion" in columns:  # TRL's unpaired format
            for r in recs:
                r["label"] = _desirable(src, r)
        return self.split_rows(recs, split, src)

    def _examples(self, split: str) -> list[Example]:
        recs = self._records(split, [SFT_COLUMNS, SFT_FROM_PREF + ("rejected",)], optional=("label",))
        return [Example(r["prompt"], r.get("completion", r.get("chosen")), r["id"]) for r in recs
                if r.get("label") is not False]  # a labelled file: its desirable completions

    def train_examples(self) -> list[Example]:
        return self._examples("train")

    def dev_examples(self) -> list[Example]:
        """The dev completions (or the validation split's); [] without either."""
        return [] if self.cfg.dev is None and self.cfg.validation is None else self._examples("dev")

    def preference_pairs(self, split: str = "train") -> list[Pair]:
        recs = self._records(split, [PREF_COLUMNS])
        return [Pair(r["prompt"], r["chosen"], r["rejected"], r["id"]) for r in recs]

    def unpaired_examples(self, split: str = "train") -> list[UnpairedExample]:
        """prompt/completion/label records, or a preference file unpaired (chosen desirable, rejected not)."""
        recs = self._records(split, [UNPAIRED_COLUMNS, PREF_COLUMNS])
        if "label" not in recs[0]:
            return unpair([Pair(r["prompt"], r["chosen"], r["rejected"], r["id"]) for r in recs])
        return [UnpairedExample(r["prompt"], r["completion"], r["label"], r["id"]) for r in recs]

    def evaluate(self, lm: LM, out_dir: Path | None = None, batch_size: int = 16) -> dict[str, float]:
        examples = self.dev_examples()
        if not examples:
            return {}
        per_nll = logprobs.completion_nll_per_example(lm, examples, batch_size, self.cfg.overlength, self.append_eos,
                                             source=self.cfg.dev or f"{self.cfg.train} (validation split)")
        nll, tokens = sum(n for n, _ in per_nll), sum(t for _, t in per_nll)
        loss = nll / tokens
        # Per example: the completion's mean log-likelihood per token as its score (higher is better).
        self.write_per_example(out_dir, [{"id": ex.id, "score": -n / t, "stats": {"loss": [n, float(t)], "perplexity": [n, float(t)]}}
                                         for ex, (n, t) in zip(examples, per_nll)])
        return {"loss": loss, "perplexity": math.exp(loss) if loss < 700 else float("inf"),
                "tokens": float(tokens), "n": float(len(examples))}
