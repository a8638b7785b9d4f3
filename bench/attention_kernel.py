"""Attention on the CPU over short rows: postlab's short-rows attention against PyTorch's SDPA kernels
(flash, math), for the embedded model's attention shape (9 query heads of 64 over 3 key/value heads),
a causal boolean mask as postlab passes, over row lengths and batch sizes.

    .venv/bin/python bench/attention_kernel.py                    # bf16 and fp32, forward+backward and forward
    .venv/bin/python bench/attention_kernel.py --dtypes bf16 --lengths 64,128,192,256
    .venv/bin/python bench/attention_kernel.py --model --dtypes bf16  # + the embedded model, three rules

Times one call (forward, or forward and backward) as the median of `--repeats` after a warm-up, in
this process, with torch's threads. Inputs as a Llama layer gives them: under bf16 autocast q and k
in fp32 (rotary embeddings), v in bf16; in fp32 all fp32. The rule in postlab.decoder (short-rows
attention below SHORT_ROWS_BELOW tokens) comes from this table. With `--model`, also the forward and
backward of the embedded model over 64 paraphrase examples (SFT) and pairs (DPO, shared prompt), in
micro-batches of 16, under three rules alternating: postlab's, SDPA's math kernel below
SHORT_ROWS_BELOW in bf16 (postlab 0.1.2's rule) and SDPA always (flash), with gradients (training) and
without (a reference pass). Writes bench/results/attention_kernel.json.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from postlab import decoder
from postlab.decoder import SHORT_ROWS_BELOW, grouped_attention
from postlab.run import cpu_name

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
KERNELS = ("postlab", "math", "flash")


def attend(kernel: str, q, k, v, mask):
    if kernel == "postlab":
        return grouped_attention(q, k, v, mask)
    backend = SDPBackend.MATH if kernel == "math" else SDPBackend.FLASH_ATTENTION
    group = q.shape[1] // k.shape[1]  # keys and values repeated per query head, as transformers does
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)


def timed(kernel: str, rows: int, length: int, dtype: torch.dtype, backward: bool, repeats: int,
          heads: int = 9, kv_heads: int = 3, head_dim: int = 64) -> float:
    """Median seconds of one attention call (with its backward when `backward`) by `kernel`."""
    bf16 = dtype == torch.bfloat16
    q = torch.randn(rows, heads, length, head_dim, requires_grad=backward)
    k, v = (torch.randn(rows, kv_heads, length, head_dim, requires_grad=backward) for _ in range(2))
    v = v.detach().to(dtype).requires_grad_(backward)
    mask = torch.ones(length, length, dtype=torch.bool).tril()[None, None]
    grad = torch.randn(rows, length, heads, head_dim, dtype=dtype)
    times = []
    for i in range(repeats + 1):  # the first call is a warm-up
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16), torch.set_grad_enabled(backward):
            t = time.perf_counter()
            out = attend(kernel, q, k, v, mask)
            if backward:
                out.backward(grad.to(out.dtype))
            if i:
                times.append(time.perf_counter() - t)
    return statistics.median(times)


def rule(name: str, length: int, precision: str):
    """The attention a scoring forward over rows of `length` runs under rule `name`."""
    decoder.SHORT_ROWS_BELOW = SHORT_ROWS_BELOW if name == "postlab" else 0
    if name == "math below" and precision == "bf16" and length < SHORT_ROWS_BELOW:
        return sdpa_kernel(SDPBackend.MATH)
    return contextlib.nullcontext()


def model_forward_backward(kind: str, precision: str, repeats: int, data: str) -> dict:
    """Seconds over 64 paraphrase items in micro-batches of 16, per rule, of a forward and backward
    (training) and of a no-grad forward (a reference pass); rules alternating, after one warm-up round."""
    from common import case_data
    from postlab.data import score_batch, tokenize
    from postlab.logprobs import score
    from postlab.models import load_lm

    lm = load_lm("smollm2-135m", precision=precision)
    items, _ = tokenize(case_data("paraphrase", kind, 64, data), lm.tokenizer, lm.max_length, append_eos=True)
    batches = [score_batch(items[s:s + 16], lm.tokenizer.pad_token_id) for s in range(0, len(items), 16)]
    rules = ("postlab", "math below", "sdpa")
    times: dict[str, dict[str, list[float]]] = {mode: {r: [] for r in rules} for mode in ("train", "forward")}
    for r in range(repeats + 1):
        for name in rules:
            for mode in ("train", "forward"):
                t = time.perf_counter()
                with torch.set_grad_enabled(mode == "train"):
                    for batch in batches:
                        with rule(name, batch.input_ids.shape[1], precision):
                            logps, mask = score(lm, batch)
                        if mode == "train":
                            (logps * mask).sum().backward()
                lm.model.zero_grad(set_to_none=True)
                if r:
                    times[mode][name].append(time.perf_counter() - t)
    decoder.SHORT_ROWS_BELOW = SHORT_ROWS_BELOW
    out = {"row_lengths": [b.input_ids.shape[1] for b in batches]}
    for mode, per_rule in times.items():
        med = {name: statistics.median(ts) for name, ts in per_rule.items()}
        out[mode] = {"seconds": per_rule, "median_s": med,
                     "over_postlab": {name: round(med[name] / med["postlab"], 3) for name in rules[1:]}}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtypes", default="bf16,fp32")
    ap.add_argument("--rows", default="4,16")
    ap.add_argument("--lengths", default="48,96,160,192,256,384")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--model", action="store_true", help="also time the embedded model under both rules")
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--out", default="bench/results/attention_kernel.json")
    a = ap.parse_args()

    results = []
    for dname in a.dtypes.split(","):
        for rows in map(int, a.rows.split(",")):
            for length in map(int, a.lengths.split(",")):
                row = {"dtype": dname, "rows": rows, "length": length}
                for mode, backward in (("train", True), ("forward", False)):
                    row[mode] = {f"{kernel}_ms": round(1e3 * timed(kernel, rows, length, DTYPES[dname], backward,
                                                                   a.repeats), 3) for kernel in KERNELS}
                results.append(row)
                print(f"{dname} rows {rows:3d} L {length:4d}: " + "; ".join(
                    f"{mode} " + " ".join(f"{kern} {row[mode][kern + '_ms']:.2f}" for kern in KERNELS) + " ms"
                    for mode in ("train", "forward")), flush=True)
    model = {}
    if a.model:
        for dname in a.dtypes.split(","):
            for kind in ("sft", "dpo"):
                model[f"{kind}-{dname}"] = got = model_forward_backward(kind, dname, a.repeats, a.data)
                for mode in ("train", "forward"):
                    m = got[mode]
                    print(f"embedded model, {kind} paraphrase {dname} {mode} (rows {got['row_lengths']}): " + ", ".join(
                        f"{name} {s:.2f} s" for name, s in m["median_s"].items()) + " (over postlab: " + ", ".join(
                        f"{name} {x:.2f}x" for name, x in m["over_postlab"].items()) + ")", flush=True)
    meta = {"machine": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "repeats": a.repeats, "short_rows_below": SHORT_ROWS_BELOW,
            "command": "python bench/attention_kernel.py" + "".join(
                f" --{k}" if v is True else f" --{k} {v}" for k, v in vars(a).items() if v != ap.get_default(k))}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"meta": meta, "results": results, "model": model}, indent=2))
    print(f"written to {a.out}")


if __name__ == "__main__":
    main()
