"""The study file: a pydantic model, validated like run configs (unknown keys and wrong types fail
naming the key), then turned into a `Study` (axes, assignments and overrides checked against each
other). The format is documented in postlab/study/__init__.py."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..config import RunConfig, StageConfig, format_validation_error, read_yaml
from ..errors import ConfigError

RUN_FIELDS = set(RunConfig.model_fields)
STAGE_FIELDS = set(StageConfig.model_fields)
BY_STAGE = "by_stage"


def same(a: Any, b: Any) -> bool:
    """Equal axis values (1 == 1.0, but True is not 1)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    return a == b


def fmt(v: Any) -> str:
    import json

    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float, str)):
        return str(v)
    return json.dumps(v, separators=(",", ":"), sort_keys=True, default=str)


def check_partial(tree: dict, where: str = "") -> None:
    """Top-level keys of a base or variant tree: run keys, stage keys, by_stage, or dotted keys."""
    pre = f"{where}: " if where else ""
    for k, v in tree.items():
        k = str(k)
        if "." in k:
            if k.split(".")[0] not in RUN_FIELDS | STAGE_FIELDS:
                raise ValueError(f"{pre}{k}: unknown key {k.split('.')[0]!r}")
        elif k == BY_STAGE:
            if not isinstance(v, dict) or not all(isinstance(s, dict) for s in v.values()):
                raise ValueError(f"{pre}by_stage: expected {{<stage name>: {{partial stage config}}}}")
        elif k not in RUN_FIELDS | STAGE_FIELDS:
            raise ValueError(f"{pre}{k}: unknown key (run keys: {sorted(RUN_FIELDS)}; stage keys: "
                             f"{sorted(STAGE_FIELDS)}; also by_stage and dotted keys like optim.lr)")
        if k == "stages" and not (isinstance(v, list) and all(isinstance(s, dict) for s in v)):
            raise ValueError(f"{pre}stages: expected a list of stage mappings")


class Override(BaseModel):
    model_config = ConfigDict(extra="forbid")
    when: dict[str, Any] = Field(min_length=1)
    set: dict[str, Any]

    @field_validator("set")
    @classmethod
    def _partial(cls, v: dict) -> dict:
        check_partial(v)
        return v


class StudyFile(BaseModel):
    """What a study file may hold (see the package docstring)."""

    model_config = ConfigDict(extra="forbid")
    name: str | None = None
    description: str = ""
    output_dir: str | None = None
    base: dict[str, Any] = {}
    axes: dict[str, list[Any] | dict[str, dict[str, Any] | None]] = Field(min_length=1)
    exclude: list[dict[str, Any]] = []
    include: list[dict[str, Any]] = []
    overrides: list[Override] = []
    win_rate_vs: dict[str, Any] | None = Field(None, min_length=1)  # read by the report (postlab.report.results.add_win_rates)
    metrics: list[str] | None = Field(None, min_length=1)  # read by the report and the planner
    # Stages whose end-of-stage evaluation is compared too (e.g. [sft]: the models after SFT, before
    # the DPO stage that ends the run), each a Holm family of its own; read by the report and the planner.
    compare_stages: list[str] | None = Field(None, min_length=1)
    # The smallest difference worth finding, per metric (e.g. {accuracy: 0.02, chrf: 1.0}): the planner
    # says in words where the design cannot detect it, and how many seeds would.
    effects: dict[str, Annotated[float, Field(gt=0)]] | None = None

    @field_validator("base")
    @classmethod
    def _base(cls, v: dict) -> dict:
        if "output_dir" in v:
            raise ValueError("base.output_dir: the study sets each run's output_dir (<study dir>/runs/<run id>); "
                             "set the study's output_dir instead")
        check_partial(v)
        return v

    @field_validator("axes")
    @classmethod
    def _axes(cls, axes: dict) -> dict:
        for name, spec in axes.items():
            if any(c in name for c in ",=") or not name.strip():
                raise ValueError(f"{name!r}: an axis name may not be empty or hold ',' or '='")
            if isinstance(spec, list):
                if not spec:
                    raise ValueError(f"{name}: no values")
                if any(isinstance(v, (dict, list)) for v in spec):
                    raise ValueError(f"{name}: a list of values must hold scalars; for partial configs use a "
                                     f"mapping of variant name -> config")
                if len({fmt(v) for v in spec}) != len(spec):
                    raise ValueError(f"{name}: repeated values {spec}")
                if name.split(".")[0] not in RUN_FIELDS | STAGE_FIELDS:
                    raise ValueError(f"{name}: a list of values sets the config key {name!r}, which is not one (run "
                                     f"keys: {sorted(RUN_FIELDS)}; stage keys: {sorted(STAGE_FIELDS)}); to name "
                                     f"variants, use a mapping of variant name -> partial config")
            else:
                if not spec:
                    raise ValueError(f"{name}: no variants")
                for vname, vtree in spec.items():
                    check_partial(vtree or {}, f"{name}.{vname}")
        return axes


@dataclass
class Axis:
    name: str
    kind: str  # "scalar" | "variant"
    values: list[Any]  # scalars, or variant names (str)
    variants: dict[str, dict] = field(default_factory=dict)  # variant name -> partial tree

    def value_of(self, raw: Any, where: str, new_ok: bool = False) -> Any:
        """An assignment's value for this axis, checked (variant names must exist)."""
        if self.kind == "variant":
            key = str(raw)
            if key not in self.variants:
                raise ConfigError(f"{where}: axis {self.name!r} has no variant {key!r}; "
                                  f"its variants are {list(self.variants)}")
            return key
        if not new_ok and not any(same(raw, v) for v in self.values):
            raise ConfigError(f"{where}: {raw!r} is not a value of axis {self.name!r} ({self.values})")
        return raw


@dataclass
class Study:
    path: Path
    text: str
    name: str
    description: str
    output_dir: str | None
    base: dict
    axes: list[Axis]
    exclude: list[dict]
    include: list[dict]
    overrides: list[tuple[dict, dict]] = field(default_factory=list)  # (when, partial tree)
    metrics: list[str] | None = None  # the metrics the report compares (default: each task's primary ones)
    effects: dict[str, float] | None = None  # the smallest difference worth finding, per metric
    win_rate_vs: dict[str, Any] | None = None  # the report's win_rate_vs_<values> metric
    compare_stages: list[str] | None = None  # stages whose end-of-stage evaluations the report compares too

    def default_dir(self) -> Path:
        return Path(self.output_dir) if self.output_dir else Path("runs") / self.path.stem


def _assignment(entry: dict, axes: list[Axis], where: str, new_ok: bool) -> dict[str, Any]:
    by_name = {a.name: a for a in axes}
    if not entry:
        raise ConfigError(f"{where}: expected a mapping of axis name -> value, e.g. {{regime: dpo}}")
    out = {}
    for k, v in entry.items():
        if str(k) not in by_name:
            raise ConfigError(f"{where}: {k!r} is not an axis (axes: {list(by_name)})")
        out[str(k)] = by_name[str(k)].value_of(v, where, new_ok)
    return out


def load_study(path: str | Path) -> Study:
    """Read and check a study file (the runs' own configs are checked by `plan`)."""
    path = Path(path)
    where = f"study {path}"
    try:
        f = StudyFile(**read_yaml(path))
    except ValidationError as e:
        raise ConfigError(f"{where}: " + format_validation_error(e).replace("invalid config", "invalid study file")) from None
    axes = [Axis(name, "scalar", list(spec)) if isinstance(spec, list) else
            Axis(name, "variant", list(spec), {str(k): v or {} for k, v in spec.items()})
            for name, spec in f.axes.items()]
    exclude = [_assignment(e, axes, f"{where}: exclude[{i}]", new_ok=False) for i, e in enumerate(f.exclude)]
    include = [_assignment(e, axes, f"{where}: include[{i}]", new_ok=True) for i, e in enumerate(f.include)]
    if f.win_rate_vs:
        _assignment(f.win_rate_vs, axes, f"{where}: win_rate_vs", new_ok=False)
    overrides = [(_assignment(o.when, axes, f"{where}: overrides[{i}].when", new_ok=False), o.set)
                 for i, o in enumerate(f.overrides)]
    return Study(path, path.read_text(encoding="utf-8"), str(f.name or path.stem), f.description, f.output_dir, f.base,
                 axes, exclude, include, overrides, f.metrics, f.effects, f.win_rate_vs, f.compare_stages)
