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


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """--help names each option's default where it has a value (not for flags that are off, or unset options)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "%(default)" not in text and action.option_strings:
            text += " (default: %(default)s)"
        return text


class Parser(argparse.ArgumentParser):
    """argparse with errors raised (and reported by main like every other bad input), not exit()."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def add_argument(self, *args, **kwargs):
        if kwargs.get("help") is None and kwargs.get("default") not in (None, False) and args[0].startswith("-"):
            kwargs["help"] = "(default: %(default)s)"  # an option without help text still shows its default
        return super().add_argument(*args, **kwargs)

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


def check_model(name: str, what: str) -> None:
    """A model a command line names: an embedded name, a hub id, or a directory holding a checkpoint
    (config.json) or an adapter (adapter_config.json); anything else is refused before a model loads."""
    from .hub import EMBEDDED, is_hub_id

    if name in EMBEDDED:
        return
    p = Path(name).expanduser()
    if not p.exists():
        if is_hub_id(name, bare_names=True):
            return
        raise ConfigError(f"{what} {name}: no such model directory (give a checkpoint directory, an adapter "
                          f"directory, {' or '.join(EMBEDDED)}, or a hub id)")
    if not p.is_dir():
        raise ConfigError(f"{what} {name}: is a file; give the checkpoint's directory (config.json and weights)")
    if not ((p / "config.json").is_file() or (p / "adapter_config.json").is_file()):
        raise ConfigError(f"{what} {name}: holds no config.json or adapter_config.json, so it is no Hugging Face "
                          f"checkpoint or PEFT adapter (a run's stage writes one to <stage>/model)")


def readable_file(path: str, what: str) -> Path:
    """A file a command line names, checked: it exists, is a file, can be read and is UTF-8 text."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(f"{what} {path}: no such file")
    if not p.is_file():
        raise ConfigError(f"{what} {path}: is a directory, not a file")
    try:
        p.read_bytes().decode("utf-8")
    except PermissionError:
        raise ConfigError(f"{what} {path}: not readable by this user") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what} {path}: not UTF-8 text (byte {e.start}); re-save it as UTF-8") from None
    return p


def prompt_blocks(path: str, what: str) -> list[str]:
    """The prompts of a prompt file: blocks separated by blank lines; a file without any is refused."""
    blocks = [b for b in readable_file(path, what).read_text(encoding="utf-8").split("\n\n") if b.strip()]
    if not blocks:
        raise ConfigError(f"{what} {path}: holds no prompt (prompts are blocks of text separated by blank lines)")
    return blocks
