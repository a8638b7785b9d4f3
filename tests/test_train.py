"""The training loop on tiny random models: it learns, LoRA freezes the base, checkpoints round-trip,
resume is exact, both architectures train."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import final_weights, killed_at_optimizer_step, run_config, write_pairs
from postlab.config import StageConfig, TaskConfig, parse_run_config
from postlab.data import Example, tokenize
from postlab.models import load_lm
from postlab.run import run
from postlab.runlog import MetricsLog
from postlab.stage import StagePlan
from postlab.tasks import get_task
from postlab.train import train_stage


def test_tiny_model_overfits_fixed_batch(tiny_llama):
    lm = load_lm(str(tiny_llama), device="cpu", precision="fp32")
    examples = [Example(f"Say number {i}:", f" the number is {i} and that is all") for i in range(4)]
    items, _ = tokenize(examples, lm.tokenizer, 128)
    cfg = StageConfig(optim={"lr": 3e-3, "batch_size": 4, "schedule": "constant"}, epochs=150,
                      eval_at_start=False, log_every=1)
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        log = MetricsLog(Path(d) / "metrics.jsonl")
        train_stage(lm, StagePlan(cfg, items, Path(d), 0), log, lambda step, final: {})
        losses = [r["loss"] for r in map(json.loads, (Path(d) / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert losses[-1] < 0.1 * losses[0], (losses[0], losses[-1])


def test_lora_trains_only_adapter_and_keeps_base_bit_identical(tiny_llama, tmp_path):
    data = write_pairs(tmp_path / "pairs.tsv")
    before = load_file(str(tiny_llama / "model.safetensors"))
    cfg = parse_run_config(run_config(tiny_llama, tmp_path / "run", data,
                                      parameterization={"method": "lora", "lora": {"r": 4}}))
    result = run(cfg)
    adapter = load_file(str(tmp_path / "run" / "0-sft" / "model" / "adapter_model.safetensors"))
    assert adapter and all("lora_" in k for k in adapter)
    assert any(float(t.abs().sum()) > 0 for k, t in adapter.items() if "lora_B" in k)  # it trained
    trained = final_weights(tmp_path / "run")
    assert all("lora_" in k for k in trained)
    # The base weights inside the trained PEFT model are bit-identical to the originals.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    peft_model = PeftModel.from_pretrained(base, tmp_path / "run" / "0-sft" / "model")
    state = peft_model.get_base_model().state_dict()
    for name, t in before.items():
        key = next(k for k in state if k.replace(".base_layer", "") == name)
        assert torch.equal(state[key], t), name
    assert result["stages"][0]["parameterization"] == "lora"


def test_resumed_run_matches_uninterrupted(tiny_llama, tmp_path, precision):
    """Bit-identical in fp32 and in bf16 (autocast), on the machine that runs both."""
    data = write_pairs(tmp_path / "pairs.tsv")
    full = parse_run_config(run_config(tiny_llama, tmp_path / "full", data, precision, save_every_steps=2,
                                       parameterization={"method": "lora", "lora": {"r": 4, "dropout": 0.1}}))
    run(full)
    # Interrupted: stop after 3 steps (max_steps), then resume the same config to the end.
    part_cfg = run_config(tiny_llama, tmp_path / "part", data, precision, save_every_steps=2,
                          parameterization={"method": "lora", "lora": {"r": 4, "dropout": 0.1}})
    cfg = parse_run_config(part_cfg)
    killed_at_optimizer_step(cfg, 10)  # mid-epoch 2, after the step-8 checkpoint
    assert not (tmp_path / "part" / "result.json").exists()
    run(cfg, resume=True)
    a, b = final_weights(tmp_path / "full"), final_weights(tmp_path / "part")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ra = json.loads((tmp_path / "full" / "result.json").read_text())
    rb = json.loads((tmp_path / "part" / "result.json").read_text())
    assert ra["metrics"] == rb["metrics"]


def test_checkpoint_reload_gives_same_eval(tiny_llama, tmp_path):
    data = write_pairs(tmp_path / "pairs.tsv")
    cfg = parse_run_config(run_config(tiny_llama, tmp_path / "run", data, epochs=1))
    result = run(cfg)
    lm = load_lm(str(tmp_path / "run" / "0-sft" / "model"), device="cpu", precision="fp32")
    task = get_task(TaskConfig(name="paraphrase", train=str(data), dev=str(data), dev_limit=8))
    again = task.evaluate(lm, tmp_path / "again")
    assert again == result["metrics"]
    # the run kept its final and its starting (zero-shot) evaluation, each with per-example statistics
    # that give back the corpus metrics
    from postlab.metrics import read_per_example

    final, start = read_per_example(tmp_path / "run" / "0-sft" / "eval"), read_per_example(tmp_path / "run" / "0-sft" / "eval-start")
    assert len(final.ids) == len(start.ids) == 8
    for m in ("accuracy", "macro_f1", "predicted_yes_rate"):
        assert final.value(m) == pytest.approx(result["metrics"][m], abs=1e-12), m
    zero = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert zero["step"] == 0 and start.value("accuracy") == pytest.approx(zero["accuracy"])
    assert result["task"] == "paraphrase" and result["precision"] == "fp32" and result["cpu"]


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_gpt2"])
@pytest.mark.parametrize("method", ["fft", "lora"])
def test_architectures_train(arch, method, request, tmp_path):
    model = request.getfixturevalue(arch)
    data = write_pairs(tmp_path / "pairs.tsv")
    cfg = parse_run_config(run_config(model, tmp_path / "run", data, epochs=3, optim={"lr": 3e-3},
                                      parameterization={"method": method}))
    run(cfg)
    recs = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in recs if "loss" in r]
    assert losses[-1] < losses[0]


def test_existing_run_needs_resume_flag(tiny_llama, tmp_path):
    from postlab.errors import ConfigError

    data = write_pairs(tmp_path / "pairs.tsv")
    cfg = parse_run_config(run_config(tiny_llama, tmp_path / "run", data, epochs=1))
    run(cfg)
    with pytest.raises(ConfigError, match="--resume"):
        run(cfg)
    changed = parse_run_config(run_config(tiny_llama, tmp_path / "run", data, epochs=2))
    with pytest.raises(ConfigError, match="differs"):
        run(changed, resume=True)


def test_max_completion_tokens_cuts_training_answers_without_eos(tiny_llama):
    from postlab.data import Pair

    lm = load_lm(str(tiny_llama), device="cpu", precision="fp32")
    pairs = [Pair("Continue:", " one two three four five six seven", " a b", "x")]
    full, _ = tokenize(pairs, lm.tokenizer, 128)
    cut, _ = tokenize(pairs, lm.tokenizer, 128, max_completion_tokens=3)
    eos = lm.tokenizer.eos_token_id
    assert full[0].completions[0][-1] == eos and len(full[0].completions[0]) > 3
    assert cut[0].completions[0] == full[0].completions[0][:3] and eos not in cut[0].completions[0]
    assert cut[0].completions[1] == full[0].completions[1][:3]  # short answers keep their EOS
    assert cut[0].prompt == full[0].prompt


def test_a_stage_trains_on_answers_cut_to_max_completion_tokens(tiny_llama, tmp_path):
    from postlab.config import StageConfig
    from postlab.stage import stage_items

    data = tmp_path / "sft.jsonl"
    data.write_text(json.dumps({"prompt": "Tell a story:", "completion": " once upon a time" * 10}) + "\n")
    lm = load_lm(str(tiny_llama), device="cpu", precision="fp32")
    stage = StageConfig(task={"name": "file", "train": str(data), "max_completion_tokens": 5})
    _, items = stage_items(lm, stage)
    assert [len(c) for c in items[0].completions] == [5]


def test_max_steps_zero_evaluates_the_starting_model_only(tiny_llama, tmp_path):
    data = write_pairs(tmp_path / "pairs.tsv")
    result = run(parse_run_config(run_config(tiny_llama, tmp_path / "run", data, max_steps=0, eval_at_start=False)))
    stage = result["stages"][0]
    base = get_task(TaskConfig(name="paraphrase", train=str(data), dev=str(data), dev_limit=8)).evaluate(
        load_lm(str(tiny_llama), device="cpu", precision="fp32"))
    assert stage["steps"] == 0 and stage["metrics"] == base  # exactly the base model's evaluation
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["split"] for r in rows] == ["dev"] and rows[0]["step"] == 0
    assert (tmp_path / "run" / "0-sft" / "eval" / "per_example.jsonl").is_file()  # the stage's result, not a start
    assert torch.equal(load_file(str(tmp_path / "run" / "0-sft" / "model" / "model.safetensors"))["model.norm.weight"],
                       load_file(str(tiny_llama / "model.safetensors"))["model.norm.weight"])


def test_a_finished_stage_keeps_no_optimizer_state(tiny_llama, tmp_path, monkeypatch):
    """fp32, CPU. The end-of-epoch checkpoint mid-stage keeps the optimizer state (a resume needs it);
    the one written as the stage ends does not. A run stopped after it (while writing done.json, before
    the checkpoint is dropped for model/) resumes to the same weights without a step; if the stage then
    has steps left (its data grew), it says so."""
    import postlab.stage as stage_mod
    import postlab.train as train_mod
    from postlab.errors import TrainingError

    data = write_pairs(tmp_path / "pairs.tsv", 8)
    cfg = parse_run_config(run_config(tiny_llama, tmp_path / "run", data, epochs=2))
    kept = []
    real_save = train_mod.save_checkpoint

    def recording_save(path, weights, optimizer_state, scheduler, state):
        kept.append((state["epoch"], optimizer_state is not None))
        real_save(path, weights, optimizer_state, scheduler, state)

    real_write = stage_mod.atomic_write_json

    def stopped_at_done(path, obj):
        if Path(path).name == "done.json":
            raise KeyboardInterrupt
        real_write(path, obj)

    monkeypatch.setattr(train_mod, "save_checkpoint", recording_save)
    monkeypatch.setattr(stage_mod, "atomic_write_json", stopped_at_done)
    with pytest.raises(KeyboardInterrupt):
        run(cfg)
    assert kept == [(1, True), (2, False)]
    ckpt = tmp_path / "run" / "0-sft" / "checkpoint"
    assert torch.load(ckpt / "trainer_state.pt", weights_only=True)["optimizer"] is None
    before = load_file(str(ckpt / "trainable.safetensors"))

    def no_step(self, *a, **k):
        raise AssertionError("a finished stage trained again")

    monkeypatch.setattr(train_mod.torch.optim.AdamW, "step", no_step)
    with pytest.raises(KeyboardInterrupt):  # stopped again at done.json: the checkpoint stays
        run(cfg, resume=True)
    after = load_file(str(ckpt / "trainable.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)

    write_pairs(data, 16)  # twice the steps now
    with pytest.raises(TrainingError, match="finished stage .*steps left"):
        run(cfg, resume=True)


def test_a_stage_that_writes_its_model_drops_its_checkpoint_once_done(tiny_llama, tmp_path):
    """fp32, CPU. A finished stage's checkpoint duplicates model/ when model/ is written: it is removed
    after done.json (with its leftovers), or on resume if the run stopped in between. A stage that
    writes no model/ keeps it: the only copy of its weights."""
    data = write_pairs(tmp_path / "pairs.tsv", 8)
    tree = run_config(tiny_llama, tmp_path / "run", data, epochs=1)
    tree["stages"].append({**tree["stages"][0], "name": "dpo", "objective": {"name": "dpo", "beta": 0.1},
                           "save_model": False})
    sft = tmp_path / "run" / "0-sft"
    (sft / ".checkpoint.tmp-killed").mkdir(parents=True)  # as a run killed while writing one leaves
    run(parse_run_config(tree))
    assert (sft / "done.json").is_file() and (sft / "model" / "model.safetensors").is_file()
    assert not [p.name for p in sft.iterdir() if "checkpoint" in p.name]
    assert (tmp_path / "run" / "1-dpo" / "checkpoint" / "trainable.safetensors").is_file()
    assert not (tmp_path / "run" / "1-dpo" / "model").exists()
    # stopped between done.json and the removal: a resume removes it
    (sft / "checkpoint").mkdir()
    (tmp_path / "run" / "result.json").unlink()
    run(parse_run_config(tree), resume=True)
    assert not (sft / "checkpoint").exists()
    assert (tmp_path / "run" / "1-dpo" / "checkpoint" / "trainable.safetensors").is_file()


def test_train_records_say_tokens_seen_and_seconds_per_step(tiny_llama, tmp_path, monkeypatch):
    """fp32, CPU. Each train record (every log_every steps) carries the tokens trained on so far and the
    mean wall time of the steps since the last record. The loop's clock is a fake one that only an
    optimizer step advances (by 0.5 s): no real time is measured."""
    import types

    import postlab.train as train_mod

    data = write_pairs(tmp_path / "pairs.tsv", 24)  # 6 steps a epoch at batch 4
    clock = {"now": 0.0}
    monkeypatch.setattr(train_mod, "time", types.SimpleNamespace(perf_counter=lambda: clock["now"]))
    real_step = train_mod._optimizer_step

    def half_second_step(*a, **k):
        clock["now"] += 0.5
        return real_step(*a, **k)

    monkeypatch.setattr(train_mod, "_optimizer_step", half_second_step)
    run(parse_run_config(run_config(tiny_llama, tmp_path / "run", data, epochs=1, log_every=2)))
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in train] == [2, 4, 6]
    lm = load_lm(str(tiny_llama), device="cpu", precision="fp32")
    task = get_task(TaskConfig(name="paraphrase", train=str(data), dev=str(data)))
    items, _ = tokenize(task.train_examples(), lm.tokenizer, lm.max_length, append_eos=task.append_eos)
    assert train[-1]["tokens_seen"] == sum(len(it.prompt) + len(it.completions[0]) for it in items)
    assert 0 < train[0]["tokens_seen"] < train[1]["tokens_seen"] < train[2]["tokens_seen"]
    assert [r["step_s"] for r in train] == [0.5, 0.5, 0.5]


@pytest.mark.parametrize("group", [True, False])
def test_each_epoch_starts_with_its_largest_batch(group):
    """The largest batch (size x longest item) comes first (a batch too big fails at step 1, and later
    steps reuse its memory); every example still appears once, and the order depends on the seed."""
    from postlab.data import length_grouped_batches

    lengths = [(i * 37) % 101 + 1 for i in range(203)]  # a last, smaller batch of 11
    padded = lambda b: len(b) * max(lengths[i] for i in b)  # noqa: E731
    orders = []
    for seed in range(5):
        batches = length_grouped_batches(lengths, 16, seed, group)
        assert sorted(i for b in batches for i in b) == list(range(203))
        assert padded(batches[0]) == max(padded(b) for b in batches)
        assert batches == length_grouped_batches(lengths, 16, seed, group)
        orders.append(batches)
    assert len({str(o[1:]) for o in orders}) == 5  # the rest stays shuffled by the seed


def test_resuming_a_checkpoint_of_another_version_warns(tiny_llama, tmp_path, caplog):
    """Another postlab version may order an epoch's batches otherwise (0.1.1 put the largest first):
    resuming its mid-stage checkpoint says so, naming the checkpoint; the same version resumes quietly."""
    import postlab.train as train_mod

    data = write_pairs(tmp_path / "pairs.tsv")

    def interrupted(out: Path):
        cfg = parse_run_config(run_config(tiny_llama, out, data, save_every_steps=2, eval_at_start=False))
        killed_at_optimizer_step(cfg, 4)  # after the step-2 checkpoint
        return cfg, out / "0-sft" / "checkpoint"

    cfg, ckpt = interrupted(tmp_path / "same")
    state = json.loads((ckpt / "state.json").read_text())
    assert state["postlab"] == train_mod.__version__ and state["step"] == 2
    with caplog.at_level("WARNING", logger="postlab"):
        run(cfg, resume=True)
    assert "written by postlab" not in caplog.text

    cfg, ckpt = interrupted(tmp_path / "old")
    state = json.loads((ckpt / "state.json").read_text())
    state.pop("postlab")  # as 0.1.0 wrote it
    (ckpt / "state.json").write_text(json.dumps(state))
    caplog.clear()
    with caplog.at_level("WARNING", logger="postlab"):
        run(cfg, resume=True)
    assert f"written by postlab 0.1.0 or older, resumed by {train_mod.__version__}" in caplog.text
    assert str(ckpt) in caplog.text


def test_clipping_on_the_cpu_is_torch_clipping_with_an_accurate_norm():
    """fp32 on the CPU. postlab's clip scales like torch.nn.utils.clip_grad_norm_; its norm (over each
    gradient's rows, then over those) is within 1e-6 of the float64 norm with a 4M-element gradient
    (torch 2.13's, over whole tensors, is ~1e-4 off: bench/clip_norm.py)."""
    from postlab.distributed import clip_grad_norm

    g = torch.Generator().manual_seed(0)
    shapes = [(4096, 1024), (64, 32), (32,), (0, 8)]
    grads = [torch.randn(s, generator=g) * 1e-3 for s in shapes]
    exact = torch.sqrt(sum((x.double() ** 2).sum() for x in grads)).item()
    for max_norm in (0.5, 1e6):  # clipped, and left alone
        ours = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
        theirs = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
        for a, b, x in zip(ours, theirs, grads):
            a.grad, b.grad = x.clone(), x.clone()
        norm = clip_grad_norm(ours, max_norm)
        assert abs(norm.item() - exact) / exact < 1e-6
        assert norm.item() == pytest.approx(torch.nn.utils.clip_grad_norm_(theirs, max_norm).item(), rel=1e-3)
        for a, b, x in zip(ours, theirs, grads):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-3, atol=0)
            if max_norm > exact:
                assert torch.equal(a.grad, x)
            else:
                torch.testing.assert_close(a.grad, x * (max_norm / exact), rtol=1e-5, atol=0)
