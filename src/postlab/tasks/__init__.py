"""Tasks turn raw data into prompt/completion examples (and preference pairs) and own their metrics.

Register a task with ``@register_task``; a stage names it in ``task.name``.
"""
from __future__ import annotations

from . import cloze, files, paraphrase, sonnets  # noqa: E402,F401  (registration)
from .base import (  # noqa: F401
                   PER_EXAMPLE,
                   TASKS,
                   EvalCost,
                   GenerationConfig,
                   PairsConfig,
                   SampledRejected,
                   Task,
                   TaskConfig,
                   data_dir,
                   evaluate_task,
                   get_task,
                   normalized_config,
                   read_text,
                   records_fingerprint,
                   records_task,
                   register_task,
                   require_file,
                   training_task,
)
