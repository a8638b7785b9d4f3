"""Model FLOPs utilisation of postlab's SFT and DPO steps against this machine's measured matmul peak.

    .venv/bin/python bench/mfu.py                 # paraphrase, 96 examples, batch 16, 3 repeats
    python bench/mfu.py --device cuda --precision bf16 --n 512    # on a GPU (bench/gpu/check.sh)

Peak: the median throughput of large square matmuls (fp32 and bf16), measured in the same run with
the same threads, before and after the stages; MFU divides by the higher of the two. Useful FLOPs per trained token: 6·N, N = the decoder's matmul parameters (the
input embedding is a lookup, not a matmul); plus 6·d·V per *scored* token for the LM head (postlab
applies the head only there); reference forwards count 2·N per token (+2·d·V per scored token).
Recomputation, attention scores and padding are not useful work and are not counted.

Two figures per objective: the *stage* (everything from the reference pass to the end-of-stage
checkpoint, as a user waits for it) and the *step* (the training steps after the first, from their
train records' step_s: no reference pass, no first step that creates the optimizer state, no
checkpoint; the head's share of FLOPs per token is the data's scored/forward token ratio).
Writes bench/results/mfu.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from common import case_data, postlab_stage
from postlab.data import tokenize
from postlab.decoder import decoder_and_head
from postlab.models import load_lm
from postlab.run import cpu_name


def matmul_rate(m: int, k: int, n: int, dtype: torch.dtype, repeats: int = 5, device: str = "cpu") -> float:
    """FLOP/s of an [m, k] @ [k, n] matmul in `dtype`, median of `repeats` timed calls after a warm-up."""
    a, b = torch.randn(m, k, dtype=dtype, device=device), torch.randn(k, n, dtype=dtype, device=device)

    def sync():
        if device != "cpu":
            torch.cuda.synchronize()

    a @ b
    sync()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        sync()
        times.append(time.perf_counter() - t)
    return 2 * m * k * n / statistics.median(times)


def matmul_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 5, device: str = "cpu") -> float:
    """FLOP/s of an n×n×n matmul in `dtype`: the peak the MFU figures divide by."""
    return matmul_rate(n, n, n, dtype, repeats, device)


def measure_peaks(when: str, device: str = "cpu") -> dict[str, float]:
    """fp32 and bf16 matmul peaks. bf16 at n=1024 where it is emulated (a 2048³ product takes about a
    minute there); at 2048 with native bf16 (AVX-512 BF16, AMX), where 1024³ is too short to time; on a
    GPU at 8192, 10 repeats (fp32 without TF32, as postlab's fp32 runs)."""
    from postlab.models import cpu_has_fast_bf16

    if device != "cpu":
        peaks = {name: matmul_peak(dtype, n=8192, repeats=10, device=device)
                 for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    else:
        fast = cpu_has_fast_bf16()
        peaks = {"fp32": matmul_peak(torch.float32),
                 "bf16": matmul_peak(torch.bfloat16, n=2048 if fast else 1024, repeats=5 if fast else 3)}
    print(f"matmul peak {when}: fp32 {peaks['fp32'] / 1e9:.1f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.1f} GFLOP/s",
          flush=True)
    return peaks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=96)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--out", default="bench/results/mfu.json")
    a = ap.parse_args()

    peaks = measure_peaks("before the stages", a.device)
    lm = load_lm("smollm2-135m", device=a.device, precision=a.precision)
    body, head = decoder_and_head(lm.model)
    emb = lm.model.get_input_embeddings().weight
    n_matmul = sum(p.numel() for p in body.parameters() if p.dim() == 2 and p is not emb)
    d, vocab = head.weight.shape[1], head.weight.shape[0]
    results = {}
    for kind in ("sft", "dpo"):
        raw = case_data("paraphrase", kind, a.n, a.data)
        items, _ = tokenize(raw, lm.tokenizer, lm.max_length, append_eos=True)
        # Tokens through the decoder (a pair's prompt runs once, both one-token answers share its row)
        # and scored tokens (rows of the head), as postlab lays out its batches.
        from postlab.data import score_batch

        fwd_tokens = scored = 0
        for s in range(0, len(items), a.batch):
            sb = score_batch(items[s:s + a.batch], lm.tokenizer.pad_token_id)
            fwd_tokens += sb.n_tokens
            scored += int(sb.hidden_index.numel())
        train_flops = 6 * n_matmul * fwd_tokens + 6 * d * vocab * scored
        ref_flops = (2 * n_matmul * fwd_tokens + 2 * d * vocab * scored) if kind == "dpo" else 0
        secs, step_rates = [], []
        per_token = 6 * n_matmul + 6 * d * vocab * scored / fwd_tokens  # the training step's, no reference
        for r in range(a.repeats):
            fresh = load_lm("smollm2-135m", device=a.device, precision=a.precision)
            out = postlab_stage(fresh, "nll" if kind == "sft" else "dpo", raw, a.batch, 1e-5, append_eos=True)
            secs.append(out["seconds"])
            recs = sorted(out["train_records"], key=lambda rec: rec["step"])
            steady_tokens = recs[-1]["tokens_seen"] - recs[0]["tokens_seen"]
            steady_s = sum(rec["step_s"] for rec in recs[1:])
            step_rates.append(per_token * steady_tokens / steady_s)
            print(f"{kind} repeat {r}: {out['seconds']:.1f}s; steps 2-{len(recs)}: {steady_s:.1f}s, "
                  f"{step_rates[-1] / 1e9:.1f} useful GFLOP/s", flush=True)
        s = statistics.median(secs)
        achieved = (train_flops + ref_flops) / s
        results[kind] = {"seconds": secs, "median_s": s, "decoder_tokens": fwd_tokens, "scored_tokens": scored,
                         "useful_flops": train_flops + ref_flops, "achieved_flops_per_s": achieved,
                         "step_flops_per_s": step_rates, "step_achieved_flops_per_s": statistics.median(step_rates)}
    after = measure_peaks("after the stages", a.device)
    for kind, r in results.items():  # against the higher of the two measurements: the lower MFU
        for prec in ("fp32", "bf16"):
            peak = max(peaks[prec], after[prec])
            r[f"mfu_vs_{prec}_peak"] = r["achieved_flops_per_s"] / peak
            r[f"step_mfu_vs_{prec}_peak"] = r["step_achieved_flops_per_s"] / peak
    peaks_measured = {"before": peaks, "after": after}
    peaks = {prec: max(peaks[prec], after[prec]) for prec in peaks}
    meta = {"machine": cpu_name(), "cpus": os.cpu_count(), "device": a.device,
            **({"gpu": torch.cuda.get_device_name()} if a.device == "cuda" else {}),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "precision": lm.precision,
            "matmul_params": n_matmul, "d_model": d, "vocab": vocab, "peaks_flops_per_s": peaks,
            "peaks_measured": peaks_measured,
            "n": a.n, "batch": a.batch, "repeats": a.repeats, "command": " ".join(["python"] + sys.argv)}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(f"\nprecision {lm.precision}; peak fp32 {peaks['fp32'] / 1e9:.1f}, bf16 {peaks['bf16'] / 1e9:.1f} GFLOP/s")
    for kind, r in results.items():
        print(f"{kind}: {r['achieved_flops_per_s'] / 1e9:.1f} GFLOP/s useful = {100 * r['mfu_vs_fp32_peak']:.0f}% of "
              f"fp32 peak, {100 * r['mfu_vs_bf16_peak']:.0f}% of bf16 peak (stage, median of {a.repeats}); "
              f"steps after the first: {r['step_achieved_flops_per_s'] / 1e9:.1f} GFLOP/s = "
              f"{100 * r['step_mfu_vs_fp32_peak']:.0f}% of fp32, {100 * r['step_mfu_vs_bf16_peak']:.0f}% of bf16 peak")


if __name__ == "__main__":
    main()
