"""The loop written for a GPU, checked on CPU (tiny models): no host synchronisation inside a step,
no graph breaks in the scoring forward, dropout off where a reference is compared, fp16 training
refused, per-process devices under a launcher."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import run_config, split_step_plan, write_pairs
from postlab.config import parse_run_config
from postlab.data import tokenize
from postlab.errors import ConfigError, ModelError
from postlab.models import load_lm
from postlab.run import run
from postlab.runlog import MetricsLog
from postlab.train import train_stage


class CountSyncs(TorchDispatchMode):
    """Counts reads of a tensor's value by the host (`aten._local_scalar_dense`: .item(), float(t),
    bool(t), int(t)), each a device synchronisation on a GPU."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.n += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("objective", ["nll", "dpo"])
def test_a_training_step_does_not_wait_for_the_device(tiny_llama, tmp_path, precision, objective):
    """4 optimizer steps, each of 2 micro-batches run as 2 forwards (forward_rows), logged once at the
    end: no host read inside the steps (the one read per logged step is a bulk transfer)."""
    lm = load_lm(str(tiny_llama), device="cpu", precision=precision)
    plan = split_step_plan(lm, tmp_path, objective)
    counter = CountSyncs()
    with counter:
        out = train_stage(lm, plan, MetricsLog(tmp_path / "m.jsonl"), lambda step, final: {})
    assert out["steps"] == 4
    assert counter.n <= out["steps"]  # the bound: at most one per optimizer step
    assert counter.n == 0, f"{counter.n} host reads in {out['steps']} steps"


def test_the_scoring_forward_has_no_graph_breaks(tiny_llama):
    from postlab.data import Example, score_batch
    from postlab.logprobs import score

    lm = load_lm(str(tiny_llama), device="cpu", precision="fp32")
    items, _ = tokenize([Example("Count: one", " two three"), Example("Hi", " there")], lm.tokenizer, 64)
    batch = score_batch(items, lm.tokenizer.pad_token_id)
    explained = torch._dynamo.explain(lambda: score(lm, batch)[0].sum())()
    assert explained.graph_break_count == 0, explained.break_reasons


def test_a_compiled_stage_trains_like_an_eager_one(tiny_llama, tmp_path):
    data = write_pairs(tmp_path / "pairs.tsv", 16)
    losses = {}
    for name, backend in (("eager", None), ("compiled", "aot_eager")):
        tree = run_config(tiny_llama, tmp_path / name, data, epochs=1)
        tree["model"]["compile"] = backend
        run(parse_run_config(tree))
        losses[name] = [json.loads(x)["loss"] for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()
                        if '"train"' in x]
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-4, abs=1e-6) and len(losses["eager"]) == 4
    with pytest.raises(ConfigError, match="model.compile with parallel: fsdp"):
        parse_run_config({**run_config(tiny_llama, tmp_path / "x", data), "parallel": "fsdp",
                          "model": {"name": str(tiny_llama), "precision": "fp32", "compile": "inductor"}})


def _first_dpo_loss(model: Path, out: Path, data: Path, precision: str = "fp32", **stage) -> float:
    tree = {"model": {"name": str(model), "device": "cpu", "precision": precision}, "output_dir": str(out),
            "reuse_stages": False,
            "stages": [{"name": "dpo", "task": {"name": "file", "train": str(data)}, "eval_at_start": False,
                        "log_every": 1, "objective": {"name": "dpo", "beta": 0.1}, "max_steps": 1,
                        "optim": {"lr": 1e-3, "batch_size": 4}, **stage}]}
    run(parse_run_config(tree))
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"train"' in x][0]["loss"]


def test_dropout_is_off_in_preference_stages_unless_asked(tiny_gpt2, tmp_path):
    """GPT-2 has dropout 0.1: with it on, the policy's first forward differs from the reference's, so
    the first DPO loss is not log 2."""
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Item {i} is", "chosen": f" good and fine {i}",
                                        "rejected": " bad and not fine"}) + "\n" for i in range(8)))
    assert _first_dpo_loss(tiny_gpt2, tmp_path / "default", data) == pytest.approx(math.log(2), abs=1e-6)
    assert abs(_first_dpo_loss(tiny_gpt2, tmp_path / "on", data, disable_dropout=False) - math.log(2)) > 1e-6

    from postlab.train import dropout_off

    model = load_lm(str(tiny_gpt2), device="cpu", precision="fp32").model
    with dropout_off(model, True):
        assert all(m.p == 0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    assert {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)} == {0.1}  # restored after the stage


def test_fp16_training_is_refused_and_a_fixed_gpu_under_a_launcher_too(tiny_llama, tmp_path, monkeypatch):
    data = write_pairs(tmp_path / "pairs.tsv", 8)
    tree = run_config(tiny_llama, tmp_path / "run", data)
    tree["model"]["precision"] = "fp16"
    with pytest.raises(ConfigError, match="fp16 training needs loss scaling"):
        parse_run_config(tree)

    from postlab import distributed, models

    monkeypatch.setattr(distributed, "launched", lambda: True)
    monkeypatch.setattr(distributed, "device", lambda: torch.device("cpu"))
    with pytest.raises(ModelError, match="model.device='cuda:1' under a multi-process launch"):
        models.resolve_device("cuda:1")
    assert models.resolve_device("cuda") == torch.device("cpu")  # this process's own device


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_dpo_stage_starts_at_log_2(tiny_llama, tmp_path, precision):
    """Policy and cached reference agree before any update, in bf16 too, when the reference pass sees
    the batch the first step sees (4 pairs, batch 4): nothing but batch shapes separates them (no
    dropout, same autocast, same fp32 head). Other shapes move bf16 log-probs by a few bf16 units."""
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Item {i} is", "chosen": f" good and fine {i}",
                                        "rejected": " bad and not fine"}) + "\n" for i in range(4)))
    loss = _first_dpo_loss(tiny_llama, tmp_path / "run", data, precision, eval_batch_size=4)
    assert loss == pytest.approx(math.log(2), abs=1e-6)


def test_the_bf16_head_rounds_its_output_relative_to_the_target_logit():
    """Under bf16 autocast (CPU) the head's matmul runs in bf16 with each row shifted by minus its
    target's logit before the output is rounded. Logits with a large common offset (as a trained LM's:
    10-30 on the embedded model; here ~200) leave the log-probs unchanged but make autocast's plain
    bf16 head round every logit by up to half a bf16 unit of |logit| (0.5 at 200); the shifted head
    gives the log-probs of the exact product of the bf16-rounded inputs to within units of |log-prob|."""
    from postlab.logprobs import _chunk_logps

    g = torch.Generator().manual_seed(0)
    rows, d, vocab = 8, 64, 512
    h = torch.randn(rows, d, generator=g)
    h[:, 0] = 1.0
    head = torch.nn.Linear(d, vocab, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, d, generator=g) * 0.4)
        head.weight[:, 0] = 200.0  # the same +200 on every logit
    h16, w16 = h.bfloat16().double(), head.weight.bfloat16().double()
    exact = torch.log_softmax(h16 @ w16.T, -1)  # the product of the bf16 inputs
    plain = torch.log_softmax((h.bfloat16() @ head.weight.bfloat16().T).double(), -1)  # bf16 logits
    targets = exact.topk(3, -1).indices[:, 1:].reshape(-1)  # likely tokens, two per row
    at = torch.arange(rows).repeat_interleave(2)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = _chunk_logps(head, h, at, targets).double()
    want = exact[at, targets]
    assert want.abs().max() < 8
    err, plain_err = (got - want).abs().max(), (plain[at, targets] - want).abs().max()
    assert plain_err > 0.2
    assert err < 0.05, (err, plain_err)


def test_an_fp32_run_scores_with_the_head_in_fp32(tiny_llama):
    from postlab.data import Example, score_batch
    from postlab.decoder import decoder_and_head
    from postlab.logprobs import score

    lm = load_lm(str(tiny_llama), device="cpu", precision="fp32")
    items, _ = tokenize([Example(f"Count {i}: one", " two three") for i in range(3)], lm.tokenizer, 64)
    batch = score_batch(items, lm.tokenizer.pad_token_id)
    body, head = decoder_and_head(lm.model)
    with torch.no_grad():
        logps, _ = score(lm, batch)
        L = batch.input_ids.shape[1]
        causal = torch.ones(L, L, dtype=torch.bool).tril_()[None, None]
        hidden = body(input_ids=batch.input_ids, attention_mask=causal, use_cache=False).last_hidden_state
        full = torch.log_softmax(hidden.reshape(-1, hidden.shape[-1]) @ head.weight.T, -1)
    expected = full[batch.hidden_index[batch.entry_hidden], batch.entry_target]
    torch.testing.assert_close(logps[batch.entry_answer, batch.entry_slot], expected, atol=1e-5, rtol=0)


class CountWeightCasts(TorchDispatchMode):
    """Counts casts (`aten._to_copy`) of the given tensors' storage, as autocast issues them."""

    def __init__(self, weights):
        super().__init__()
        self.ptrs, self.n = {w.data_ptr() for w in weights}, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._to_copy.default and args[0].data_ptr() in self.ptrs:
            self.n += 1
        return func(*args, **(kwargs or {}))


def test_a_scoring_pass_or_a_generation_casts_each_weight_once(tiny_llama):
    """bf16 autocast on CPU, frozen weights (a LoRA base, a teacher): a reference pass of 3 batches and
    a generation of 6 tokens each cast every linear weight once, not once per forward; the
    log-probs are bit for bit those of one autocast region per batch; the weights stay frozen."""
    from postlab.config import GenerationConfig
    from postlab.data import Example
    from postlab.decoder import decoder_and_head
    from postlab.generate import generate
    from postlab.logprobs import score_all, token_logps

    lm = load_lm(str(tiny_llama), device="cpu", precision="bf16")
    lm.model.requires_grad_(False)
    linear = [m.weight for m in lm.model.modules() if isinstance(m, torch.nn.Linear)]
    body = [m.weight for m in decoder_and_head(lm.model)[0].modules() if isinstance(m, torch.nn.Linear)]
    items, _ = tokenize([Example(f"Count {i}: one", " two three" * (1 + i % 3)) for i in range(12)], lm.tokenizer, 64)

    with CountWeightCasts(linear) as casts:
        got = token_logps(lm, items, 4)
    assert casts.n == len(linear) == len(body) + 1  # 3 forwards: 3x as many before; the head's bf16 matmul too
    per_batch = [None] * len(items)
    for idx, logps, mask in score_all(lm, items, 4):  # an autocast region per forward
        for b, i in enumerate(idx):
            per_batch[i] = logps[b][mask[b]]
    assert all(torch.equal(g[0], p) for g, p in zip(got, per_batch))

    with CountWeightCasts(linear) as casts:
        generate(lm, ["Count 1:", "Count 2: one"], GenerationConfig(max_new_tokens=6, batch_size=2, greedy=True), None)
    assert casts.n == len(linear)  # the head too (tied to the embedding): generation's logits are autocast's
    assert not any(p.requires_grad for p in lm.model.parameters())


class CountDeviceWaits(CountSyncs):
    """Host reads, and indexing by a boolean mask (on a GPU the host must learn how many it selects)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.nonzero.default or (
                func in (torch.ops.aten.index.Tensor, torch.ops.aten.index_put_.default)
                and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1])):
            self.n += 1
        return super().__torch_dispatch__(func, types, args, kwargs)


def test_sampling_with_the_gpu_search_does_not_wait_for_the_device():
    """fp32 scores on CPU. The nucleus search generate uses on a GPU (ks=(): whole rows sorted) draws a
    token without a host read or boolean indexing; the CPU's (top-k first) needs them, which shows
    the counter sees them."""
    from postlab.generate import SampleNucleus

    scores = torch.randn(6, 1000, generator=torch.Generator().manual_seed(0)) * 2
    with CountDeviceWaits() as waits:
        SampleNucleus(1.0, 0.9, ks=())(None, scores)
    assert waits.n == 0
    with CountDeviceWaits() as waits:
        SampleNucleus(1.0, 0.9, ks=(16,))(None, scores)
    assert waits.n > 0
