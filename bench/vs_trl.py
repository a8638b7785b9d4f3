"""postlab vs TRL on the same model, data, batch size, precision and optimizer settings.

Each measurement runs in a fresh subprocess (so peak resident memory is that run's own), TRL and
postlab interleaved per repeat (so drift in machine load hits both alike). Prints one table of
medians and writes bench/results/vs_trl.json.

    .venv/bin/python bench/vs_trl.py                       # all four cases, 3 repeats
    .venv/bin/python bench/vs_trl.py --cases sft-paraphrase --n 64 --repeats 3
    .venv/bin/python bench/vs_trl.py --isa avx2 ...                   # both tools as on an AVX2-only CPU
    .venv/bin/python bench/vs_trl.py --warm ...                       # after one untimed run in each process
    python bench/vs_trl.py --device cuda --precision bf16 ...         # both tools on the GPU (bench/gpu/)

Equal work: one epoch over the same examples; AdamW (lr, betas, eps, no weight decay), linear decay
without warmup, gradient clipping at 1.0; fp32 unless --precision bf16; TRL without gradient
checkpointing (its default, which would slow it down for no memory we need); SFT loss over the
completion tokens only, completions ending with EOS (TRL's convention, so both learn the same
tokens); DPO sigmoid loss with beta 0.1 against the initial model. TRL's DPO computes the reference
forward every step with a second model in memory (its default); postlab's time includes its one
reference pass before training. Losses are the mean of the per-step training losses.

Same order, same saving: both see the same micro-batches in the same order (postlab's first-epoch
length-grouped batches; TRL reads the data in that order with a sequential sampler), and both write
one checkpoint at the end of the epoch, each as it does by default: TRL's save_strategy "epoch" writes
the weights with the optimizer, scheduler and RNG state; postlab's end-of-stage checkpoint writes the
weights with the scheduler and RNG state but no optimizer state (a finished stage is never resumed).
The time of that save is measured in each tool and reported apart, so the table has both: training
with the save, and training alone (the like-for-like figure).

Each process is fresh, so the timed run includes its first touch of memory (gradients, optimizer
state, activations), a large share of a 4-step stage. With `--warm` each process first trains the
same thing once untimed (then drops it and loads the model afresh for the timed run): the steps are
timed as a longer run's later ones are; peak RSS is then the process's over both.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

CASES = {  # name -> (task, kind, default examples, default batch)
    "sft-paraphrase": ("paraphrase", "sft", 128, 16),
    "dpo-paraphrase": ("paraphrase", "dpo", 128, 16),
    "sft-sonnets": ("sonnets", "sft", 48, 8),
    "dpo-sonnets": ("sonnets", "dpo", 48, 8),
}
LR = {"sft": 2e-5, "dpo": 5e-6}


def postlab_order(raw: list, batch: int) -> list:
    """`raw` in the order postlab's first epoch reads it (seed 0, length-grouped micro-batches)."""
    from postlab.data import length_grouped_batches, tokenize
    from postlab.models import load_tokenizer, resolve_model_path

    if len(raw) % batch:
        raise SystemExit(f"--n {len(raw)} is not a multiple of the batch {batch}: the two tools' batches would differ")
    items, _ = tokenize(raw, load_tokenizer(resolve_model_path("smollm2-135m")), 8192, append_eos=True)
    return [raw[i] for b in length_grouped_batches([it.length for it in items], batch, 0, True) for i in b]


def trl_worker(case: str, n: int, batch: int, precision: str, data: str, device: str) -> dict:
    import torch
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    from common import case_data, peak_rss_mb
    from postlab.models import resolve_model_path

    task, kind, _, _ = CASES[case]
    raw = postlab_order(case_data(task, kind, n, data), batch)
    path = resolve_model_path("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    common = dict(per_device_train_batch_size=batch, num_train_epochs=1, learning_rate=LR[kind],
                  lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
                  adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, logging_steps=1, save_strategy="epoch",
                  report_to="none", use_cpu=device == "cpu", bf16=precision == "bf16", gradient_checkpointing=False,
                  dataloader_num_workers=0, seed=0, max_length=None, disable_tqdm=True)
    with tempfile.TemporaryDirectory() as d:
        if kind == "sft":
            ds = Dataset.from_list([{"prompt": e.prompt, "completion": e.completion} for e in raw])
            trainer = SFTTrainer(model=model, args=SFTConfig(output_dir=d, completion_only_loss=True, **common),
                                 train_dataset=ds, processing_class=tok)
        else:
            ds = Dataset.from_list([{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in raw])
            trainer = DPOTrainer(model=model, args=DPOConfig(output_dir=d, beta=0.1, loss_type=["sigmoid"], **common),
                                 train_dataset=ds, processing_class=tok)
        trainer._get_train_sampler = lambda *args, **kw: SequentialSampler(trainer.train_dataset)
        save_s = timed(trainer, "_save_checkpoint")
        t0 = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - t0
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"seconds": seconds, "save_s": sum(save_s), "saves": len(save_s), "losses": losses, "examples": len(raw),
            "steps": trainer.state.global_step, "peak_rss_mb": peak_rss_mb(), **device_memory(device)}


def timed(owner, name: str) -> list[float]:
    """Wrap `owner.name` so each call's seconds are appended to the returned list."""
    calls, fn = [], getattr(owner, name)

    def wrapper(*args, **kw):
        t = time.perf_counter()
        try:
            return fn(*args, **kw)
        finally:
            calls.append(time.perf_counter() - t)
    setattr(owner, name, wrapper)
    return calls


def postlab_worker(case: str, n: int, batch: int, precision: str, data: str, device: str) -> dict:
    import postlab.train
    from common import case_data, peak_rss_mb, postlab_stage
    from postlab.models import load_lm

    task, kind, _, _ = CASES[case]
    raw = case_data(task, kind, n, data)
    lm = load_lm("smollm2-135m", device=device, precision=precision)
    save_s = timed(postlab.train, "_save")
    out = postlab_stage(lm, "nll" if kind == "sft" else "dpo", raw, batch, LR[kind], append_eos=True)
    return {**out, "save_s": sum(save_s), "saves": len(save_s), "peak_rss_mb": peak_rss_mb(), **device_memory(device)}


def device_memory(device: str) -> dict:
    """Peak memory the GPU's caching allocator handed out in this process (nothing on the CPU)."""
    import torch

    if device == "cpu":
        return {}
    return {"peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20}


def measure(framework: str, case: str, n: int, batch: int, precision: str, data: str, warm: bool, device: str) -> dict:
    """One run in a fresh interpreter; returns its JSON result."""
    from workers import run_worker

    return run_worker(__file__, ["--worker", framework, "--cases", case, "--n", str(n), "--batch", str(batch),
                                 "--precision", precision, "--data", data, "--device", device,
                                 *(["--warm"] if warm else [])],
                      f"{framework} {case}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--n", type=int, default=None, help="examples (or pairs) per run; default per case")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--out", default="bench/results/vs_trl.json")
    ap.add_argument("--isa", choices=["avx2"], help="run both tools as on an AVX2-only CPU (see workers.ISA_LIMITS)")
    ap.add_argument("--warm", action="store_true",
                    help="each process trains once untimed, then the timed run with the model loaded afresh")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="where both tools train (cuda: the first visible GPU; TRL as its Trainer places it)")
    ap.add_argument("--worker", choices=["trl", "postlab"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    cases = a.cases.split(",")
    if a.worker:
        case = cases[0]
        n, b = a.n or CASES[case][2], a.batch or CASES[case][3]
        fn = trl_worker if a.worker == "trl" else postlab_worker
        import gc

        import torch

        if a.warm:  # the same training once, untimed, in this process: what a long run's later steps see
            fn(case, n, b, a.precision, a.data, a.device)
            gc.collect()
            if a.device == "cuda":  # the timed run's peak memory is its own
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()

        print(json.dumps({**fn(case, n, b, a.precision, a.data, a.device), "cpu_capability": torch.backends.cpu.get_cpu_capability()}))
        return

    import torch

    from postlab.run import cpu_name
    from workers import limit_isa

    isa_env = limit_isa(a.isa)

    results = {}
    for case in cases:
        n, b = a.n or CASES[case][2], a.batch or CASES[case][3]
        runs = {"trl": [], "postlab": []}
        for r in range(a.repeats):
            for fw in runs:
                runs[fw].append(measure(fw, case, n, b, a.precision, a.data, a.warm, a.device))
                m = runs[fw][-1]
                print(f"{case} repeat {r}: {fw:8s} {m['seconds']:7.1f}s  mean loss {statistics.mean(m['losses']):.4f}"
                      f"  peak RSS {m['peak_rss_mb']:.0f} MB"
                      + (f"  peak GPU {m['peak_gpu_mb']:.0f} MB" if "peak_gpu_mb" in m else ""), flush=True)
        row = {"n": n, "batch": b, "runs": runs}
        for fw, rs in runs.items():
            s = statistics.median(x["seconds"] for x in rs)
            # Tokens of the data (prompt + each answer, as postlab tokenizes them): the same count for both.
            tokens = runs["postlab"][0]["tokens"]
            s_alone = statistics.median(x["seconds"] - x["save_s"] for x in rs)
            row[fw] = {"median_s": s, "examples_per_s": rs[0]["examples"] / s, "tokens_per_s": tokens / s,
                       "median_s_without_save": s_alone, "examples_per_s_without_save": rs[0]["examples"] / s_alone,
                       "median_save_s": statistics.median(x["save_s"] for x in rs),
                       "mean_loss": statistics.median(statistics.mean(x["losses"]) for x in rs),
                       "final_loss": statistics.median(x["losses"][-1] for x in rs),
                       "peak_rss_mb": statistics.median(x["peak_rss_mb"] for x in rs),
                       **({"peak_gpu_mb": statistics.median(x["peak_gpu_mb"] for x in rs)} if a.device == "cuda" else {})}
        row["speedup"] = row["trl"]["median_s"] / row["postlab"]["median_s"]
        row["speedup_without_save"] = row["trl"]["median_s_without_save"] / row["postlab"]["median_s_without_save"]
        row["paired_speedup_median"] = statistics.median(t["seconds"] / p["seconds"]
                                                         for t, p in zip(runs["trl"], runs["postlab"]))
        results[case] = row
        # written after every case (a run stopped by a time limit keeps the cases it finished)
        meta = {"machine": cpu_name(), "cpus": os.cpu_count(), "device": a.device,
                **({"gpu": torch.cuda.get_device_name(), "torch_cuda": torch.version.cuda} if a.device == "cuda" else {}),
                "threads": torch.get_num_threads(), "torch": torch.__version__, "precision": a.precision,
                "repeats": a.repeats, "command": " ".join(["python"] + sys.argv), "isa_limits": isa_env, "warm": a.warm,
                "complete": len(results) == len(cases),
                "cpu_capability": sorted({x["cpu_capability"] for row in results.values()
                                          for rs in row["runs"].values() for x in rs})}
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(f"\n{'case':16s} {'n':>4s} {'TRL ex/s':>9s} {'ours ex/s':>9s} {'ours/TRL':>8s} {'w/o save':>8s} "
          f"{'TRL save':>8s} {'our save':>8s} {'TRL loss':>8s} {'our loss':>8s} {'TRL RSS':>8s} {'our RSS':>8s}")
    for case, row in results.items():
        t, p = row["trl"], row["postlab"]
        print(f"{case:16s} {row['n']:4d} {t['examples_per_s']:9.2f} {p['examples_per_s']:9.2f} {row['speedup']:7.2f}x "
              f"{row['speedup_without_save']:7.2f}x {t['median_save_s']:7.1f}s {p['median_save_s']:7.1f}s "
              f"{t['mean_loss']:8.4f} {p['mean_loss']:8.4f} {t['peak_rss_mb']:7.0f}M {p['peak_rss_mb']:7.0f}M")
        if "peak_gpu_mb" in p:
            print(f"{'':16s} peak GPU memory: TRL {t['peak_gpu_mb']:.0f} MB, postlab {p['peak_gpu_mb']:.0f} MB")
    print(f"(medians of {a.repeats}; written to {a.out})")


if __name__ == "__main__":
    main()
