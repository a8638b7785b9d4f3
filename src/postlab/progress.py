"""Progress bars: one place decides whether they are drawn. Off with `--no-progress` (which sets
POSTLAB_NO_PROGRESS=1 for the process and the ones it starts), when standard error is not a terminal
(a log file fills with carriage returns otherwise), and on every process but the main one."""
from __future__ import annotations

import os
import sys

ENV = "POSTLAB_NO_PROGRESS"


def enabled() -> bool:
    if os.environ.get(ENV, "") not in ("", "0"):
        return False
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def disable() -> None:
    os.environ[ENV] = "1"


def bar(iterable=None, *, main_process: bool = True, **kwargs):
    """tqdm with `disable` decided here (see the module doc); other arguments as tqdm's."""
    from tqdm.auto import tqdm

    kwargs.pop("disable", None)
    return tqdm(iterable, disable=not (main_process and enabled()), **kwargs)
