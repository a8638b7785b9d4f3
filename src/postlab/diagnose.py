"""Implicit-reward diagnostics of a checkpoint against its reference, on preference pairs.

Reads the policy as the implicit reward model r(x, y) = β·log πθ(y|x)/πref(y|x) (arXiv 2507.00018):
per-pair rewards, reward accuracy and margin; the KL(π‖πref) of the next-token distributions at the
data's completion positions (exact, over the full vocabulary); and the logits-as-Q view, in which
β·log π(y_t|s_t) = Q(s_t, y_t) − V(s_t), so its running sum over a completion is the sequence's
β·log π(y|x): plotted per token for a few examples.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from . import distributed as dist
from .checkpoint import atomic_write_bytes, atomic_write_json, atomic_write_text, replace_dir
from .data import Pair, score_batch, tokenize
from .decoder import decoder_and_head
from .logprobs import cached_token_logps, decoder_hidden, token_logps
from .metrics import AGAINST_REFERENCE, AGAINST_REFERENCE_SPECS, PerExample, write_per_example
from .models import LM
from .objectives import implicit_reward

if TYPE_CHECKING:
    from .config import RunConfig


@torch.no_grad()
def position_kl(policy: LM, reference: LM, items: list, batch_size: int) -> tuple[list[float], list[int]]:
    """Per item: KL(π(·|s)‖πref(·|s)) summed over the distinct contexts s that predict its chosen
    (first-completion) tokens, and the number of those contexts: the full next-token distributions
    of both models, a chunk at a time. Kept per pair so that a study can test the mean KL per token
    example by example (Σ sums / Σ counts over any subset of pairs)."""
    sums = torch.zeros(len(items), dtype=torch.float64)
    counts = torch.zeros(len(items), dtype=torch.long)
    pad = policy.tokenizer.pad_token_id
    for m in (policy, reference):
        m.model.eval()
    for s in range(0, len(items), batch_size):
        chunk = items[s:s + batch_size]
        batch = score_batch(chunk, pad).to(policy.device)
        chosen = batch.entry_answer < len(chunk)  # answers [0, B) are the chosen ones (score_batch)
        rows, where = batch.entry_hidden[chosen].unique(return_inverse=True)
        # each context predicts a token of one chosen answer (a shared first position is shared with the
        # rejected answer only): its pair is that answer's index
        owner = torch.empty_like(rows).scatter_(0, where, batch.entry_answer[chosen]).cpu() + s
        logps = []
        for m in (policy, reference):
            body, head = decoder_and_head(m.model)
            with m.autocast():
                h = decoder_hidden(body, batch)
            h = h.reshape(-1, h.shape[-1]).index_select(0, batch.hidden_index[rows])
            logps.append(torch.cat([torch.log_softmax(head(h[c:c + 256]).float(), -1) for c in range(0, len(h), 256)]))
        p, q = logps
        sums.index_add_(0, owner, (p.exp() * (p - q)).sum(-1).double().cpu())
        counts.index_add_(0, owner, torch.ones_like(owner))
    return sums.tolist(), counts.tolist()


def _reward_rows(policy: LM, reference: LM, items: list, beta: float, batch_size: int) -> tuple[list[dict], list, list]:
    """Per pair: implicit rewards of the chosen and rejected answers, margin, whether it ranks them
    right, and the log-probs behind them; with the per-token log-probs (policy, reference)."""
    pol = token_logps(policy, items, batch_size, desc="policy log-probs")
    ref = cached_token_logps(reference, items, "reference", batch_size)
    rows = []
    for it, p, r in zip(items, pol, ref):
        rc, rr = (implicit_reward(float(p[k].sum()), float(r[k].sum()), beta) for k in (0, 1))
        rows.append({"id": it.id, "reward_chosen": rc, "reward_rejected": rr, "margin": rc - rr, "correct": rc > rr,
                     "logp_chosen": float(p[0].sum()), "logp_rejected": float(p[1].sum()),
                     "ref_logp_chosen": float(r[0].sum()), "ref_logp_rejected": float(r[1].sum())})
    return rows, pol, ref


def against_reference(policy: LM, reference: LM, pairs: list[Pair], beta: float, batch_size: int = 16,
                      append_eos: bool = True, out_dir: Path | None = None) -> dict[str, float]:
    """A trained model read against its reference on held-out pairs (a stage's `against_reference`):
    implicit-reward accuracy and mean margin, and the mean KL(π‖πref) per chosen-answer token. With
    `out_dir`, each pair's statistics too (per_example.jsonl, postlab.metrics.AGAINST_REFERENCE_SPECS),
    from which the metrics are computed, so a study report tests them example by example."""
    items, _ = tokenize(pairs, policy.tokenizer, policy.max_length, "truncate", append_eos=append_eos, source="pairs")
    rows, _, _ = _reward_rows(policy, reference, items, beta, batch_size)
    kl, contexts = position_kl(policy, reference, items, batch_size)
    records = [{"id": r["id"], "score": r["margin"],
                "stats": {"ref_reward_accuracy": [float(r["correct"]), 1.0], "ref_reward_margin": [r["margin"], 1.0],
                          "ref_kl": [k, float(c)]}} for r, k, c in zip(rows, kl, contexts)]
    per_pair = PerExample([str(r["id"]) for r in records],
                          {m: np.array([r["stats"][m] for r in records]) for m in AGAINST_REFERENCE_SPECS},
                          AGAINST_REFERENCE_SPECS)
    if out_dir is not None:
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        write_per_example(tmp, records, AGAINST_REFERENCE_SPECS)
        replace_dir(tmp, out_dir)  # whole or absent: the report never reads a torn file
    return {**{m: per_pair.value(m) for m in AGAINST_REFERENCE_SPECS}, "ref_pairs": float(len(rows))}


def stage_against_reference(lm: LM, cfg: RunConfig, i: int, sdir: Path, task) -> dict[str, float]:
    """A stage's `against_reference` metrics: its final model against the stage's reference (loaded from
    disk: the previous stage's model, or the base model) on held-out pairs (postlab.diagnose)."""
    from .cache import location
    from .models import load_lm
    from .preferences import build_pairs, needs_sampler
    from .tasks import get_task

    stage, m = cfg.stages[i], cfg.model
    start = str(sdir.parent / f"{i - 1}-{cfg.stages[i - 1].name}" / "model") if i > 0 else m.name

    def loaded(name: str) -> LM:
        return load_lm(name, m.device, m.precision, m.trust_remote_code, m.max_length)

    reference = loaded(start if stage.reference == "stage-start" else m.name)
    sampler = None
    if needs_sampler(task):  # held-out pairs sampled as the training pairs are
        src = stage.task.pairs.rejected_from
        name = {"stage-start": start, "base": m.name}.get(src, src)
        sampler = reference if name == reference.source or (name == start and stage.reference == "stage-start") \
            else loaded(name)
    limit = stage.against_reference_examples
    if limit:  # only the first N held-out examples: fewer pairs to sample where they are sampled
        task = get_task(stage.task.model_copy(update={"dev_limit": min(limit, stage.task.dev_limit or limit)}))
    pairs = build_pairs(task, stage.task.pairs, sampler, location("samples"), split="dev")[:limit]
    beta = getattr(stage.objective.typed_args, "beta", 0.1)
    return against_reference(lm, reference, pairs, beta, stage.eval_batch_size, task.append_eos,
                             sdir / AGAINST_REFERENCE if dist.is_main() else None)


def diagnose(policy: LM, reference: LM, pairs: list[Pair], beta: float, out_dir: Path, batch_size: int = 16,
             append_eos: bool = True, n_plot: int = 4) -> dict:
    """Write per_example.jsonl, summary.json and q_view.png to `out_dir`; return the summary."""
    items, report = tokenize(pairs, policy.tokenizer, policy.max_length, "truncate", append_eos=append_eos,
                             source="pairs")
    rows, pol, ref = _reward_rows(policy, reference, items, beta, batch_size)
    kl, contexts = position_kl(policy, reference, items, batch_size)
    for r, k, c in zip(rows, kl, contexts):
        r.update(kl_sum=k, kl_contexts=c)
    margins = [r["margin"] for r in rows]
    summary = {"pairs": len(rows), "beta": beta,
               "reward_accuracy": sum(r["correct"] for r in rows) / len(rows),
               "reward_margin": sum(margins) / len(rows),
               "reward_chosen": sum(r["reward_chosen"] for r in rows) / len(rows),
               "reward_rejected": sum(r["reward_rejected"] for r in rows) / len(rows),
               "kl_per_token": sum(kl) / max(sum(contexts), 1), "kl_contexts": sum(contexts),
               "logratio_chosen_per_pair": sum(r["reward_chosen"] for r in rows) / len(rows) / beta,
               "truncated_prompts": report.truncated}
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "per_example.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    atomic_write_json(out_dir / "summary.json", summary)
    plot_q_view(policy, items[:n_plot], pol[:n_plot], ref[:n_plot], beta, out_dir / "q_view.png")
    return summary


def plot_q_view(lm: LM, items: list, pol: list, ref: list, beta: float, path: Path) -> None:
    """Per example (a row): the chosen and rejected completions' per-token β·log π (bars: Q − V) with
    its running sum (line: β·log π of the prefix), and the running implicit reward β·log π/πref."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(items)
    fig, axes = plt.subplots(n, 2, figsize=(12, 2.6 * n), squeeze=False)
    for i, (it, p, r) in enumerate(zip(items, pol, ref)):
        for k, which in enumerate(("chosen", "rejected")):
            ax = axes[i][k]
            q = beta * p[k]
            x = range(len(q))
            ax.bar(x, q.tolist(), color="tab:blue", alpha=0.5, label="β·log π(y_t|s_t) = Q − V")
            ax.plot(x, q.cumsum(0).tolist(), color="tab:blue", label="running sum")
            ax.plot(x, (beta * (p[k] - r[k])).cumsum(0).tolist(), color="tab:red", label="running β·log π/πref")
            toks = [lm.tokenizer.decode([t]) for t in it.completions[k]]
            if len(toks) <= 24:
                ax.set_xticks(list(x), [t.replace("\n", "⏎")[:8] for t in toks], rotation=60, fontsize=7)
            ax.set_title(f"{it.id} {which}", fontsize=9)
            ax.axhline(0, color="grey", lw=0.5)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    from .report.plots import png_bytes

    atomic_write_bytes(path, png_bytes(fig, dpi=110))
    plt.close(fig)


def format_summary(s: dict) -> str:
    return (f"{s['pairs']} pairs, β={s['beta']}: reward accuracy {s['reward_accuracy']:.4f}, margin "
            f"{s['reward_margin']:.4f} (chosen {s['reward_chosen']:.4f}, rejected {s['reward_rejected']:.4f}); "
            f"KL(π‖πref) {s['kl_per_token']:.4f} nats per token over {s['kl_contexts']} contexts"
            + ("" if math.isfinite(s["kl_per_token"]) else " (not finite!)"))
