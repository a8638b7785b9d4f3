"""Data-parallel training: two CPU processes (gloo) started by the launcher reach the same weights as
one process with the same global batch."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import yaml

from conftest import tolerance
from helpers import final_weights, run_config, write_pairs
from postlab.config import parse_run_config
from postlab.run import run


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(config, n: int, cwd, *args: str, env: dict | None = None) -> subprocess.Popen:
    """`postlab train` in `n` processes, started; `finish` waits for them. A test starts them before its
    one-process reference run, which then overlaps their start-up (the caches are shared and locked, as
    for runs side by side)."""
    # accelerate's multi-process launcher is torch.distributed.run; on a machine without GPUs
    # PartialState then joins the processes over gloo.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(n),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
           "-m", "postlab", "train", str(config), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", **(env or {})}
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(p: subprocess.Popen) -> subprocess.CompletedProcess:
    try:
        out, err = p.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        p.kill()
        raise
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def launch(config, n: int, cwd, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return finish(start(config, n, cwd, *args, env=env))


def assert_same_training(a: dict, b: dict, precision: str, lr: float, steps: int) -> None:
    """Final weights of two runs that took the same steps: float round-off apart in fp32; in bf16 the
    forwards round differently (other shapes, other sums), and an Adam step moves a weight by at most
    ~lr whatever its gradient's rounding, so at most 2·lr per step apart."""
    assert a.keys() == b.keys() and a
    for k in a:
        if precision == "fp32":
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
        else:
            assert float((b[k] - a[k]).abs().max()) <= 2 * lr * steps, k


@pytest.mark.parametrize("parallel,method,precision", [("ddp", "fft", "fp32"), ("ddp", "lora", "fp32"), ("fsdp", "fft", "fp32"),
                                                       ("fsdp", "lora", "fp32"), ("ddp", "fft", "bf16"), ("fsdp", "lora", "bf16")])
def test_two_processes_match_one_process_with_the_same_global_batch(tiny_llama, tmp_path, parallel, method, precision):
    data = write_pairs(tmp_path / "pairs.tsv", n=13)
    param = {"method": method, "lora": {"r": 4, "dropout": 0.0}}  # dropout masks differ per process
    # Micro-batches of 3 (and one of 1) over 2 processes with forward_rows 1: one process runs 1
    # forward, the other 2 (under fsdp the first repeats one, weight 0, to stay in step); the step of
    # 1 example leaves the first process nothing. A tight grad_clip acts on every step.
    common = dict(epochs=2, optim={"lr": 1e-3, "batch_size": 3, "forward_rows": 1, "grad_clip": 0.5},
                  parameterization=param)
    two = run_config(tiny_llama, tmp_path / "two", data, precision, **common)
    two["reuse_stages"], two["parallel"] = False, parallel
    cfg_path = tmp_path / "two.yaml"
    cfg_path.write_text(yaml.safe_dump(two))
    started = start(cfg_path, 2, tmp_path)
    one = run_config(tiny_llama, tmp_path / "one", data, precision, **common)
    one["reuse_stages"] = False
    run(parse_run_config(one))
    p = finish(started)
    assert p.returncode == 0, p.stderr[-3000:]
    assert ("fsdp: 2 blocks + root sharded over 2 processes" in p.stderr) == (parallel == "fsdp")
    assert p.stdout.count("done in") == 1  # one summary, from the main process

    a, b = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    assert_same_training(a, b, precision, lr=1e-3, steps=10)
    # The logged losses and token counts are those of the whole global batch.
    import json

    def train_records(out):
        return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["split"] == "train"]

    ra, rb = train_records(tmp_path / "one"), train_records(tmp_path / "two")
    assert [r["step"] for r in ra] == [r["step"] for r in rb]
    if precision == "fp32":
        for x, y in zip(ra, rb):
            assert y["loss"] == pytest.approx(x["loss"], rel=1e-4, abs=1e-6)
            # gradients summed over processes, not averaged (Adam and the clip would hide a scale)
            assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-4, abs=1e-6)
    else:  # the first step starts from the same weights: they differ by rounding only
        assert rb[0]["loss"] == pytest.approx(ra[0]["loss"], abs=tolerance(precision, ra[0]["loss"]))
        assert rb[0]["grad_norm"] == pytest.approx(ra[0]["grad_norm"], rel=tolerance(precision, ulps=8))
    res_a, res_b = (json.loads((tmp_path / d / "result.json").read_text()) for d in ("one", "two"))
    assert res_b["stages"][0]["tokens"] == res_a["stages"][0]["tokens"]
    # Evaluation (on the main process; under fsdp on the gathered shards) sees the same model.
    if precision == "fp32":
        assert res_b["metrics"] == pytest.approx(res_a["metrics"], rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_fsdp_scores_long_completions_in_recomputed_head_chunks_like_one_process(tiny_llama, tmp_path, precision):
    """Over 512 scored tokens per process the LM head runs in chunks recomputed in the backward pass
    (logprobs.CHUNK_ROWS): under fsdp the root's weights (the tied head) must still be whole then."""
    import json
    import random

    rng = random.Random(0)
    words = "the of and to in is that it for on with as was at by an be this from".split()
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Write {i}:", "completion": " " + " ".join(rng.choice(words) for _ in range(400))}) + "\n"
                            for i in range(4)))  # one step of 4: 2 x ~400 scored tokens per process
    task = {"name": "file", "train": str(data), "dev": str(data), "dev_limit": 2}
    common = dict(task=task, epochs=1, eval_at_start=False, optim={"lr": 1e-3, "batch_size": 4})
    two = {**run_config(tiny_llama, tmp_path / "two", data, precision, **common), "parallel": "fsdp"}
    cfg_path = tmp_path / "two.yaml"
    cfg_path.write_text(yaml.safe_dump(two))
    started = start(cfg_path, 2, tmp_path)
    run(parse_run_config(run_config(tiny_llama, tmp_path / "one", data, precision, **common)))
    p = finish(started)
    assert p.returncode == 0, p.stderr[-3000:]
    assert_same_training(final_weights(tmp_path / "one"), final_weights(tmp_path / "two"), precision, lr=1e-3, steps=1)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_killed_fsdp_run_resumes_from_its_gathered_checkpoint(tiny_llama, tmp_path, precision):
    """Checkpoints under fsdp hold the whole model and optimizer state (gathered from the shards); a
    run killed mid-stage resumes from them to the weights of an uninterrupted one-process run."""
    data = write_pairs(tmp_path / "pairs.tsv", n=16)
    common = dict(epochs=2, save_every_steps=2, optim={"lr": 1e-3, "batch_size": 4, "grad_accum": 1})
    two = {**run_config(tiny_llama, tmp_path / "two", data, precision, **common), "parallel": "fsdp"}
    cfg_path = tmp_path / "two.yaml"
    cfg_path.write_text(yaml.safe_dump(two))
    started = start(cfg_path, 2, tmp_path, env={"POSTLAB_KILL_AT": "step#5"})  # in step 5, after the step-4 checkpoint
    run(parse_run_config(run_config(tiny_llama, tmp_path / "one", data, precision, **common)))
    killed = finish(started)
    assert killed.returncode != 0
    import json

    assert json.loads((tmp_path / "two" / "0-sft" / "checkpoint" / "state.json").read_text())["step"] == 4
    resumed = launch(cfg_path, 2, tmp_path, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming at step 4/8" in resumed.stderr
    assert_same_training(final_weights(tmp_path / "one"), final_weights(tmp_path / "two"), precision, lr=1e-3, steps=8)


def test_each_process_takes_a_contiguous_weighted_share_of_a_micro_batch(monkeypatch):
    from postlab import distributed

    idx = list(range(10, 17))  # 7 examples over 3 processes
    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    shares = []
    for r in range(3):
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        shares.append(distributed.my_share(idx))
    assert [s for part, _ in shares for s in part] == idx  # every example once, in order
    assert sum(w for _, w in shares) == pytest.approx(1.0)
    assert [len(p) for p, _ in shares] == [2, 2, 3] and [w for _, w in shares] == pytest.approx([2 / 7, 2 / 7, 3 / 7])


def test_every_process_runs_a_forward_and_under_fsdp_as_many_as_the_busiest(monkeypatch):
    from postlab import distributed
    from postlab.data import Tokenized
    from postlab.fsdp import FullyShard

    items = [Tokenized([1, 2], [[3, 4], [5, 6]]) for _ in range(6)]  # pairs of 2-token answers: 2 rows each
    monkeypatch.setattr(distributed, "world_size", lambda: 2)

    def plans(strategy, idx, max_rows):
        out = []
        for r in range(2):
            monkeypatch.setattr(distributed, "rank", lambda r=r: r)
            out.append(strategy.forwards(items, idx, max_rows))
        return out

    ddp, fsdp = distributed.Replicated(), FullyShard()
    # 3 pairs, forward_rows 2: process 0 takes pair 0 (1 forward), process 1 pairs 1 and 2 (2 forwards)
    assert plans(ddp, [0, 1, 2], 2) == [[([0], 1 / 3)], [([1], 1 / 3), ([2], 1 / 3)]]
    assert plans(fsdp, [0, 1, 2], 2) == [[([0], 1 / 3), ([0], 0.0)], [([1], 1 / 3), ([2], 1 / 3)]]
    # a micro-batch of 1: process 0 has no share but still runs one forward, of weight 0
    assert plans(ddp, [5], 4) == plans(fsdp, [5], 4) == [[([5], 0.0)], [([5], 1.0)]]


def test_a_checkpoint_of_the_other_parallel_kind_is_refused_with_what_to_do():
    from postlab import distributed
    from postlab.errors import TrainingError
    from postlab.fsdp import FullyShard

    w = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([w])
    by_name = {"state": {"w": {"step": torch.tensor(1.0)}}, "param_groups": [{"params": ["w"]}]}
    with pytest.raises(TrainingError, match="written with parallel: fsdp; resume it the same way"):
        distributed.Replicated().load_optimizer_state(None, opt, by_name)
    by_index = {"state": {0: {"step": torch.tensor(1.0)}}, "param_groups": [{"params": [0]}]}
    with pytest.raises(TrainingError, match=r"written with parallel: ddp \(or one process\); resume it the same way"):
        FullyShard().load_optimizer_state(None, opt, by_index)


def test_a_micro_batch_smaller_than_the_process_count_is_refused(tiny_llama, tmp_path, monkeypatch):
    from postlab import distributed
    from postlab.errors import TrainingError

    monkeypatch.setattr(distributed, "world_size", lambda: 4)
    data = write_pairs(tmp_path / "pairs.tsv", n=8)
    with pytest.raises(TrainingError, match="optim.batch_size=2 is smaller than the 4 processes"):
        run(parse_run_config(run_config(tiny_llama, tmp_path / "run", data, optim={"batch_size": 2})))


@pytest.mark.parametrize("fail_at", ["file-write#3", "eval#1"])
def test_a_failure_on_the_main_process_stops_every_process(tiny_llama, tmp_path, fail_at):
    """The main process fails while the other waits for it (writing a checkpoint or evaluating): both
    stop with an error instead of the other hanging at the next collective."""
    data = write_pairs(tmp_path / "pairs.tsv", n=8)
    two = run_config(tiny_llama, tmp_path / "two", data, epochs=1, optim={"lr": 1e-3, "batch_size": 4})
    cfg_path = tmp_path / "two.yaml"
    cfg_path.write_text(yaml.safe_dump(two))
    # eval#1 is reached by the main process only; file-write#3 (a write inside the stage) too: only it fails
    p = launch(cfg_path, 2, tmp_path, env={"POSTLAB_FAIL_AT": fail_at, "POSTLAB_DIST_TIMEOUT": "120"})
    assert p.returncode != 0
    assert "injected failure" in p.stderr and "failed on another process" in p.stderr, p.stderr[-3000:]
