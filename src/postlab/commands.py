"""What each `postlab` command does (the parser and the entry point are postlab.cli). Heavy imports
happen inside the commands that need them: parsing, --help and validation stay free of torch."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .errors import ConfigError, PostlabError
from .validate import check_model, prompt_blocks

log = logging.getLogger("postlab")


def cmd_train(a: argparse.Namespace) -> int:
    from .config import dump_config, load_run_config

    overrides = list(a.overrides) + ([f"output_dir={a.output_dir}"] if a.output_dir else [])
    cfg = load_run_config(a.config, overrides)
    if a.dry_run:  # the config as the run would use it, every default filled in; nothing loads or trains
        print(dump_config(cfg), end="")
        return 0
    if a.resume and not Path(cfg.output_dir).exists():  # (a run killed before it wrote anything resumes from scratch)
        raise ConfigError(f"--resume: {cfg.output_dir} does not exist, so there is no run to resume; drop --resume to "
                          f"start it (or check output_dir)")
    from .run import run

    result = run(cfg, resume=a.resume)
    from . import distributed as dist

    if dist.is_main():  # the others hold no evaluation results
        print(summary(result, cfg.output_dir))
    return 0


def task_name(text: str) -> str:
    """An argparse type: a registered task's name, or an error naming the closest one."""
    from .errors import nearest
    from .tasks import TASKS

    if text not in TASKS:
        raise argparse.ArgumentTypeError(f"unknown task {text!r}{nearest(text, TASKS)}; the tasks are {sorted(TASKS)}")
    return text


def _options(model) -> list[str]:
    """'name: type = default  (description)' for each field of a pydantic options model."""
    if model is None:
        return ["    (no options)"]
    out = []
    for name, f in model.model_fields.items():
        kind = (f.annotation.__name__ if isinstance(f.annotation, type)
                else str(f.annotation).replace("typing.", "").replace("Literal", ""))
        default = "(required)" if f.is_required() else repr(f.default)
        out.append(f"    {name}: {kind} = {default}" + (f"  ({f.description})" if f.description else ""))
    return out or ["    (no options)"]


def cmd_list(a: argparse.Namespace) -> int:
    lines = []
    if a.what == "tasks":
        from .tasks import TASKS

        for name, cls in sorted(TASKS.items()):
            doc = (cls.__doc__ or (__import__(cls.__module__, fromlist=["_"]).__doc__ or "")).strip().splitlines()
            lines += [f"{name}: {doc[0] if doc else ''}",
                      f"  metrics compared by a study: {', '.join(cls.primary_metrics) or 'all'}; "
                      f"options under task.{name}:"] + _options(cls.Options)
    elif a.what == "objectives":
        from .objectives import REGISTRY, unmet_needs

        for name, spec in sorted(REGISTRY.items()):
            needs = spec.needs()
            required = any(f.is_required() for f in spec.args.model_fields.values())
            waiting = not required and unmet_needs(spec, spec.args())
            lines += [f"{name} ({spec.kind}" + (f"; needs {' and '.join(needs)}" if needs else "")
                      + ("; not trainable yet: the stage does not prepare it" if waiting else "") + "): "
                      + (spec.doc.splitlines()[0] if spec.doc else "")] + _options(spec.args)
    else:
        from .parameterizations import REGISTRY as METHODS

        for name, method in sorted(METHODS.items()):
            doc = (type(method).__doc__ or __import__(type(method).__module__, fromlist=["_"]).__doc__ or "").strip()
            lines += [f"{name}: {doc.splitlines()[0] if doc else ''}",
                      f"  options under parameterization.{name}:"] + _options(method.Options)
    print("\n".join(lines))
    return 0


def summary(result: dict, out: str) -> str:
    lines = [f"run {result['run_id']} done in {result['wall_s']:.0f}s on {result.get('device')}; outputs in {out}"]
    for s in result["stages"]:
        shown = {k: round(v, 4) for k, v in s["metrics"].items() if not k.startswith("majority_") and k != "n"}
        lines.append(f"  stage {s['name']} ({s['objective']}, {s['parameterization']}): {s['steps']} steps, "
                     f"{s['wall_s']:.0f}s, dev {shown}")
    return "\n".join(lines)


def cmd_eval(a: argparse.Namespace) -> int:
    from .config import TaskConfig
    from .models import load_lm
    from .tasks import evaluate_task, get_task

    fields = {"name": a.task, "dev": a.dev, "dev_reference": a.dev_reference, "dev_limit": a.dev_limit}
    task = get_task(TaskConfig(**{k: v for k, v in fields.items() if v is not None}))
    task.dev_examples()  # the dev files, checked before a model loads
    check_model(a.checkpoint, "CHECKPOINT")
    if a.reference:
        check_model(a.reference, "--reference")
    lm = load_lm(a.checkpoint, a.device, a.precision, max_length=a.max_length)
    metrics = evaluate_task(task, lm, Path(a.out) if a.out else None, a.batch_size)
    if a.reference:
        from .evaluate import implicit_rewards

        ref = load_lm(a.reference, a.device, a.precision, max_length=a.max_length)
        pairs = task.preference_pairs("dev")
        metrics.update(implicit_rewards(lm, ref, pairs, a.beta, a.batch_size, task.append_eos))
    print(json.dumps(metrics, indent=2))
    return 0


def cmd_generate(a: argparse.Namespace) -> int:
    from .config import GenerationConfig
    from .generate import generate
    from .models import load_lm

    prompts = a.prompt or []
    if a.prompt_file:
        prompts += prompt_blocks(a.prompt_file, "--prompt-file")
    if not prompts:
        raise PostlabError("give --prompt TEXT (repeatable) or --prompt-file FILE")
    check_model(a.checkpoint, "CHECKPOINT")
    lm = load_lm(a.checkpoint, a.device, a.precision)
    gen = GenerationConfig(greedy=a.greedy, temperature=a.temperature, top_p=a.top_p,
                           max_new_tokens=a.max_new_tokens, seed=a.seed)
    for p, c in zip(prompts, generate(lm, prompts, gen)):
        print(p + c)
        print("-" * 40)
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    from .models import load_lm
    from .parameterizations import adapter_of, plain, save_model

    check_model(a.checkpoint, "CHECKPOINT")
    lm = load_lm(a.checkpoint, "cpu", "fp32")
    model = plain(lm.model) if a.merge else lm.model
    if adapter_of(model) is not None:
        log.info("exporting the adapter as-is (add --merge for a full checkpoint)")
    save_model(model, lm.tokenizer, Path(a.out), lm.source)
    print(f"wrote {a.out}")
    return 0


def cmd_diagnose(a: argparse.Namespace) -> int:
    from .config import TaskConfig
    from .diagnose import diagnose, format_summary
    from .models import load_lm
    from .tasks import get_task, records_task

    if bool(a.pairs) == bool(a.task):
        raise PostlabError("diagnose: give --pairs FILE (a prompt/chosen/rejected file) or --task NAME (its dev pairs)")
    task = (records_task(dev=a.pairs, dev_limit=a.limit) if a.pairs else
            get_task(TaskConfig(name=a.task, dev_limit=a.limit, **({"dev": a.dev} if a.dev else {}))))
    pairs = task.preference_pairs("dev")
    check_model(a.checkpoint, "CHECKPOINT")
    check_model(a.reference, "--reference")
    policy = load_lm(a.checkpoint, a.device, a.precision)
    reference = load_lm(a.reference, a.device, a.precision)
    out = Path(a.out or Path(a.checkpoint) / "diagnose")
    summary = diagnose(policy, reference, pairs, a.beta, out, a.batch_size, task.append_eos, a.examples)
    print(format_summary(summary))
    print(f"wrote {out}/summary.json, per_example.jsonl, q_view.png")
    return 0


def calibration_texts(task: str | None, prompt_file: str | None, limit: int) -> list[str]:
    """Texts for calibration or sampling: a task's training examples (prompt + completion) or a file
    of prompts separated by blank lines."""
    if prompt_file:
        return prompt_blocks(prompt_file, "--prompt-file")[:limit]
    if task:
        from .config import TaskConfig
        from .tasks import get_task

        return [e.prompt + e.completion for e in get_task(TaskConfig(name=task, train_limit=limit)).train_examples()]
    return []


def cmd_prune(a: argparse.Namespace) -> int:
    from . import prune
    from .models import load_lm

    texts = calibration_texts(a.task, a.prompt_file, a.samples)
    check_model(a.checkpoint, "CHECKPOINT")
    lm = load_lm(a.checkpoint, a.device, "fp32")
    report = prune.prune(lm, a.drop, a.method, texts)
    prune.write(lm, Path(a.out), report)
    print(f"wrote {a.out}: {report['layers_before']} -> {report['layers_after']} layers (dropped {report['dropped']}), "
          f"{report['params_before']:,} -> {report['params_after']:,} parameters")
    return 0


def cmd_distill(a: argparse.Namespace) -> int:
    from .config import GenerationConfig, TaskConfig
    from .distill import sample_teacher_and_student
    from .models import load_lm

    if bool(a.task) == bool(a.prompt_file):
        raise PostlabError("distill sample: give --task NAME (its training prompts) or --prompt-file FILE")
    if a.task:
        from .tasks import get_task

        task = get_task(TaskConfig(name=a.task, train_limit=a.limit, dev_limit=a.limit))
        # dev prompts: held-out teacher responses, e.g. for task.score_records (teacher_logp)
        examples = task.train_examples() if a.split == "train" else task.dev_examples()
        prompts, ids = [e.prompt for e in examples], [e.id or str(i) for i, e in enumerate(examples)]
    else:
        prompts = calibration_texts(None, a.prompt_file, a.limit or 10**9)
        ids = [f"{Path(a.prompt_file).name}:{i}" for i in range(len(prompts))]
    gen = GenerationConfig(greedy=a.greedy, temperature=a.temperature, top_p=a.top_p,
                           max_new_tokens=a.max_new_tokens, seed=a.seed)
    check_model(a.teacher, "--teacher")
    check_model(a.student, "--student")
    teacher = load_lm(a.teacher, a.device, a.precision)
    student = load_lm(a.student, a.device, a.precision)
    s = sample_teacher_and_student(teacher, student, prompts, ids, gen, Path(a.out), clean_for=a.task)
    print(f"wrote {a.out}/dsft.jsonl ({s['dsft_examples']} examples) and pairs.jsonl ({s['pairs']} pairs; "
          f"{s['skipped_same_or_empty_student']} skipped: student answer equal or empty)")
    return 0


def cmd_merge(a: argparse.Namespace) -> int:
    from . import merge

    for c in (a.checkpoints if a.merge_command == "soup" else [a.sft, a.dpo]):
        check_model(c, "CHECKPOINT")
    if a.merge_command == "soup":
        paths, coef = a.checkpoints, merge.soup_coefficients(len(a.checkpoints), a.weights)
        note = {"method": "soup", "checkpoints": paths, "coefficients": coef}
    else:
        paths, coef = [a.sft, a.dpo], merge.expo_coefficients(a.lam)
        note = {"method": "expo", "sft": a.sft, "dpo": a.dpo, "lambda": a.lam, "coefficients": coef}
    out = merge.write(merge.combine(paths, coef), Path(a.out), note)
    print(f"wrote {out} ({note['method']}: " + ", ".join(f"{c:+.3g}·{p}" for c, p in zip(coef, paths)) + ")")
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    from .demo import demo
    from .tasks.base import data_dir

    return demo(str(data_dir()), **({"study_file": a.study} if a.study else {}), study_dir=a.study_dir)


def cmd_study(a: argparse.Namespace) -> int:
    from . import study as st

    if a.study_command == "report":
        from .report import summary_text, write_report

        report = write_report(a.dir, a.out, alpha=a.alpha)
        print(summary_text(report))
        print(f"report: {report}")
        return 0
    if a.study_command == "export":
        from .study.export import export_study

        copied, kept = export_study(a.dir, a.out)
        print(f"{a.out}: {len(copied)} complete run(s) copied without weights, {len(kept)} already there")
        return 0
    study = st.load_study(a.file)
    shard = st.parse_shard(a.shard)
    study_dir = Path(a.output_dir) if a.output_dir else study.default_dir()
    runs = st.plan(study)
    if a.study_command == "plan":
        mine = st.shard_runs(runs, shard)
        if a.json:
            print(json.dumps([{"index": r.index, "run_id": r.run_id, "axes": r.axes,
                               "config": st.run_config(study_dir, r).model_dump(mode="json")} for r in mine],
                             indent=2, default=str))
            return 0
        from .study.estimate import estimate
        from .study.footprint import format_footprint, study_footprint

        estimates, notes = estimate(mine, measure=a.measure)
        print(st.format_plan(study, mine, study_dir, estimates, notes, shard, total=len(runs)))
        reused = {(e.run.run_id, i) for e in estimates for i, s in enumerate(e.stages) if s.reused}
        print(format_footprint(study_footprint(mine, reused)))
        print(power_section(study, runs, study_dir, a.variance_from))
        return 1 if notes["unavailable"] else 0
    try:
        outcome = st.run_study(study, study_dir, shard, runs=runs, progress=not a.no_progress, workers=a.workers,
                               executor=a.executor, gpus_per_run=a.gpus_per_run)
    except KeyboardInterrupt:
        print(f"interrupted; rerun `postlab study run {a.file}` (same options) to continue: complete runs are "
              f"skipped and the interrupted one resumes from its last checkpoint", file=sys.stderr)
        return 130
    print(st.format_outcome(outcome, shard))
    return 1 if outcome.failed else 0


def power_section(study, runs, study_dir: Path, variance_from: str | None) -> str:
    from .report.power import components_from, format_power, planned_comparisons, power_table

    sources = []
    if variance_from:
        if not (Path(variance_from) / "runs").is_dir():
            raise ConfigError(f"--variance-from {variance_from}: not a study directory (no runs/ in it)")
        sources.append((f"measured in {variance_from}", components_from(Path(variance_from))))
    if (study_dir / "runs").is_dir():
        sources.append((f"measured in {study_dir} (runs done so far)", components_from(study_dir)))
    return format_power(power_table(planned_comparisons(study, runs), sources), study.effects)
