"""postlab's training step against a plain PyTorch/transformers step doing the same work on the same
batch, and the matmul rate at the model's own shapes against the square-matmul peak.

    .venv/bin/python bench/step_vs_plain.py --precision bf16      # 16 paraphrase SFT rows, 7 steps each

Both steps: forward of the decoder body under the same autocast, the LM head in fp32 at the scored
rows only, mean NLL of the answer tokens, backward, gradient clipping, fused AdamW, zero_grad. postlab's
goes through `postlab.logprobs.score` (its ScoreBatch layout, 4D mask, attention-kernel choice,
chunked head); the plain one calls the Hugging Face body with a 2D padding mask and indexes the
answers' positions by hand. The two alternate step by step in one process (one model, one optimizer:
the weights' values do not change a step's time), after a warm-up step of each; medians.
Writes bench/results/step_vs_plain[_bf16].json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from common import case_data
from mfu import matmul_peak, matmul_rate
from postlab.data import score_batch, tokenize
from postlab.decoder import decoder_and_head
from postlab.logprobs import score
from postlab.models import load_lm
from postlab.run import cpu_name


def shape_rates(d: int, ff: int, rows: int, dtype: torch.dtype) -> dict[str, float]:
    """FLOP/s of the model's projection shapes (rows tokens) in `dtype`: forward and a weight gradient."""
    shapes = {"x@W_up": (rows, d, ff), "x@W_down": (rows, ff, d), "x@W_attn": (rows, d, d),
              "W_grad": (ff, rows, d)}
    return {name: matmul_rate(*shape, dtype) for name, shape in shapes.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    ap.add_argument("--steps", type=int, default=7)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()

    lm = load_lm("smollm2-135m", precision=a.precision)
    model = lm.model
    model.train()
    items, _ = tokenize(case_data("paraphrase", "sft", 400, a.data), lm.tokenizer, lm.max_length, append_eos=True)
    items.sort(key=lambda it: it.length)
    mid = len(items) // 2  # rows of the median length: padding plays no part
    batch = score_batch(items[mid:mid + a.rows], lm.tokenizer.pad_token_id)
    body, head = decoder_and_head(model)
    # the plain step's inputs: right-padded rows, a 2D mask, each answer token's (row, position, target)
    L = batch.input_ids.shape[1]
    pad_mask = torch.zeros(len(batch.ids), L, dtype=torch.long)
    rows, cols, targets = [], [], []
    for r, it in enumerate(items[mid:mid + a.rows]):
        n = len(it.prompt) + len(it.completions[0])
        pad_mask[r, :n] = 1
        for s, tok in enumerate(it.completions[0]):
            rows.append(r), cols.append(len(it.prompt) + s - 1), targets.append(tok)
    rows_t, cols_t, targets_t = torch.tensor(rows), torch.tensor(cols), torch.tensor(targets)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-7, fused=True)

    def finish(loss: torch.Tensor) -> None:
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def postlab_step() -> None:
        logps, mask = score(lm, batch)
        finish(-(logps * mask).sum() / mask.sum())

    def plain_step() -> None:
        with lm.autocast():
            hidden = body(input_ids=batch.input_ids, attention_mask=pad_mask, use_cache=False).last_hidden_state
        with torch.autocast("cpu", enabled=False):
            logits = head(hidden[rows_t, cols_t].float())
        finish(-logits.log_softmax(-1).gather(-1, targets_t[:, None]).mean())

    steps = {"postlab": postlab_step, "plain": plain_step}
    times: dict[str, list[float]] = {k: [] for k in steps}
    for name, fn in steps.items():  # warm-up: optimizer state, first calls of each shape
        fn()
    for _ in range(a.steps):
        for name, fn in steps.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
        print({k: round(v[-1], 3) for k, v in times.items()}, flush=True)

    dtype = torch.bfloat16 if a.precision == "bf16" else torch.float32
    peak = matmul_peak(dtype, n=1024 if a.precision == "bf16" else 2048)
    cfg = model.config
    rates = shape_rates(cfg.hidden_size, cfg.intermediate_size, batch.input_ids.numel(), dtype)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {"machine": cpu_name(), "precision": a.precision, "threads": torch.get_num_threads(),
              "rows": list(batch.input_ids.shape), "tokens": batch.n_tokens, "steps": a.steps,
              "seconds": times, "median_s": med, "postlab_over_plain": med["postlab"] / med["plain"],
              "square_peak_flops_per_s": peak, "shape_flops_per_s": rates,
              "shape_fraction_of_peak": {k: v / peak for k, v in rates.items()}}
    out = Path(a.out or f"bench/results/step_vs_plain{'_bf16' if a.precision == 'bf16' else ''}.json")
    out.write_text(json.dumps(result, indent=2))
    print(f"{a.precision}, rows {list(batch.input_ids.shape)}: postlab {med['postlab']:.3f} s, plain "
          f"{med['plain']:.3f} s a step (median of {a.steps}) = {med['postlab'] / med['plain']:.3f}x")
    print(f"square {'1024' if a.precision == 'bf16' else '2048'}³ peak {peak / 1e9:.0f} GFLOP/s; the model's shapes: "
          + ", ".join(f"{k} {v / 1e9:.0f} ({100 * v / peak:.0f}%)" for k, v in rates.items()))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
