"""Packed SFT (`optim.packing`) against unpacked, on the same examples: the padding tokens each layout runs
through the model over one epoch of the whole training set, and tokens/s of SFT steps (forward, backward,
AdamW) on the embedded model, the layouts interleaved repeat by repeat in one process (medians).

    OMP_NUM_THREADS=1 .venv/bin/python bench/packing.py --batches 3 --repeats 3 --out bench/results/packing_fp32_avx512bf16.json

Layouts (`optim.batch_size` examples a step either way; only the rows differ):
  grouped         unpacked, length-grouped batches (postlab's default, `group_by_length: true`)
  random          unpacked, batches in random order (`group_by_length: false`: what packing is usually set against)
  packed          random batches packed into rows as long as each forward's longest example
  packed-<L>      random batches packed into rows of L tokens (`optim.packing_length`; TRL packs to max_length)
Cases: sonnets (the 131 training sonnets, whole continuations), sonnets-cut64 (continuations cut to 64 tokens,
as studies cut them), paraphrase (`--paraphrase-n` training pairs, SFT on the label word). Padding is counted
over one epoch of all of a case's examples. Steps are timed on a sample of each layout's epoch: `--batches`
of its batches, evenly spaced in its order (an epoch's own mix of lengths and padding: a subset of examples
would not group as the whole data does). Tokens/s counts real tokens (prompt + completion). A packed layout
that packs none of its timed batches runs the random layout's rows and is not timed again.
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

CASES = {"sonnets": ("sonnets", None, 8), "sonnets-cut64": ("sonnets", 64, 8), "paraphrase": ("paraphrase", None, 16)}


def layouts(packing_length: int) -> dict[str, dict]:
    return {"grouped": {"group_by_length": True}, "random": {"group_by_length": False},
            "packed": {"group_by_length": False, "optim": {"packing": True}},
            f"packed-{packing_length}": {"group_by_length": False,
                                         "optim": {"packing": True, "packing_length": packing_length}}}


def plan_of(items, batch: int, layout: dict, where: Path):
    from postlab.config import StageConfig
    from postlab.stage import StageInputs, StagePlan

    cfg = StageConfig(task={"name": "file"}, optim={"batch_size": batch, **layout.get("optim", {})},
                      group_by_length=layout["group_by_length"])
    return StagePlan(cfg, items, where, 0, StageInputs())


def epoch(plan, seed: int = 0) -> list[list[int]]:
    from postlab.data import length_grouped_batches

    return length_grouped_batches([it.length for it in plan.items], plan.cfg.optim.batch_size, seed,
                                  plan.cfg.group_by_length)


def padding(plan, pad: int, batches: list[list[int]] | None = None) -> dict:
    """What one epoch of this layout (or these of its batches) runs through the model: rows, token slots
    (rows x width), real tokens."""
    from postlab.data import score_batch

    rows = slots = real = 0
    o = plan.cfg.optim
    for idx in epoch(plan) if batches is None else batches:
        b = score_batch([plan.items[i] for i in idx], pad, pack=o.packing, pack_length=o.packing_length)
        rows, slots, real = rows + b.input_ids.shape[0], slots + b.input_ids.numel(), real + b.n_tokens
    return {"rows": rows, "slots": slots, "real_tokens": real, "padding_tokens": slots - real}


def sample(plan, k: int) -> list[list[int]]:
    """`k` batches of the layout's epoch, evenly spaced in its order."""
    batches = epoch(plan)
    return [batches[int((i + 0.5) * len(batches) / k)] for i in range(min(k, len(batches)))]


def timed_steps(lm, plan, batches: list[list[int]], opt) -> dict:
    """SFT steps (forward, backward, AdamW) on these batches through the loop's own forward
    (postlab.forward.batch_loss)."""
    from postlab.forward import batch_loss

    t, tokens = time.perf_counter(), 0
    for idx in batches:
        loss, _, n = batch_loss(lm, plan, idx)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += n
    seconds = time.perf_counter() - t
    return {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds}


def case_items(lm, case: str, data: str, paraphrase_n: int):
    from common import case_data
    from postlab.data import tokenize

    task, cut, _ = CASES[case]
    raw = case_data(task, "sft", 131 if task == "sonnets" else paraphrase_n, data)
    items, _ = tokenize(raw, lm.tokenizer, lm.max_length, append_eos=task == "sonnets", max_completion_tokens=cut)
    return items


def run_case(lm, case: str, a, where: Path) -> dict:
    import torch

    items = case_items(lm, case, a.data, a.paraphrase_n)
    batch = CASES[case][2]
    pad = lm.tokenizer.pad_token_id
    arms = layouts(a.packing_length)
    plans = {name: plan_of(items, batch, lay, where) for name, lay in arms.items()}
    counts = {name: padding(plan, pad) for name, plan in plans.items()}
    timed = {name: sample(plan, a.batches) for name, plan in plans.items()}
    timed_counts = {name: padding(plans[name], pad, timed[name]) for name in arms}
    n = sum(map(len, timed["random"]))
    same = {name: "random" for name in arms if name.startswith("packed") and timed_counts[name]["rows"] == n}
    opt = torch.optim.AdamW([p for p in lm.model.parameters() if p.requires_grad], lr=1e-12, fused=True)
    timed_steps(lm, plans["grouped"], timed["grouped"][:1], opt)  # warm-up
    runs: dict[str, list[dict]] = {name: [] for name in arms}
    for r in range(a.repeats):
        for name, plan in plans.items():
            if name not in same:
                runs[name].append(timed_steps(lm, plan, timed[name], opt))
                print(f"{case} repeat {r}: {name:12s} {runs[name][-1]['tokens_per_s']:.1f} tokens/s", flush=True)
    for name, other in same.items():
        runs[name] = runs[other]
    medians = {name: statistics.median(x["tokens_per_s"] for x in rs) for name, rs in runs.items()}
    return {"examples": len(items), "batch": batch, "timed_batches": len(timed["random"]), "padding": counts,
            "timed_padding": timed_counts, "not_timed_same_rows_as": same, "tokens_per_s": medians, "runs": runs,
            "padding_saved": {f"{p} vs {u}": counts[u]["padding_tokens"] - counts[p]["padding_tokens"]
                              for p in arms if p.startswith("packed") for u in ("grouped", "random")},
            "speed_ratio": {f"{p} vs {u}": medians[p] / medians[u]
                            for p in arms if p.startswith("packed") for u in ("grouped", "random")}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--batches", type=int, default=3, help="batches of each layout's epoch whose steps are timed")
    ap.add_argument("--paraphrase-n", type=int, default=1600, help="paraphrase training pairs the padding counts read")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--packing-length", type=int, default=512)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--out", default="bench/results/packing.json")
    a = ap.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")
    sys.path.insert(0, str(Path(__file__).parent))
    import torch

    from postlab.hardware import cpu_name
    from postlab.models import load_lm

    lm = load_lm("smollm2-135m", "cpu", a.precision)
    lm.model.train()
    with tempfile.TemporaryDirectory() as d:
        results = {case: run_case(lm, case, a, Path(d)) for case in a.cases.split(",")}
    meta = {"cpu": cpu_name(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "precision": lm.precision, "batches": a.batches, "repeats": a.repeats, "packing_length": a.packing_length,
            "paraphrase_n": a.paraphrase_n, "command": " ".join(["python"] + sys.argv)}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    for case, res in results.items():
        print(f"\n{case} ({res['examples']} examples, batch {res['batch']}; tokens/s on {res['timed_batches']} batches "
              f"of each layout's epoch)")
        print(f"{'layout':14s} {'rows':>6s} {'padding':>8s} {'of slots':>8s} {'tokens/s':>9s}")
        for name, c in res["padding"].items():
            print(f"{name:14s} {c['rows']:6d} {c['padding_tokens']:8d} {c['padding_tokens'] / c['slots']:7.1%} "
                  f"{res['tokens_per_s'][name]:9.1f}")
        for k, v in res["speed_ratio"].items():
            print(f"  {k}: tokens/s x{v:.3f}, padding saved {res['padding_saved'][k]}")


if __name__ == "__main__":
    main()
