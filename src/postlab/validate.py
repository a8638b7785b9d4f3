"""One validation path for what a user types: command-line arguments and output locations are
checked the way run configs are (pydantic constraints, one `error:` line naming the argument or path
and what to do, exit status 2, no traceback).

- `Parser`: argparse whose usage errors become ConfigError (main() prints and returns 2).
- `like(Model, "field")`: an argparse type that validates a value exactly as the config field it
  stands for (`--top-p` is GenerationConfig.top_p); `number(int, gt=0)` for arguments without one.
- `output_location(path, what)`: a directory postlab may create and write, or a clear refusal.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, TypeAdapter, ValidationError

from .errors import ConfigError


class Parser(argparse.ArgumentParser):
    """argparse with errors raised (and reported by main like every other bad input), not exit()."""

    def error(self, message: str):
        raise ConfigError(f"{self.prog}: {message} (see {self.prog} --help)")


def _checker(annotation: Any, what: str):
    adapter = TypeAdapter(annotation)

    def check(text: str):
        try:
            return adapter.validate_python(text) if annotation is str else adapter.validate_strings(text)
        except ValidationError as e:
            raise argparse.ArgumentTypeError(f"{e.errors()[0]['msg']} (got {text!r}{what})") from None

    check.__name__ = getattr(annotation, "__name__", "value")  # argparse names the type in its messages
    return check


def like(model: type, field: str):
    """An argparse type validating a value as `model.field` (its type and constraints)."""
    info = model.model_fields[field]
    annotation = Annotated[info.annotation, *info.metadata] if info.metadata else info.annotation
    return _checker(annotation, f"; as {model.__name__}.{field}")


def number(kind: type, **constraints):
    """An argparse type for an int or float with pydantic constraints (gt, ge, lt, le)."""
    return _checker(Annotated[kind, Field(**constraints)], "")


def output_location(path: str | os.PathLike, what: str) -> Path:
    """`path` as a directory postlab can create and write into, or a ConfigError saying why not:
    an existing file, a file among its parents, or a place this user cannot write."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{what} {p}: is a file, not a directory; choose a directory")
    parent = next((q for q in [p, *p.parents] if q.exists()), None)
    if parent is not None and not parent.is_dir():
        raise ConfigError(f"{what} {p}: {parent} is a file, so nothing can be created under it; choose a directory")
    if parent is not None and not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {p}: {parent} is not writable by this user; choose a writable directory")
    return p


def location(text: str) -> Path:
    """An argparse type for an output directory (see output_location)."""
    try:
        return output_location(text, "output directory")
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
