"""Modules imported on first use.

The front of postlab (the command line, config and study-file validation, `postlab study plan`)
answers in well under a second, and torch alone takes about two seconds to import. The modules whose
declarations the front reads (objectives' and parameterizations' options, tasks' data readers) name
torch and the model-side helpers through these proxies: declaring costs nothing, and the first
attribute used (`torch.where`, `F.logsigmoid`, ...) imports the real module.
"""
from __future__ import annotations

import importlib
import types
from typing import Any


class LazyModule(types.ModuleType):
    """Stands for the module `name` and imports it when one of its attributes is first used."""

    def __getattr__(self, attr: str) -> Any:
        return getattr(importlib.import_module(self.__name__), attr)


def lazy(name: str) -> Any:
    return LazyModule(name)


torch = lazy("torch")
F = lazy("torch.nn.functional")
