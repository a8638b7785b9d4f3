"""The errors postlab raises on purpose. Each names the file, line or field at fault and what to do."""


class PostlabError(Exception):
    """Base class: anything the user can fix. The CLI prints these without a traceback."""


class ConfigError(PostlabError):
    """A config key is unknown, has the wrong type or an invalid value."""


class DataError(PostlabError):
    """A data file is missing, empty or malformed."""


class ModelError(PostlabError):
    """A model or checkpoint cannot be found or loaded."""


class TrainingError(PostlabError):
    """Training cannot go on (e.g. a NaN loss); the last good checkpoint is kept."""


# What users of other trainers (transformers' TrainingArguments, TRL) call postlab's keys.
ALIASES = {"learning_rate": "lr", "num_train_epochs": "epochs", "per_device_train_batch_size": "batch_size",
           "train_batch_size": "batch_size", "gradient_accumulation_steps": "grad_accum", "max_grad_norm": "grad_clip",
           "lr_scheduler_type": "schedule", "scheduler": "schedule", "warmup": "warmup_ratio", "max_seq_length": "max_length",
           "logging_steps": "log_every", "eval_steps": "eval_every_steps", "save_steps": "save_every_steps",
           "per_device_eval_batch_size": "eval_batch_size", "dtype": "precision", "torch_dtype": "precision",
           "model_name_or_path": "name", "loss_type": "name", "max_completion_length": "max_completion_tokens"}


def nearest(word: str, choices) -> str:
    """' (did you mean X?)' for the closest of `choices` to a mistyped `word` (another trainer's name for
    a key counts: `learning_rate` -> `lr`), or ''."""
    import difflib

    choices = [str(c) for c in choices]
    aliases = {a: k for a, k in ALIASES.items() if k in choices}
    close = difflib.get_close_matches(str(word), choices + list(aliases), n=1, cutoff=0.6)
    if not close:
        return ""
    return f" (did you mean {aliases.get(close[0], close[0])!r}?)"


def _fields_at(model, loc: tuple) -> list[str]:
    """The field names of the pydantic model found by following `loc` from `model` (list indices
    skipped, optional and list types unwrapped); [] where the path leaves the models."""
    import typing

    for part in loc:
        if isinstance(part, int):
            continue
        info = getattr(model, "model_fields", {}).get(part)
        if info is None:
            return []
        ann = info.annotation
        for _ in range(3):  # list[X], X | None, ...
            args = [a for a in typing.get_args(ann) if a is not type(None)]
            if hasattr(ann, "model_fields") or not args:
                break
            ann = args[0]
        model = ann
    fields = getattr(model, "model_fields", {})
    # keys of the items of list fields too (a run's stage keys), which a top-level key may have meant
    items = [a for f in fields.values() for a in typing.get_args(f.annotation) if hasattr(a, "model_fields")]
    return list(fields) + [k for m in items for k in m.model_fields]


def format_validation_error(err, prefix: str = "", model=None) -> str:
    """A pydantic ValidationError as postlab reports bad input: one line per field, dotted path first;
    an unknown key of `model`'s tree names its closest known key."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        where = ".".join(p for p in (prefix, loc) if p)
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            hint = nearest(e["loc"][-1], _fields_at(model, e["loc"][:-1])) if model is not None and e["loc"] else ""
            msg = f"unknown key{hint or ' (check the spelling; see docs/config.md)'}"
        lines.append(f"{where or '<root>'}: {msg}" + (f" (got {e['input']!r})" if e["type"] != "extra_forbidden" and not isinstance(e.get("input"), dict) else ""))
    return "invalid config:\n  " + "\n  ".join(lines)
