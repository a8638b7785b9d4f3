"""SDPA on the CPU: PyTorch's flash kernel against its math kernel, for the embedded model's attention
shape (9 heads of 64), a causal boolean mask as postlab passes, over row lengths and batch sizes.

    .venv/bin/python bench/attention_kernel.py                    # bf16 and fp32, forward+backward and forward
    .venv/bin/python bench/attention_kernel.py --dtypes bf16 --lengths 64,128,192,256
    .venv/bin/python bench/attention_kernel.py --model --dtypes bf16  # + the embedded model, both rules

Times one call (forward, or forward and backward) as the median of `--repeats` after a warm-up, in
this process, with torch's threads. The rule in postlab.decoder.attention_kernel (math for bf16
training forwards below MATH_ATTENTION_BELOW tokens) comes from this table. With `--model`, also the
forward and backward of the embedded model over 64 paraphrase examples (SFT) and pairs (DPO, shared
prompt), in micro-batches of 16, under postlab's rule and with flash always, the two alternating,
with gradients (training) and without (a reference pass).
Writes bench/results/attention_kernel.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from postlab import decoder
from postlab.decoder import MATH_ATTENTION_BELOW
from postlab.run import cpu_name

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def timed(backend: SDPBackend, rows: int, length: int, dtype: torch.dtype, backward: bool, repeats: int,
          heads: int = 9, head_dim: int = 64) -> float:
    """Median seconds of one SDPA call (with its backward when `backward`) under `backend`."""
    q, k, v = (torch.randn(rows, heads, length, head_dim, dtype=dtype, requires_grad=backward) for _ in range(3))
    mask = torch.ones(length, length, dtype=torch.bool).tril()[None, None]
    grad = torch.randn(rows, heads, length, head_dim, dtype=dtype)
    times = []
    for i in range(repeats + 1):  # the first call is a warm-up
        with sdpa_kernel(backend), torch.set_grad_enabled(backward):
            t = time.perf_counter()
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            if backward:
                out.backward(grad)
            if i:
                times.append(time.perf_counter() - t)
    return statistics.median(times)


def model_forward_backward(kind: str, precision: str, repeats: int, data: str) -> dict:
    """Seconds over 64 paraphrase items in micro-batches of 16, per rule -- postlab's (math below
    MATH_ATTENTION_BELOW tokens) and flash always -- of a forward and backward (training) and of a
    no-grad forward (a reference pass); rules alternating, after one warm-up round."""
    from common import case_data
    from postlab.data import score_batch, tokenize
    from postlab.logprobs import score
    from postlab.models import load_lm

    lm = load_lm("smollm2-135m", precision=precision)
    items, _ = tokenize(case_data("paraphrase", kind, 64, data), lm.tokenizer, lm.max_length, append_eos=True)
    batches = [score_batch(items[s:s + 16], lm.tokenizer.pad_token_id) for s in range(0, len(items), 16)]
    times: dict[str, dict[str, list[float]]] = {mode: {"postlab": [], "flash": []} for mode in ("train", "forward")}
    for r in range(repeats + 1):
        for rule, below in (("postlab", MATH_ATTENTION_BELOW), ("flash", 0)):
            decoder.MATH_ATTENTION_BELOW = below
            for mode in ("train", "forward"):
                t = time.perf_counter()
                with torch.set_grad_enabled(mode == "train"):
                    for batch in batches:
                        logps, mask = score(lm, batch)
                        if mode == "train":
                            (logps * mask).sum().backward()
                lm.model.zero_grad(set_to_none=True)
                if r:
                    times[mode][rule].append(time.perf_counter() - t)
    decoder.MATH_ATTENTION_BELOW = MATH_ATTENTION_BELOW
    out = {"row_lengths": [b.input_ids.shape[1] for b in batches]}
    for mode, per_rule in times.items():
        med = {rule: statistics.median(ts) for rule, ts in per_rule.items()}
        out[mode] = {"seconds": per_rule, "median_s": med, "flash_over_postlab": round(med["flash"] / med["postlab"], 3)}
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
                    flash = timed(SDPBackend.FLASH_ATTENTION, rows, length, DTYPES[dname], backward, a.repeats)
                    math = timed(SDPBackend.MATH, rows, length, DTYPES[dname], backward, a.repeats)
                    row[mode] = {"flash_ms": round(flash * 1e3, 2), "math_ms": round(math * 1e3, 2),
                                 "flash_over_math": round(flash / math, 2)}
                results.append(row)
                print(f"{dname} rows {rows:3d} L {length:4d}: fwd+bwd flash {row['train']['flash_ms']:7.1f} ms "
                      f"math {row['train']['math_ms']:7.1f} ms ({row['train']['flash_over_math']:.2f}x); "
                      f"fwd flash/math {row['forward']['flash_over_math']:.2f}x", flush=True)
    model = {}
    if a.model:
        for dname in a.dtypes.split(","):
            for kind in ("sft", "dpo"):
                model[f"{kind}-{dname}"] = got = model_forward_backward(kind, dname, a.repeats, a.data)
                for mode in ("train", "forward"):
                    m = got[mode]
                    print(f"embedded model, {kind} paraphrase {dname} {mode} (rows {got['row_lengths']}): postlab's "
                          f"rule {m['median_s']['postlab']:.2f} s, flash always {m['median_s']['flash']:.2f} s "
                          f"(flash/postlab {m['flash_over_postlab']:.2f}x)", flush=True)
    meta = {"machine": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "repeats": a.repeats, "math_attention_below": MATH_ATTENTION_BELOW,
            "command": "python bench/attention_kernel.py" + "".join(
                f" --{k}" if v is True else f" --{k} {v}" for k, v in vars(a).items() if v != ap.get_default(k))}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"meta": meta, "results": results, "model": model}, indent=2))
    print(f"written to {a.out}")


if __name__ == "__main__":
    main()
