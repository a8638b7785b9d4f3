"""The `postlab` command line."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .commands import (
    cmd_demo,
    cmd_diagnose,
    cmd_distill,
    cmd_eval,
    cmd_export,
    cmd_generate,
    cmd_list,
    cmd_merge,
    cmd_prune,
    cmd_study,
    cmd_train,
    task_name,
)
from .config import GenerationConfig, ModelConfig, StageConfig, TaskConfig
from .errors import ConfigError, PostlabError
from .validate import Parser, like, location, number

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
