"""What only a CUDA GPU shows (skipped without one; `bench/gpu/check.sh` runs them on a lent GPU).

tests/test_gpu_ready.py checks the loop on CPU; a CPU cannot see a blocking copy to the device (a
host synchronisation on a GPU) nor CUDA's bf16 kernels. These run the tiny models on `cuda` with
PyTorch's sync debug mode raising at every synchronising call inside the training steps, compare the
GPU's log-probs with the CPU's, run an SFT -> DPO run in bf16, and a stage compiled by inductor.
Precision is stated in each test (never `auto`); device: the first visible GPU.
"""
from __future__ import annotations

import json
import math
from contextlib import contextmanager

import pytest
import torch

from helpers import run_config, split_step_plan, write_pairs
from postlab.config import parse_run_config
from postlab.data import Example, score_batch, tokenize
from postlab.logprobs import score, token_logps
from postlab.models import load_lm
from postlab.run import run
from postlab.runlog import MetricsLog
from postlab.train import train_stage

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (bench/gpu/check.sh runs these on one)")


@contextmanager
def synchronisations_raise():
    """Inside: every CUDA call that makes the host wait for the device raises (.item(), a blocking
    copy to or from the GPU, nonzero, ...), with the line that made it."""
    before = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(before)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("objective", ["nll", "dpo"])
def test_training_steps_on_the_gpu_never_wait_for_it(tiny_llama, tmp_path, monkeypatch, objective, precision):
    """4 optimizer steps of 2 micro-batches, each 2 forwards, logged once at the end: the forwards,
    backwards and optimizer steps queue work and never wait for it."""
    import postlab.train as train

    for name in ("_forward_backward", "_optimizer_step"):
        def strict(*args, _fn=getattr(train, name), **kw):
            with synchronisations_raise():
                return _fn(*args, **kw)
        monkeypatch.setattr(train, name, strict)
    lm = load_lm(str(tiny_llama), device="cuda", precision=precision)
    plan = split_step_plan(lm, tmp_path, objective)
    out = train_stage(lm, plan, MetricsLog(tmp_path / "m.jsonl"), lambda step, final: {})
    assert out["steps"] == 4
    losses = [json.loads(x)["loss"] for x in (tmp_path / "m.jsonl").read_text().splitlines() if '"train"' in x]
    assert losses and all(math.isfinite(v) for v in losses)


def test_log_probs_on_the_gpu_match_the_cpu(tiny_llama):
    """The same batch scored on the CPU in fp32 and on the GPU in fp32 (no TF32) and bf16 autocast."""
    examples = [Example("Count: one", " two three four"), Example("Hi", " there, how are you?"),
                Example("The capital of France is", " Paris.")]
    cpu = load_lm(str(tiny_llama), device="cpu", precision="fp32")
    items, _ = tokenize(examples, cpu.tokenizer, 64)
    with torch.no_grad():
        expected, mask = score(cpu, score_batch(items, cpu.tokenizer.pad_token_id))
    for precision, tolerance in (("fp32", 1e-4), ("bf16", 5e-2)):
        gpu = load_lm(str(tiny_llama), device="cuda", precision=precision)
        with torch.no_grad():
            got, got_mask = score(gpu, score_batch(items, gpu.tokenizer.pad_token_id).to(gpu.device))
        assert got.device.type == "cuda" and got.dtype == torch.float32
        assert torch.equal(got_mask.cpu(), mask)
        error = (got.cpu() - expected)[mask].abs().max().item()
        assert error < tolerance, f"{precision}: largest log-prob difference {error:.2e}"
        # a reference pass (batches of 2) returns the same values on the host, row by row
        with gpu.inference():
            cached = token_logps(gpu, items, 2)
        for b, (values,) in enumerate(cached):
            assert values.device.type == "cpu" and len(values) == int(mask[b].sum())
            assert torch.allclose(values, expected[b][mask[b]], atol=tolerance)


def test_an_sft_then_dpo_run_trains_on_the_gpu_in_bf16(tiny_llama, tmp_path):
    """The run's files are the CPU's (fp32 weights on disk), the DPO stage starts at log 2 (dropout
    off, the cached reference is the policy), and the trained model loads on the CPU."""
    data = write_pairs(tmp_path / "pairs.tsv", 16)
    tree = run_config(tiny_llama, tmp_path / "run", data, precision="bf16", save_model=True)
    tree["model"]["device"] = "cuda"
    sft = tree["stages"][0]
    tree["stages"] = [sft, {**sft, "name": "dpo", "objective": {"name": "dpo", "beta": 0.1}, "epochs": 1,
                            "eval_at_start": False, "optim": {"lr": 1e-4, "batch_size": 4}, "eval_batch_size": 4}]
    run(parse_run_config(tree))
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = {s: [r["loss"] for r in records
                 if r.get("split") == "train" and r["stage"] == s and "loss" in r] for s in ("sft", "dpo")}
    assert all(math.isfinite(v) for vs in train.values() for v in vs)
    assert train["sft"][-1] < train["sft"][0]
    assert train["dpo"][0] == pytest.approx(math.log(2), abs=1e-3)
    final = load_lm(str(tmp_path / "run" / "1-dpo" / "model"), device="cpu", precision="fp32")
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in final.model.parameters())


def test_a_stage_compiled_by_inductor_trains_like_an_eager_one_on_the_gpu(tiny_llama, tmp_path):
    data = write_pairs(tmp_path / "pairs.tsv", 16)
    losses = {}
    for name, backend in (("eager", None), ("inductor", "inductor")):
        tree = run_config(tiny_llama, tmp_path / name, data, epochs=1)
        tree["model"].update(device="cuda", compile=backend)
        run(parse_run_config(tree))
        losses[name] = [json.loads(x)["loss"] for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()
                        if '"train"' in x]
    assert len(losses["eager"]) == 4
    assert losses["inductor"] == pytest.approx(losses["eager"], rel=1e-3, abs=1e-5)
