"""The `postlab` command line."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .config import GenerationConfig, ModelConfig, StageConfig, TaskConfig
from .errors import ConfigError, PostlabError
from .validate import Parser, check_model, like, location, number, prompt_blocks

log = logging.getLogger("postlab")


def _setup_logging(verbose: bool) -> None:
    import os

    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    # Read by transformers and huggingface_hub when (and if) a command imports them: their warnings
    # about their own internals and their download bars are noise here.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _use_data(a: argparse.Namespace) -> None:
    """--data DIR: where the tasks' default files are read from (POSTLAB_DATA for this process and the
    ones it starts), checked before anything else happens."""
    import os

    root = getattr(a, "data_root", None)
    if root is None:
        return
    p = Path(root).expanduser()
    if not p.is_dir():
        raise ConfigError(f"--data {root}: not a directory; give the folder that holds quora/ and sonnets/")
    os.environ["POSTLAB_DATA"] = str(p.resolve())


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
        default = f.default if f.default is not None or not f.is_required() else "(required)"
        out.append(f"    {name}: {kind} = {default!r}" + (f"  ({f.description})" if f.description else ""))
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
        from .objectives import REGISTRY

        for name, spec in sorted(REGISTRY.items()):
            needs = [w for w, on in (("reference", spec.needs_reference), ("teacher", spec.needs_teacher)) if on]
            lines += [f"{name} ({spec.kind}" + (f"; needs the {' and '.join(needs)}" if needs else "") + "): "
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
        from .estimate import estimate

        from .footprint import format_footprint, study_footprint

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
    from .power import components_from, format_power, planned_comparisons, power_table

    sources = []
    if variance_from:
        if not (Path(variance_from) / "runs").is_dir():
            raise ConfigError(f"--variance-from {variance_from}: not a study directory (no runs/ in it)")
        sources.append((f"measured in {variance_from}", components_from(Path(variance_from))))
    if (study_dir / "runs").is_dir():
        sources.append((f"measured in {study_dir} (runs done so far)", components_from(study_dir)))
    return format_power(power_table(planned_comparisons(study, runs), sources))


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = Parser(prog="postlab", description="Post-train small language models and study the recipes.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--version", action="version", version=f"postlab {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)

    def data_arg(q):
        q.add_argument("--data", dest="data_root", metavar="DIR",
                       help="the folder of the tasks' default data (quora/, sonnets/); default: $POSTLAB_DATA, "
                            "else ../shared/data beside the checkout")

    def quiet_arg(q):
        q.add_argument("--no-progress", action="store_true",
                       help="no progress bars (they are off anyway when standard error is not a terminal)")

    t = sub.add_parser("train", help="train a run (one or more stages) from a YAML config")
    t.add_argument("config")
    t.add_argument("overrides", nargs="*", help="key=value, e.g. optim.lr=1e-4 task.train_limit=200")
    t.add_argument("--resume", action="store_true", help="continue a stopped run in its output_dir")
    t.add_argument("--output-dir", help="where the run writes (overrides the config's output_dir)")
    t.add_argument("--dry-run", action="store_true",
                   help="print the config as the run would use it, every default filled in, and stop")
    data_arg(t)
    quiet_arg(t)
    t.set_defaults(fn=cmd_train)

    ls = sub.add_parser("list", help="what a config can name: tasks, objectives or parameterizations, with their options")
    ls.add_argument("what", choices=["tasks", "objectives", "parameterizations"])
    ls.set_defaults(fn=cmd_list)

    def model_args(q):
        q.add_argument("checkpoint", help="embedded name (smollm2-135m), model dir, adapter dir, or hub id")
        q.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cpu, cuda, cuda:N")
        q.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                       help="auto: bf16 where the hardware has fast bf16, else fp32")
        quiet_arg(q)

    e = sub.add_parser("eval", help="evaluate a checkpoint on a task's dev set")
    model_args(e)
    data_arg(e)
    e.add_argument("--task", required=True, type=task_name, help="a task (postlab list tasks)")
    e.add_argument("--dev")
    e.add_argument("--dev-reference")
    e.add_argument("--dev-limit", type=like(TaskConfig, "dev_limit"))
    e.add_argument("--max-length", type=like(ModelConfig, "max_length"))
    e.add_argument("--batch-size", type=like(StageConfig, "eval_batch_size"), default=16)
    e.add_argument("--out", type=location, help="directory for predictions / generated text")
    e.add_argument("--reference", help="also report implicit-reward accuracy/margin on the dev pairs against this model")
    e.add_argument("--beta", type=number(float, gt=0), default=0.1, help="β of the implicit reward (with --reference)")
    e.set_defaults(fn=cmd_eval)

    g = sub.add_parser("generate", help="sample continuations of prompts")
    model_args(g)
    g.add_argument("--prompt", action="append")
    g.add_argument("--prompt-file", help="prompts separated by blank lines")
    g.add_argument("--max-new-tokens", type=like(GenerationConfig, "max_new_tokens"), default=128)
    g.add_argument("--temperature", type=like(GenerationConfig, "temperature"), default=1.0)
    g.add_argument("--top-p", type=like(GenerationConfig, "top_p"), default=0.9)
    g.add_argument("--greedy", action="store_true")
    g.add_argument("--seed", type=like(GenerationConfig, "seed"), default=0)
    g.set_defaults(fn=cmd_generate)

    x = sub.add_parser("export", help="write a Hugging Face checkpoint (an adapter merged into its base with --merge)")
    x.add_argument("checkpoint")
    x.add_argument("--out", type=location, required=True)
    x.add_argument("--merge", action="store_true")
    x.set_defaults(fn=cmd_export)

    dg = sub.add_parser("diagnose", help="implicit rewards, reward accuracy/margin, KL to the reference, Q-view plot")
    model_args(dg)
    dg.add_argument("--reference", required=True, help="the reference model (e.g. the stage's starting checkpoint)")
    dg.add_argument("--pairs", help="a prompt/chosen/rejected file (JSONL/CSV/Parquet) or hub dataset id")
    dg.add_argument("--task", type=task_name, help="or: a task whose dev pairs to use (paraphrase)")
    data_arg(dg)
    dg.add_argument("--dev", help="with --task: its dev file")
    dg.add_argument("--limit", type=number(int, gt=0), help="only the first N pairs")
    dg.add_argument("--beta", type=number(float, gt=0), default=0.1, help="β of the implicit reward")
    dg.add_argument("--examples", type=number(int, ge=0), default=4, help="examples in the Q-view plot")
    dg.add_argument("--batch-size", type=number(int, gt=0), default=16)
    dg.add_argument("--out", type=location, help="output directory (default CHECKPOINT/diagnose)")
    dg.set_defaults(fn=cmd_diagnose)

    pr = sub.add_parser("prune", help="remove whole decoder layers (uniform or ShortGPT block influence) -> an HF checkpoint")
    pr.add_argument("checkpoint")
    pr.add_argument("--drop", type=number(float, gt=0, lt=1), default=0.2, help="fraction of decoder layers to remove")
    pr.add_argument("--method", default="block-influence", choices=["uniform", "block-influence"])
    pr.add_argument("--task", type=task_name, help="calibration texts: this task's training examples (block-influence)")
    data_arg(pr)
    quiet_arg(pr)
    pr.add_argument("--prompt-file", help="or calibration texts separated by blank lines")
    pr.add_argument("--samples", type=number(int, gt=0), default=64, help="calibration texts used")
    pr.add_argument("--device", default="auto")
    pr.add_argument("--out", type=location, required=True)
    pr.set_defaults(fn=cmd_prune)

    ds = sub.add_parser("distill", help="teacher->student distillation data")
    dss = ds.add_subparsers(dest="distill_command", required=True)
    q = dss.add_parser("sample", help="teacher and student responses -> dsft.jsonl and pairs.jsonl (cached, seeded)")
    q.add_argument("--teacher", required=True)
    q.add_argument("--student", required=True)
    q.add_argument("--task", type=task_name, help="prompts: this task's training prompts (or dev prompts with --split dev)")
    data_arg(q)
    quiet_arg(q)
    q.add_argument("--split", default="train", choices=["train", "dev"], help="with --task: which prompts")
    q.add_argument("--prompt-file", help="or prompts separated by blank lines")
    q.add_argument("--limit", type=number(int, gt=0), help="only the first N prompts")
    q.add_argument("--max-new-tokens", type=like(GenerationConfig, "max_new_tokens"), default=128)
    q.add_argument("--temperature", type=like(GenerationConfig, "temperature"), default=1.0)
    q.add_argument("--top-p", type=like(GenerationConfig, "top_p"), default=0.9)
    q.add_argument("--greedy", action="store_true")
    q.add_argument("--seed", type=like(GenerationConfig, "seed"), default=0)
    q.add_argument("--device", default="auto")
    q.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    q.add_argument("--out", type=location, required=True, help="directory for dsft.jsonl, pairs.jsonl, samples.json")
    ds.set_defaults(fn=cmd_distill)

    mg = sub.add_parser("merge", help="weight-space tools: model soups and ExPO extrapolation -> an HF checkpoint")
    ms = mg.add_subparsers(dest="merge_command", required=True)
    q = ms.add_parser("soup", help="(weighted) average of checkpoints of the same base; adapters are merged first")
    q.add_argument("checkpoints", nargs="+")
    q.add_argument("--weights", type=number(float, ge=0, allow_inf_nan=False), nargs="+",
                   help="one per checkpoint (normalized to sum 1); default uniform")
    q.add_argument("--out", type=location, required=True)
    q = ms.add_parser("expo", help="ExPO: θ = θ_sft + λ(θ_dpo − θ_sft)")
    q.add_argument("--sft", required=True, help="the SFT checkpoint (ExPO's starting point)")
    q.add_argument("--dpo", required=True, help="the aligned checkpoint trained from it")
    q.add_argument("--lam", type=number(float, allow_inf_nan=False), required=True, help="λ: 0 = SFT, 1 = DPO, >1 extrapolates")
    q.add_argument("--out", type=location, required=True)
    mg.set_defaults(fn=cmd_merge)

    d = sub.add_parser("demo", help="the main job: studies/demo.yaml (FFT vs LoRA, 3 seeds) on the embedded model "
                                    "and the shared data")
    data_arg(d)
    quiet_arg(d)
    d.add_argument("--study", default=None, help="another study file to run the same way (default studies/demo.yaml)")
    d.add_argument("--study-dir", default=None, help="where the study's runs and report go (default runs/demo)")
    d.set_defaults(fn=cmd_demo)

    st = sub.add_parser("study", help="plan, run and report a study: a grid of runs (studies/*.yaml)")
    ss = st.add_subparsers(dest="study_command", required=True)
    for name, text in (("plan", "list the runs and estimate their cost; trains nothing"),
                       ("run", "run every run (skipping complete ones, resuming interrupted ones), then report")):
        q = ss.add_parser(name, help=text)
        q.add_argument("file", help="a study file, e.g. studies/quick.yaml")
        q.add_argument("--shard", help="i/n: only the runs at plan index i mod n (0 <= i < n)")
        q.add_argument("--output-dir", help="the study directory (default: the study's output_dir, else runs/<file stem>)")
        data_arg(q)
        q.set_defaults(fn=cmd_study)
    ss.choices["plan"].add_argument("--measure", action="store_true",
                                    help="time a few training steps of the configured model here for the estimate")
    ss.choices["plan"].add_argument("--json", action="store_true", help="print the runs and their full configs as JSON")
    ss.choices["plan"].add_argument("--variance-from", metavar="DIR",
                                    help="a study directory whose measured variances size this study's power "
                                         "(default: runs of this study already done, else the tasks' stated defaults)")
    quiet_arg(ss.choices["run"])
    ss.choices["run"].add_argument("--workers", type=number(int, ge=1), default=1,
                                   help="runs side by side in N processes (one GPU each, or the CPU cores split)")
    ss.choices["run"].add_argument("--executor", choices=["local", "ray"], default="local",
                                   help="ray: each run a Ray task over the cluster ray.init() finds (pip install 'postlab[ray]')")
    ss.choices["run"].add_argument("--gpus-per-run", type=number(float, ge=0), default=0.0, help="with --executor ray")
    q = ss.add_parser("report", help="write <dir>/report/report.md with tables, plots and paired comparisons")
    q.add_argument("dir", help="a study directory (holding runs/)")
    q.add_argument("--out", type=location, help="output directory (default <dir>/report)")
    q.add_argument("--alpha", type=number(float, gt=0, lt=1), default=0.05)
    q.set_defaults(fn=cmd_study)
    q = ss.add_parser("export", help="copy a study's complete runs without their weights (a results folder to "
                                     "commit; a study run on another machine skips the runs in a copy of it)")
    q.add_argument("dir", help="a study directory (holding runs/)")
    q.add_argument("--out", type=location, required=True, help="the folder to copy into (created if absent)")
    q.set_defaults(fn=cmd_study)
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except ConfigError as e:  # a usage error: reported like every other bad input
        print(f"error: {e}", file=sys.stderr)
        return 2
    _setup_logging(args.verbose)
    if getattr(args, "no_progress", False):
        from .progress import disable

        disable()
    try:
        _use_data(args)
        return args.fn(args)
    except PostlabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun with --resume to continue from the last checkpoint", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into a reader that stopped early (| head)
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
