"""Configs: pydantic models that mirror what they configure. Unknown keys and wrong types fail
before any model loads, naming the key.

A run is a list of stages; a stage is data (task) + objective + parameterization + schedule.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from .errors import ConfigError, format_validation_error  # noqa: F401 (format_validation_error: re-exported)
from .tasks.base import GenerationConfig, PairsConfig, TaskConfig  # noqa: F401 (tasks own their config; re-exported)

if TYPE_CHECKING:
    from .objectives import ObjectiveArgs, ObjectiveSpec


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelConfig(Strict):
    name: str = "smollm2-135m"  # embedded default, a Hugging Face id, or a local directory
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # auto: bf16 where fast, else fp32
    trust_remote_code: bool = False
    max_length: int | None = Field(None, gt=0)  # None: the model's context length
    # torch.compile the transformer body for training forwards (dynamic shapes): a torch.compile backend,
    # e.g. inductor (GPUs; pays off on long stages, docs/performance.md), aot_eager (checks the graphs); None: eager
    compile: str | None = None


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
    # SFT: each forward's examples packed into rows (best-fit decreasing) of at most max(packing_length,
    # its longest example) tokens, each example attending only to itself at its own positions (a
    # block-diagonal mask). A step trains on the same examples with the same loss: only the layout
    # changes, so fewer padding tokens run through the model (bench/packing.py).
    packing: bool = False
    packing_length: int | None = Field(None, gt=0)


class ObjectiveConfig(BaseModel):
    """`name` plus the objective's own knobs, parsed once, as the config is validated, into the
    objective's typed args (`typed_args`), which the stage carries to the loss."""

    model_config = ConfigDict(extra="allow")
    name: str = "nll"
    _typed_args: Any = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _parse_args(self) -> "ObjectiveConfig":
        from .objectives import get_objective, parse_args

        self._typed_args = parse_args(get_objective(self.name), self.args)
        return self

    @property
    def args(self) -> dict[str, Any]:
        """The knobs as written (what config.yaml holds)."""
        return dict(self.model_extra or {})

    @property
    def typed_args(self) -> ObjectiveArgs:
        """The knobs as the objective's args model (an ObjectiveArgs), parsed when the config was validated."""
        return self._typed_args

    @property
    def spec(self) -> ObjectiveSpec:
        """The objective as these options make it (an ObjectiveSpec): its loss, kind and what the stage
        must prepare for it (an option such as a mix's terms or WPO may need more than the registered spec)."""
        from .objectives import get_objective

        return get_objective(self.name).for_args(self.typed_args)


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
    # Learning curves on a budget: the evaluations between a stage's start and its end (eval_every_steps,
    # epoch ends) score only the first N dev examples, the same N every time; the start and the end
    # score the whole dev set (a study report draws the curve on the N from their per-example files).
    curve_examples: int | None = Field(None, gt=0)
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
    # false: once the stage is done it keeps no weights at all (no model/, and its checkpoint is deleted):
    # for a run's last stage whose evaluations are all that anything reads (a study's runs). Needs
    # save_model: false. With true (the default) such a stage keeps its checkpoint, the only copy of its weights.
    keep_weights: bool = True
    # Dropout during the stage (the model's and LoRA's): None = off for objectives that compare the policy
    # with a reference or teacher (TRL's disable_dropout: the first DPO step then starts at exactly log 2),
    # on otherwise; true/false to say so.
    disable_dropout: bool | None = None
    # At the stage's end, also read the model against the stage's reference (`reference`) on held-out
    # pairs: implicit-reward accuracy and margin (β: the objective's beta, else 0.1) and the mean
    # KL(π‖πref) per chosen-answer token, as metrics ref_reward_accuracy, ref_reward_margin, ref_kl.
    # Pairs: the task's dev pairs, or (sonnets) its dev prompts with rejected answers sampled as the
    # training pairs' are (task.pairs). The reference is loaded from disk for it, after training. Each
    # pair's statistics go to <stage>/against-reference/ (postlab.metrics.AGAINST_REFERENCE_SPECS).
    against_reference: bool = False
    # Read only the first N held-out pairs (prompts, for sampled pairs) against the reference: each pair
    # costs four forward passes (both models' log-probs, then both full distributions for the KL), and
    # sampled pairs their sampling; on a whole dev set that is more than an evaluation.
    against_reference_examples: int | None = Field(None, gt=0)
    # ExPO: after training, the stage's weights become θ_start + λ(θ_end − θ_start) (λ > 1
    # extrapolates; evaluated and saved as the stage's model; the trained checkpoint stays as is).
    expo_lambda: float | None = None

    @model_validator(mode="after")
    def _packing_for_sft(self) -> "StageConfig":
        kind = self.objective.spec.kind
        if self.optim.packing and kind != "sft":
            raise ValueError(f"optim.packing packs SFT examples, but objective {self.objective.name} trains on "
                             f"{kind} items (their answers share rows or are scored side by side); drop optim.packing")
        if self.optim.packing_length is not None and not self.optim.packing:
            raise ValueError("optim.packing_length is the length of packed rows; set optim.packing: true too")
        return self

    @model_validator(mode="after")
    def _against_reference_limit(self) -> "StageConfig":
        if self.against_reference_examples is not None and not self.against_reference:
            raise ValueError("against_reference_examples limits the pairs against_reference reads; set "
                             "against_reference: true too")
        return self


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

    @model_validator(mode="after")
    def _no_fp16_training(self) -> "RunConfig":
        if self.model.precision == "fp16":
            raise ValueError("model.precision: fp16 training needs loss scaling, which postlab does not do; train in "
                             "bf16 (or fp32). fp16 is fine for postlab eval and generate (--precision fp16)")
        return self

    @model_validator(mode="after")
    def _compile_and_fsdp(self) -> "RunConfig":
        if self.model.compile and self.parallel == "fsdp":
            raise ValueError("model.compile with parallel: fsdp is not supported (fsdp already wraps the body); "
                             "use parallel: ddp or drop model.compile")
        return self

    @model_validator(mode="after")
    def _weights_kept_where_read(self) -> "RunConfig":
        for i, s in enumerate(self.stages):
            if s.keep_weights:
                continue
            if s.save_model:
                raise ValueError(f"stages.{i}.keep_weights: false keeps no weights, but save_model: true asks for "
                                 f"the stage's model; set save_model: false too")
            if i < len(self.stages) - 1:
                raise ValueError(f"stages.{i}.keep_weights: false, but stage {self.stages[i + 1].name!r} starts from "
                                 f"this stage's weights; only the last stage can keep none")
        return self

    def stage_key(self, i: int, trained: bool = False) -> str:
        """Identifies what stage `i` produces: the model, the seed and stages 0..i (not where the run
        writes, nor what a stage keeps on disk afterwards). Two runs with the same key train the same
        stage from the same start, so one can reuse the other's (postlab.stage.reuse_stage). With
        `trained`, what its training produces, before an ExPO extrapolation (stage i's expo_lambda
        left out): the runs of a λ sweep share it (postlab.stage.reuse_training)."""
        import hashlib
        import json

        from . import __version__

        kept = {"save_model", "keep_weights"}
        stages = [s.model_dump(mode="json", exclude=kept) for s in self.stages[:i + 1]]
        for s in stages:  # unset, a key added later leaves the stages trained before it reusable
            if s["against_reference_examples"] is None:
                del s["against_reference_examples"]
        if trained:
            stages[i].pop("expo_lambda")
        parts = {"model": self.model.model_dump(mode="json"), "seed": self.seed, "postlab": __version__,
                 "stages": stages}
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]

    @field_validator("stages")
    @classmethod
    def _unique_names(cls, stages: list[StageConfig]) -> list[StageConfig]:
        names = [s.name for s in stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique, got {names}")
        return stages


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
        raise ConfigError(f"{source}: " + format_validation_error(e, model=RunConfig)) from None
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def load_run_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """The validated config of a YAML file with `key=value` overrides; an error the overrides cause
    names the first override at fault, not the file."""
    import copy

    tree = read_yaml(path)
    overrides = list(overrides or [])
    if not overrides:
        return parse_run_config(tree, source=str(path))
    parse_run_config(copy.deepcopy(tree), source=str(path))  # the file's own errors first
    for item in overrides:
        try:
            tree = apply_overrides(tree, [item])
        except ConfigError as e:
            raise ConfigError(str(e) if str(e).startswith("override") else f"override {item}: {e}") from None
        cfg = parse_run_config(copy.deepcopy(tree), source=f"override {item}")
    return cfg


def dump_config(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
