"""Studies: a grid of runs under matched settings, planned (validated and costed) before anything
trains, run resumably one after another, and summed up by :func:`postlab.report.write_report`.

A study file (``studies/*.yaml``)::

    name: quick                      # optional; the report's title (default: the file's stem)
    description: ...                 # optional, free text
    output_dir: runs/quick           # optional; default runs/<file stem>; --output-dir overrides
    base:                            # a run config tree, as in configs/*.yaml (model, seed, stages)
      model: {name: smollm2-135m}
      eval_batch_size: 32            # a stage field at the top level applies to every stage
    axes:                            # the grid: the cartesian product of every axis's values
      task:                          # a *variant* axis: name -> partial config tree
        paraphrase: {task: {name: paraphrase, train_limit: 300}}
        sonnets: {task: {name: sonnets}}
      regime:
        sft: {stages: [{name: sft, objective: {name: nll}}]}
        "sft->dpo": {stages: [{name: sft}, {name: dpo, objective: {name: dpo, beta: 0.1}}]}
      optim.lr: [1.0e-5, 2.0e-5]     # a *scalar* axis: the axis name is a dotted config key
      seed: [0, 1, 2]
    win_rate_vs: {method: teacher}   # optional; the report adds win_rate_vs_teacher (see postlab.report.results)
    metrics: [dev_loss, chrf]        # optional; the metrics compared (default: each task's primary ones)
    effects: {dev_loss: 0.02}        # optional; the smallest difference worth finding: the plan says what cannot find it
    compare_stages: [sft]            # optional; also compare the arms at the end of these stages (postlab.report.stages)
    exclude:                         # partial assignments: drop every run that matches one
      - {task: sonnets, optim.lr: 1.0e-5}
    include:                         # partial assignments: add back every run that matches one
      - {task: sonnets, regime: sft, optim.lr: 1.0e-5}   # (over all values of the other axes)
    overrides:                       # settings for the runs that match `when`, applied after the axes
      - when: {task: sonnets}
        set: {by_stage: {sft: {epochs: 3}}}

How a run's config is built, in this order (so a variant that replaces ``stages`` never erases
another axis's stage settings; where two axes set the same stage key, the later axis wins):

1. Run-level keys (``model``, ``seed``, ``stages``) of ``base``, then of each axis's variant, then
   of each matching override are deep-merged (mappings merge key by key; lists, ``stages`` included, and scalars replace).
2. Stage-level keys, of ``base``, each axis (in the file's order), each matching override: a key naming a stage
   field (``task``, ``objective``, ``parameterization``, ``optim``, ``epochs``, ...) is deep-merged
   into every stage; ``by_stage: {<stage name>: {...}}`` into the stages of that name only; a dotted
   key (``optim.lr: 1e-4``, ``stages.1.epochs: 6``) is set as ``postlab train`` overrides are set
   (:func:`postlab.config.apply_overrides`: a stage field applies to every stage). A scalar axis is
   such a dotted key.
3. ``output_dir`` is set to ``<study dir>/runs/<run id>``; the result is validated
   (:func:`postlab.config.parse_run_config`) at plan time, naming the run and the key at fault.

Run ids join ``axis=value`` over the axes (``task=paraphrase,regime=sft-to-dpo,param=lora-r8,seed=0``),
with a dotted axis shortened to its last part (``optim.lr`` -> ``lr``) when that is unambiguous,
``->`` written ``-to-`` and any other character outside ``[A-Za-z0-9._+=,@-]`` as ``_``.

A study directory::

    <study dir>/study.yaml             a copy of the study file (the report reads its name)
    <study dir>/plan.json              every planned run: index, run id, axes
    <study dir>/runs/<run id>/         one run (see postlab.run), plus
        axes.json                      its axes, written before it trains
        error.txt                      why it failed, if it did (removed once it succeeds)
        result.json                    written by the run; the study adds its axes ("axes")
    <study dir>/report/report.md       tables, plots and paired comparisons (postlab.report.writer)

Cost estimates (``postlab study plan``) are estimates: token counts come from the configured
tokenizer on a sample of each data set when it loads locally (else characters / 4); time divides
training tokens by a throughput (tokens/s), measured here with ``--measure`` (a few training steps
of the configured model) or else a documented default per device (:data:`postlab.study.estimate.DEFAULT_TOKENS_PER_S`).
Forward-only tokens (reference log-probs, evaluation) count a third of a training token;
generation (sonnet evaluation, sampled preference pairs) counts decode steps times a per-step
latency (:data:`DEFAULT_DECODE_STEP_S`, or measured).
"""
from __future__ import annotations

from .file import Axis, Study, StudyFile, load_study  # noqa: F401
from .grid import PlannedRun, build_tree, check_run, deep_merge, expand, plan, run_id  # noqa: F401
from .runner import (  # noqa: F401
                     StudyOutcome,
                     check_data,
                     format_outcome,
                     format_plan,
                     parse_shard,
                     run_config,
                     run_dir,
                     run_study,
                     shard_runs,
)
