"""Configs: pydantic models that mirror what they configure. Unknown keys and wrong types fail
before any model loads, naming the key.

A run is a list of stages; a stage is data (task) + objective + parameterization + schedule.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelConfig(Strict):
    name: str = "smollm2-135m"  # embedded default, a Hugging Face id, or a local directory
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # auto: bf16 where fast, else fp32
    trust_remote_code: bool = False
    max_length: int | None = Field(None, gt=0)  # None: the model's context length


class ParameterizationConfig(BaseModel):
    """`method` (a registered parameterization: fft, lora, dora, ...), the method's own options under
    its name (e.g. `lora: {r: 8}`), and what happens to an adapter an earlier stage trained: keep
    training it (`continue`, when this stage uses the same method) or merge it into the weights first."""

    model_config = ConfigDict(extra="allow")
    method: str = "fft"
    adapter: Literal["continue", "merge"] = "continue"

    @model_validator(mode="before")
    @classmethod
    def _normalize(cls, data: Any) -> Any:
        from .parameterizations import normalized_config

        try:
            return normalized_config(data)
        except ConfigError as e:
            raise ValueError(str(e)) from None


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
        from .tasks import normalized_config

        return normalized_config(data)

    def evaluation_settings(self) -> dict:
        """The fields that decide what evaluation measures (dev data, metrics, generation), without
        the training-only ones: two stages that agree here evaluate the same weights identically."""
        return self.model_dump(mode="json", exclude={"train", "train_limit", "pairs", "max_completion_tokens",
                                                     "train_records"})


class OptimConfig(Strict):
    lr: float = Field(2e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    grad_clip: float | None = Field(1.0, gt=0)
    batch_size: int = Field(8, gt=0)
    grad_accum: int = Field(1, gt=0)
    # At most this many sequences per forward pass (default: batch_size). Preference pairs whose
    # answers cannot share a row take two rows each, so a micro-batch of pairs runs as a few forwards
    # accumulated into the same step: exact for losses that are means over pairs, and it keeps a
    # DPO stage's activation memory at the SFT stage's (bench/dpo_memory.py).
    forward_rows: int | None = Field(None, gt=0)


class ObjectiveConfig(BaseModel):
    """`name` plus the objective's own knobs (validated against the objective's args model)."""

    model_config = ConfigDict(extra="allow")
    name: str = "nll"

    @model_validator(mode="after")
    def _check_args(self) -> "ObjectiveConfig":
        from .objectives import get_objective, parse_args

        parse_args(get_objective(self.name), self.args)
        return self

    @property
    def args(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class StageConfig(Strict):
    name: str = "sft"
    task: TaskConfig = TaskConfig()
    objective: ObjectiveConfig = ObjectiveConfig()
    parameterization: ParameterizationConfig = ParameterizationConfig()
    optim: OptimConfig = OptimConfig()
    epochs: int = Field(1, gt=0)
    # Overrides epochs when set; 0 trains nothing and only evaluates the stage's starting model (a
    # study's row for a model as it is: a base model, a teacher, a pruned student).
    max_steps: int | None = Field(None, ge=0)
    eval_every_steps: int | None = Field(None, gt=0)  # besides every epoch
    eval_at_start: bool = True  # measure the stage's starting point too
    save_every_steps: int | None = Field(None, gt=0)  # besides every epoch
    log_every: int = Field(10, gt=0)
    eval_batch_size: int = Field(16, gt=0)
    group_by_length: bool = True
    # Preference stages: the reference is the policy as the stage begins, or the run's base model.
    reference: Literal["stage-start", "base"] = "stage-start"
    # Distillation objectives (kd, dadpo): the teacher model (name or path; same tokenizer as the student).
    teacher: str | None = None
    save_model: bool = True  # write the stage's final model (HF format) to <stage>/model
    # ExPO: after training, the stage's weights become θ_start + λ(θ_end − θ_start) (λ > 1
    # extrapolates; evaluated and saved as the stage's model; the trained checkpoint stays as is).
    expo_lambda: float | None = None


class RunConfig(Strict):
    model: ModelConfig = ModelConfig()
    seed: int = 0
    output_dir: str = "runs/run"
    # Copy a completed stage from an earlier run with the same model, seed and stages up to it
    # (e.g. the SFT stage an SFT->DPO run shares with an SFT-only run) instead of training it again.
    reuse_stages: bool = True
    # Also log every metrics record to TensorBoard (<output_dir>/tensorboard/) and/or MLflow.
    tracking: list[Literal["tensorboard", "mlflow"]] = []
    # Several processes (accelerate launch): ddp keeps a whole model on each; fsdp shards weights,
    # gradients and optimizer state across them (same steps, less memory per process).
    parallel: Literal["ddp", "fsdp"] = "ddp"
    stages: list[StageConfig] = Field(default_factory=lambda: [StageConfig()], min_length=1)

    @field_validator("stages")
    @classmethod
    def _unique_names(cls, stages: list[StageConfig]) -> list[StageConfig]:
        names = [s.name for s in stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique, got {names}")
        return stages


def format_validation_error(err: ValidationError, prefix: str = "") -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        where = ".".join(p for p in (prefix, loc) if p)
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see the config reference in README.md)"
        lines.append(f"{where or '<root>'}: {msg}" + (f" (got {e['input']!r})" if e["type"] != "extra_forbidden" and not isinstance(e.get("input"), dict) else ""))
    return "invalid config:\n  " + "\n  ".join(lines)


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    """Set `a.b.0.c` in a nested dict/list tree, creating dicts as needed."""
    keys = dotted.split(".")
    node: Any = tree
    for i, key in enumerate(keys):
        last = i == len(keys) - 1
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise ConfigError(f"override {dotted!r}: {key!r} is not a valid index (list has {len(node)} items)")
            if last:
                node[int(key)] = value
            else:
                node = node[int(key)]
        else:
            if last:
                node[key] = value
            else:
                node = node.setdefault(key, {})
                if not isinstance(node, (dict, list)):
                    raise ConfigError(f"override {dotted!r}: {key!r} is not a section")


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    """`key=value` pairs, values parsed as YAML. A key naming a stage field (e.g. `optim.lr`) applies
    to every stage; `stages.1.optim.lr` targets one."""
    stage_fields = set(StageConfig.model_fields)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. optim.lr=1e-4")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else None
        head = key.split(".")[0]
        if head not in RunConfig.model_fields and head in stage_fields:
            stages = tree.setdefault("stages", [{}])
            for i in range(len(stages)):
                _set_path(tree, f"stages.{i}.{key}", value)
        else:
            _set_path(tree, key, value)
    return tree


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e})") from None
    if tree is None:
        tree = {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys at the top level")
    return tree


def parse_run_config(tree: dict, source: str = "config") -> RunConfig:
    try:
        return RunConfig(**tree)
    except ValidationError as e:
        raise ConfigError(f"{source}: " + format_validation_error(e)) from None
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def load_run_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    tree = apply_overrides(read_yaml(path), list(overrides or []))
    return parse_run_config(tree, source=str(path))


def dump_config(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
