"""What every task is: its config (`TaskConfig`, with the task's own options under its name), the
`Task` base class, the registry (`@register_task`) and the helpers tasks share. Task files import
from here, and so does postlab.config (a stage's `task` block is a TaskConfig)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..data import Example, Pair, UnpairedExample
from ..errors import ConfigError, DataError
from ..metrics import PER_EXAMPLE, MetricSpec, write_per_example  # noqa: F401 (PER_EXAMPLE: re-exported)

if TYPE_CHECKING:
    from ..models import LM


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GenerationConfig(Strict):
    greedy: bool = False
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(0.9, gt=0, le=1)
    max_new_tokens: int = Field(160, gt=0)
    seed: int = 0
    # Decoding reads every weight once per step whatever the batch, so bigger batches are cheaper per
    # sequence (hand-timed on 2 CPU cores: roughly half the time per sequence at 48 as at 12).
    batch_size: int = Field(48, gt=0)


class PairsConfig(Strict):
    """How preference pairs are built for a task without pairs of its own (sonnets): chosen = the
    true continuation, rejected = continuations sampled from a model. Ignored by tasks that have
    their own pairs (paraphrase, file)."""

    # stage-start: the policy as the preference stage begins (the SFT model in SFT->DPO, the base
    # model in DPO-only); base: the run's base model; anything else: a path to a checkpoint.
    rejected_from: Literal["stage-start", "base"] | str = "stage-start"
    # same-sonnet: k samples per training prompt, each a rejected answer; top-k: n samples per
    # prompt, the k least similar to the truth (lowest chrF) kept as rejected answers.
    strategy: Literal["same-sonnet", "top-k"] = "same-sonnet"
    k: int = Field(1, gt=0)
    n: int = Field(4, gt=0)
    generation: GenerationConfig = GenerationConfig()  # sampling settings (seeded)

    @model_validator(mode="after")
    def _check_counts(self) -> "PairsConfig":
        if self.strategy == "top-k" and self.n < self.k:
            raise ValueError(f"top-k keeps k of n samples, so n must be >= k (got n={self.n}, k={self.k})")
        draws = self.n if self.strategy == "top-k" else self.k
        if self.generation.greedy and draws > 1:
            raise ValueError(f"generation.greedy draws {draws} identical samples per prompt; sample instead "
                             f"(greedy: false) or draw one (k=1 with same-sonnet)")
        return self


class TaskConfig(BaseModel):
    """The fields every task reads, plus the named task's own options under its name (e.g.
    `cloze: {template: ..., labels: ...}`), validated by the task (postlab.tasks)."""

    model_config = ConfigDict(extra="allow")
    name: str = "paraphrase"  # a registered task: paraphrase | sonnets | file | cloze
    train: str | None = None  # path (TSV/TXT/JSONL/CSV/Parquet) or hub dataset id
    dev: str | None = None
    dev_reference: str | None = None  # sonnets: the true held-out sonnets
    train_limit: int | None = Field(None, gt=0)
    dev_limit: int | None = Field(None, gt=0)
    # A validation split carved from the training data: the last N training examples are held out
    # (never trained on; train_limit counts from the first of the rest) and the evaluations score them
    # instead of the dev data. Choose settings on it; report on dev.
    validation: int | None = Field(None, gt=0)
    # A prompt+completion longer than the model allows: refuse (error) or truncate the prompt's start.
    overlength: Literal["refuse", "truncate"] = "refuse"
    # Training completions (SFT answers; chosen and rejected) cut to their first N tokens, like TRL's
    # max_completion_length: bounds the cost of long answers. A cut answer gets no EOS.
    max_completion_tokens: int | None = Field(None, gt=0)
    generation: GenerationConfig = GenerationConfig()
    pairs: PairsConfig = PairsConfig()  # preference pairs for tasks that sample rejected answers
    # Train on these records instead of the task's own training data (prompt/completion for SFT-kind
    # objectives, prompt/chosen/rejected for preference ones; any format task `file` reads), while
    # the task's dev data and metrics still evaluate: e.g. a teacher's responses (`postlab distill sample`).
    train_records: str | None = None
    # Extra evaluation: name -> a prompt/completion file; metric `<name>_logp` = the mean per-token
    # log-likelihood of its completions (e.g. held-out teacher responses: `teacher_logp`).
    score_records: dict[str, str] = {}

    @model_validator(mode="before")
    @classmethod
    def _task_options(cls, data: Any) -> Any:
        return normalized_config(data)

    @model_validator(mode="after")
    def _validation_from_own_data(self) -> "TaskConfig":
        if self.validation is not None and self.train_records:
            raise ValueError("validation: holds out examples of the task's own training data, but train_records "
                             "replaces that data; drop one of them")
        return self

    def evaluation_settings(self) -> dict:
        """The fields that decide what evaluation measures (dev data, metrics, generation), without
        the training-only ones: two stages that agree here evaluate the same weights identically.
        With a validation split the evaluation reads the training file, so it counts."""
        training_only = {"train_limit", "pairs", "max_completion_tokens", "train_records"}
        return self.model_dump(mode="json", exclude=training_only if self.validation else training_only | {"train"})


def data_dir() -> Path:
    """Where the tasks' default data lives: $POSTLAB_DATA, else ../shared/data beside the checkout that
    postlab runs from (wherever the command is started), else beside the current directory."""
    if os.environ.get("POSTLAB_DATA"):
        return Path(os.environ["POSTLAB_DATA"]).expanduser()
    checkout = Path(__file__).resolve().parents[3]  # <checkout>/src/postlab/tasks/base.py
    if (checkout / "pyproject.toml").is_file():
        return checkout.parent / "shared" / "data"
    return Path("..") / "shared" / "data"


def default_data(*parts: str) -> str:
    """A file of the tasks' default data (under `data_dir()`)."""
    return str(data_dir().joinpath(*parts))


def require_file(path: str | Path, what: str) -> Path:
    p = Path(path)
    if not p.is_file():
        where = (f"the tasks' default data is read from {data_dir()}: set POSTLAB_DATA (or pass --data) to the "
                 f"folder that holds quora/ and sonnets/" if str(p).startswith(str(data_dir()))
                 else "paths are relative to the current directory")
        raise DataError(f"{p}: {what} not found ({where})")
    if p.stat().st_size == 0:
        raise DataError(f"{p}: {what} is empty")
    return p


def read_text(path: Path) -> str:
    """A file's text as UTF-8, with an error naming the line of the first undecodable byte."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"{path}: line {line}: not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 1]!r}); "
                        f"re-save the file as UTF-8") from None



def unpair(pairs: list[Pair]) -> list[UnpairedExample]:
    """Each pair as two unpaired examples, its chosen answer desirable and its rejected one not (what TRL's
    ``unpair_preference_dataset`` does; a chosen answer repeated across pairs stays repeated, so the labels
    stay balanced)."""
    return [ex for p in pairs for ex in (UnpairedExample(p.prompt, p.chosen, True, f"{p.id}/chosen"),
                                         UnpairedExample(p.prompt, p.rejected, False, f"{p.id}/rejected"))]


@dataclass(frozen=True)
class SampledRejected:
    """How a task whose rejected answers are sampled (postlab.preferences) turns a raw sample into a
    rejected completion, and how similar a completion is to the truth (higher = closer)."""

    clean: Callable[[str], str]
    score: Callable[[str, str], float]  # (hypothesis, truth) -> similarity


@dataclass(frozen=True)
class EvalCost:
    """What one evaluation of a task costs, for `postlab study plan`: whether it scores the dev
    completions (not just the prompt and a one-token answer) and how many decode steps it generates."""

    scores_completions: bool
    decode_steps: int = 0


class Task:
    """A task owns everything about itself: its options (`Options`, validated from the stage's
    `task.<name>` block), its data (and default files), its metrics with their direction and
    per-example statistics, the metrics a study compares (`primary_metrics`), how rejected answers
    are sampled where it has no pairs of its own, and what its evaluation costs."""

    name: ClassVar[str]
    Options: ClassVar[type[BaseModel] | None] = None
    append_eos: ClassVar[bool] = True  # end completions with EOS (generative tasks learn to stop)
    primary_metrics: ClassVar[tuple[str, ...]] = ()  # compared by a study's report (default: every metric)
    # Metrics whose per-example statistics the evaluation writes (see postlab.metrics).
    metric_specs: ClassVar[dict[str, MetricSpec]] = {}
    sampled_rejected: ClassVar[SampledRejected | None] = None  # set by tasks whose pairs are sampled

    def __init__(self, cfg: TaskConfig):
        self.cfg = cfg

    @property
    def options(self) -> BaseModel | None:
        if self.Options is None:
            return None
        return self.Options(**((self.cfg.model_extra or {}).get(self.name) or {}))

    def eval_cost(self, n_dev: int) -> EvalCost:
        return EvalCost(scores_completions=True)

    def train_examples(self) -> list[Example]:
        raise NotImplementedError

    def dev_examples(self) -> list[Example]:
        raise NotImplementedError

    def preference_pairs(self, split: str = "train") -> list[Pair]:
        raise ConfigError(f"task {self.name!r} has no preference pairs of its own: build them with "
                          f"postlab.preferences.build_pairs (sampled rejected answers), or use task.name: file "
                          f"with a prompt/chosen/rejected file")

    def unpaired_examples(self, split: str = "train") -> list[UnpairedExample]:
        """Completions labelled desirable or not (KTO): by default the task's own preference pairs,
        unpaired. A task whose rejected answers are sampled (sonnets) has none of its own: unpair the
        pairs `postlab.preferences.build_pairs` samples for it."""
        if self.sampled_rejected is not None:
            raise ConfigError(f"task {self.name!r} samples its undesirable answers from a model: unpaired examples "
                              f"are its sampled preference pairs, unpaired (postlab.preferences.build_pairs, then "
                              f"postlab.tasks.base.unpair)")
        return unpair(self.preference_pairs(split))

    def evaluate(self, lm: LM, out_dir: Path | None = None, batch_size: int = 16) -> dict[str, float]:
        raise NotImplementedError

    def write_per_example(self, out_dir: Path | None, records: list[dict]) -> None:
        """Per dev example: ``id``, ``score`` (the task's headline score of that example, higher is
        better: what win rates compare) and ``stats`` {metric: vector} for each metric in
        ``metric_specs``, from which any subset of the dev set gives the corpus metric
        (postlab.metrics): what a study report's paired tests resample."""
        write_per_example(out_dir, records, self.metric_specs)

    @staticmethod
    def limit(items: list, n: int | None) -> list:
        return items if n is None else items[:n]

    def source_split(self, split: str) -> str:
        """Which data a split reads: with task.validation, the dev split is carved from the training data."""
        return "train" if self.cfg.validation is not None else split

    def split_rows(self, rows: list, split: str, source: str = "the training data") -> list:
        """Rows of `split` (train or dev) read from `source_split(split)`, with the validation split
        carved out and the limits applied (`train_limit` to train, `dev_limit` to dev)."""
        n = self.cfg.validation
        if n is not None:
            if n >= len(rows):
                raise DataError(f"{source}: task.validation={n} holds out every one of its {len(rows)} training "
                                f"examples; hold out fewer")
            rows = rows[:-n] if split == "train" else rows[-n:]
        return self.limit(rows, self.cfg.train_limit if split == "train" else self.cfg.dev_limit)


TASKS: dict[str, type[Task]] = {}


def register_task(cls: type[Task]) -> type[Task]:
    TASKS[cls.name] = cls
    return cls


def normalized_config(raw):
    """A stage's `task` block with the named task's own options (under `task.<name>`) validated and
    filled with their defaults; other keys that are not TaskConfig fields are refused. Raises
    ValueError naming the field at fault."""
    if not isinstance(raw, dict):
        return raw
    name = str(raw.get("name", "paraphrase"))
    if name not in TASKS:
        return raw  # get_task names the unknown task
    cls = TASKS[name]
    known = set(TaskConfig.model_fields)
    for key in raw:
        if key not in known and key != name:
            raise ValueError(f"unknown key {key!r}" + (f" (task {name!r} takes its options under {name}:)"
                                                       if cls.Options is not None else ""))
    if cls.Options is None:
        if name in raw:
            raise ValueError(f"task {name!r} has no options of its own ({name}:)")
        return raw
    try:
        return {**raw, name: cls.Options(**(raw.get(name) or {})).model_dump(mode="json")}
    except ValidationError as e:
        first = e.errors()[0]
        raise ValueError(f"{name}.{'.'.join(str(p) for p in first['loc'])}: {first['msg']}") from None
    except TypeError:
        raise ValueError(f"{name}: expected a mapping of options, got {raw.get(name)!r}") from None


def get_task(cfg: TaskConfig) -> Task:
    if cfg.name not in TASKS:
        raise ConfigError(f"task.name: unknown task {cfg.name!r}; choose one of {sorted(TASKS)}")
    return TASKS[cfg.name](cfg)


def records_task(train: str | None = None, dev: str | None = None, train_limit: int | None = None,
                 dev_limit: int | None = None) -> Task:
    """A user's prompt/completion or prompt/chosen/rejected records, as the `file` task reads them."""
    return TASKS["file"](TaskConfig(name="file", train=train, dev=dev, train_limit=train_limit, dev_limit=dev_limit))


def training_task(cfg: TaskConfig) -> Task:
    """Where a stage's training data comes from: the task itself, or its `train_records` file (read as
    task `file`; the task still evaluates)."""
    if cfg.train_records:
        return records_task(train=cfg.train_records, train_limit=cfg.train_limit)
    return get_task(cfg)


def evaluate_task(task: Task, lm: LM, out_dir: Path | None, batch_size: int) -> dict[str, float]:
    """The task's own metrics plus ``<name>_logp`` for each of its ``score_records`` files: the mean
    per-token log-likelihood of the file's completions given their prompts (EOS as the task trains)."""
    from ..logprobs import completion_nll

    metrics = task.evaluate(lm, out_dir, batch_size)
    for name, path in task.cfg.score_records.items():
        examples = records_task(train=path).train_examples()
        nll, tokens = completion_nll(lm, examples, batch_size, task.cfg.overlength, task.append_eos,
                                     source=f"task.score_records.{name} ({path})")
        metrics[f"{name}_logp"] = -nll / tokens
    return metrics


def records_fingerprint(cfg: TaskConfig) -> dict[str, str]:
    """sha256 of each file the evaluation reads besides the task's own data (score_records), so a
    cached evaluation is redone when one of them changes."""
    import hashlib

    return {name: hashlib.sha256(require_file(path, f"task.score_records.{name}").read_bytes()).hexdigest()
            for name, path in sorted(cfg.score_records.items())}


