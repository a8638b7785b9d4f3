"""Preference stages through the same loop: a tiny DPO run separates its training pairs, SFT→DPO runs
across the stage boundary, the reference cache is reused."""
from __future__ import annotations

import json
import logging

import pytest

from helpers import final_weights, run_config, write_pairs
from postlab.config import TaskConfig, parse_run_config
from postlab.evaluate import implicit_rewards
from postlab.models import load_lm
from postlab.run import run
from postlab.tasks import get_task


def test_tiny_dpo_reward_accuracy_rises_above_09(tiny_llama, tmp_path):
    data = write_pairs(tmp_path / "pairs.tsv", n=16)
    tree = run_config(tiny_llama, tmp_path / "run", data, name="dpo", objective={"name": "dpo", "beta": 1.0},
                      optim={"lr": 1e-3, "batch_size": 8, "schedule": "constant"}, epochs=20,
                      eval_at_start=False, log_every=5)
    run(parse_run_config(tree))
    pairs = get_task(TaskConfig(name="paraphrase", train=str(data))).preference_pairs("train")
    before = implicit_rewards(load_lm(str(tiny_llama), device="cpu", precision="fp32"), load_lm(str(tiny_llama), device="cpu", precision="fp32"), pairs, beta=1.0, append_eos=False)
    after = implicit_rewards(load_lm(str(tmp_path / "run" / "0-dpo" / "model"), device="cpu", precision="fp32"), load_lm(str(tiny_llama), device="cpu", precision="fp32"), pairs,
                             beta=1.0, append_eos=False)
    assert before["reward_margin"] == pytest.approx(0.0, abs=1e-5)
    assert after["reward_accuracy"] > 0.9 and after["reward_margin"] > 0
    logged = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in logged if r.get("split") == "train" and "rewards/accuracy" in r]
    assert train and train[-1]["rewards/accuracy"] > 0.9


@pytest.mark.parametrize("method", ["fft", "lora"])
def test_sft_then_dpo_two_stages_and_reference_cache_reuse(tiny_llama, tmp_path, method, caplog):
    data = write_pairs(tmp_path / "pairs.tsv", n=8)
    param = {"method": method, "lora": {"r": 4}}
    tree = run_config(tiny_llama, tmp_path / "run", data, parameterization=param, epochs=1)
    dpo = {**tree["stages"][0], "name": "dpo", "objective": {"name": "dpo", "beta": 0.1}}
    tree["stages"].append(dpo)
    with caplog.at_level(logging.INFO, logger="postlab"):
        result = run(parse_run_config(tree))
    assert [s["name"] for s in result["stages"]] == ["sft", "dpo"]
    assert "rewards/accuracy" in open(tmp_path / "run" / "metrics.jsonl").read()
    assert any("computed for" in r.message for r in caplog.records)
    # The same reference (DPO-only from the same base) a second time: the cache is reused.
    caplog.clear()
    only = run_config(tiny_llama, tmp_path / "dpo1", data, name="dpo", objective={"name": "dpo"}, epochs=1)
    run(parse_run_config(only))
    only["output_dir"] = str(tmp_path / "dpo2")
    with caplog.at_level(logging.INFO, logger="postlab"):
        run(parse_run_config(only))
    assert any("reusing cache" in r.message for r in caplog.records)


@pytest.mark.parametrize("method", ["fft", "lora"])
def test_resume_across_the_stage_boundary(tiny_llama, tmp_path, method, precision):
    """Killed inside the DPO stage: the resumed run reloads the finished SFT model from disk, reuses
    the reference cache and ends with the same weights as an uninterrupted run: bit-identical in fp32
    and in bf16, on the machine that runs both."""
    import torch

    import postlab.train as train_mod

    data = write_pairs(tmp_path / "pairs.tsv", n=12)

    def config(out):
        tree = run_config(tiny_llama, out, data, precision, epochs=2, save_every_steps=1,
                          parameterization={"method": method, "lora": {"r": 4, "dropout": 0.1}})
        tree["stages"].append({**tree["stages"][0], "name": "dpo", "objective": {"name": "dpo"}})
        return parse_run_config(tree)

    run(config(tmp_path / "full"))
    real_step, calls = train_mod.torch.optim.AdamW.step, {"n": 0}

    def dying_step(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 9:  # SFT has 6 steps: this is DPO's third
            raise KeyboardInterrupt
        return real_step(self, *a, **k)

    train_mod.torch.optim.AdamW.step = dying_step
    try:
        with pytest.raises(KeyboardInterrupt):
            run(config(tmp_path / "part"))
    finally:
        train_mod.torch.optim.AdamW.step = real_step
    assert (tmp_path / "part" / "0-sft" / "done.json").is_file()
    assert not (tmp_path / "part" / "1-dpo" / "done.json").exists()
    run(config(tmp_path / "part"), resume=True)
    a, b = final_weights(tmp_path / "full", "1-dpo"), final_weights(tmp_path / "part", "1-dpo")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    full = json.loads((tmp_path / "full" / "result.json").read_text())
    part = json.loads((tmp_path / "part" / "result.json").read_text())
    assert full["metrics"] == part["metrics"]


def test_pairs_split_into_row_limited_forwards_give_the_same_step(tiny_llama, tmp_path, precision):
    """A micro-batch of multi-token pairs holds 2 rows per pair; by default a forward holds at most
    batch_size rows (so DPO's activations match SFT's), the micro-batch running as several forwards
    accumulated into one step. The step is the same as one forward of every pair: up to float
    round-off in fp32; in bf16 the two forwards round differently (other shapes), so the logged loss
    and gradient norm agree to bf16's precision and the weights to what Adam can move them."""
    import torch
    from safetensors.torch import load_file

    from conftest import tolerance
    from postlab.data import Tokenized, forward_chunks

    multi = [Tokenized([1, 2], [[3, 4], [5]]) for _ in range(5)]
    assert forward_chunks(multi, [0, 1, 2, 3, 4], 4) == [[0, 1], [2, 3], [4]]
    single = [Tokenized([1, 2], [[3], [5]]) for _ in range(5)]  # one shared row per pair
    assert forward_chunks(single, [0, 1, 2, 3, 4], 4) == [[0, 1, 2, 3], [4]]
    assert forward_chunks(multi, [], 4) == []

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Item {i} is", "chosen": f" good and fine {i}",
                                        "rejected": " bad"}) + "\n" for i in range(8)))
    lr = 1e-3

    def weights(name: str, forward_rows: int | None) -> tuple[dict, list]:
        out = tmp_path / name
        run(parse_run_config({
            "model": {"name": str(tiny_llama), "device": "cpu", "precision": precision}, "output_dir": str(out),
            "reuse_stages": False,
            "stages": [{"name": "dpo", "task": {"name": "file", "train": str(data)}, "eval_at_start": False,
                        "objective": {"name": "dpo", "beta": 0.1}, "group_by_length": False, "log_every": 1,
                        "optim": {"lr": lr, "batch_size": 4, "forward_rows": forward_rows}}]}))
        logged = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["split"] == "train"]
        return final_weights(out, "0-dpo"), logged

    (split, log_split), (whole, log_whole) = weights("split", None), weights("whole", 8)  # 4 rows a forward vs 8
    start = load_file(str(next(tiny_llama.glob("*.safetensors"))))
    # The first step starts from the same weights: only rounding differs.
    first_a, first_b = log_split[0], log_whole[0]
    assert first_a["loss"] == pytest.approx(first_b["loss"], abs=tolerance(precision, first_b["loss"]))
    assert first_a["grad_norm"] == pytest.approx(first_b["grad_norm"], rel=tolerance(precision, ulps=8))
    moved = 0
    for k, v in whole.items():
        if precision == "fp32":
            torch.testing.assert_close(split[k], v, rtol=1e-4, atol=1e-6)
        else:  # an Adam step moves a weight by at most ~lr, whatever the gradient's rounding
            assert float((split[k] - v).abs().max()) <= 2 * lr * len(log_whole), k
        moved += int(not torch.equal(v, start.get(k, v)))
    assert moved  # training changed the weights: the comparison is not between two untouched models
