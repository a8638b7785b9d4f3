"""Numerical faults, determinism, safe loading, and a property-based fuzz of configs and data files."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import outcome, run_config, write_pairs
from postlab.cli import main
from postlab.config import parse_run_config
from postlab.errors import ModelError, TrainingError
from postlab.objectives import REGISTRY, register
from postlab.objectives.sft import nll
from postlab.run import run

CALLS = {"n": 0}


def _nan_at_call_5(x, args):
    """nll, but NaN at its 5th call (the 5th optimizer step with batch = micro-batch)."""
    CALLS["n"] += 1
    loss, m = nll(x, args)
    return (loss * float("nan"), m) if CALLS["n"] == 5 else (loss, m)


def _spike_at_call_6(x, args):
    CALLS["n"] += 1
    loss, m = nll(x, args)
    return (loss * 1e4, m) if CALLS["n"] == 6 else (loss, m)


@pytest.fixture
def faulty_objectives():
    """Two objectives that misbehave on schedule, registered for one test only."""
    names = ("test_nan_at_call_5", "test_spike_at_call_6")
    for name, fn in zip(names, (_nan_at_call_5, _spike_at_call_6)):
        register(name, kind="sft")(fn)
    CALLS["n"] = 0
    yield names
    for name in names:
        REGISTRY.pop(name, None)


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tiny_llama, tmp_path, faulty_objectives):
    data = write_pairs(tmp_path / "pairs.tsv", 24)
    cfg = parse_run_config(run_config(tiny_llama, tmp_path / "run", data, objective={"name": "test_nan_at_call_5"},
                                      save_every_steps=2, eval_at_start=False))
    with pytest.raises(TrainingError, match=r"loss is nan at step 5; stopped\. The last good checkpoint is .*checkpoint"):
        run(cfg)
    state = json.loads((tmp_path / "run" / "0-sft" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 4  # saved at step 4, before the bad step; nothing after it was written
    assert not (tmp_path / "run" / "result.json").exists()


def test_gradient_norm_spike_is_logged(tiny_llama, tmp_path, faulty_objectives):
    data = write_pairs(tmp_path / "pairs.tsv", 32)
    cfg = parse_run_config(run_config(tiny_llama, tmp_path / "run", data, objective={"name": "test_spike_at_call_6"},
                                      eval_at_start=False, epochs=1))
    run(cfg)
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    spikes = [r for r in rows if r.get("event") == "grad_norm_spike"]
    assert [r["step"] for r in spikes] == [6] and spikes[0]["grad_norm"] > 10


def test_same_config_and_seed_give_identical_results(tiny_llama, tmp_path, monkeypatch, precision):
    """Bit-identical twice, in fp32 and in bf16 (autocast), on the machine that runs both."""
    data = write_pairs(tmp_path / "pairs.tsv", 16)
    outs = []
    for i in range(2):
        monkeypatch.setenv("POSTLAB_CACHE", str(tmp_path / f"cache{i}"))  # nothing shared between the two
        tree = run_config(tiny_llama, tmp_path / f"run{i}", data, precision, epochs=2)
        tree["stages"].append({**tree["stages"][0], "name": "dpo", "objective": {"name": "dpo"}, "epochs": 1})
        run(parse_run_config(tree))
        outs.append(outcome(tmp_path / f"run{i}"))
    assert outs[0] == outs[1]
    env = json.loads((tmp_path / "run0" / "result.json").read_text())["versions"]
    assert {"python", "torch", "transformers", "peft", "postlab_commit"} <= set(env)


def test_sources_load_only_safely():
    """Checkpoints and caches: safetensors or torch.load(weights_only=True); no pickle; remote code
    only when the config says so (model.trust_remote_code, default False)."""
    src = Path(__file__).resolve().parents[1] / "src" / "postlab"
    for f in src.rglob("*.py"):
        text = f.read_text()
        for i, line in enumerate(text.splitlines(), 1):
            if "torch.load(" in line:
                assert "weights_only=True" in line, f"{f}:{i}"
            assert "import pickle" not in line and "pickle.load" not in line, f"{f}:{i}"
            assert "trust_remote_code=True" not in line, f"{f}:{i}"
    from postlab.config import ModelConfig

    assert ModelConfig().trust_remote_code is False


class Boom:
    def __reduce__(self):
        return (Path("/tmp/postlab-pwned").touch, ())


def test_checkpoint_with_pickled_code_is_refused(tiny_llama, tmp_path):
    from postlab.checkpoint import load_checkpoint
    from postlab.models import load_lm

    data = write_pairs(tmp_path / "pairs.tsv", 8)
    run(parse_run_config(run_config(tiny_llama, tmp_path / "run", data, epochs=1, save_model=False)))
    ckpt = tmp_path / "run" / "0-sft" / "checkpoint"  # kept: the stage wrote no model/
    (ckpt / "trainer_state.pt").write_bytes(pickle.dumps({"optimizer": Boom()}))
    lm = load_lm(str(tiny_llama), device="cpu", precision="fp32")
    with pytest.raises(ModelError, match="corrupt checkpoint .*Unpickl|corrupt checkpoint .*weights_only"):
        load_checkpoint(ckpt, lm.model)
    assert not Path("/tmp/postlab-pwned").exists()


def test_remote_code_is_not_run_unless_asked(tiny_llama, tmp_path):
    import shutil

    from postlab.models import load_lm

    d = tmp_path / "custom"
    shutil.copytree(tiny_llama, d)
    marker = tmp_path / "ran"
    (d / "custom_model.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    cfg = json.loads((d / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "custom_model.Config", "AutoModelForCausalLM": "custom_model.Model"}
    (d / "config.json").write_text(json.dumps(cfg))
    try:
        load_lm(str(d), device="cpu", precision="fp32")
    except ModelError:
        pass  # refusing is fine; running the code is not
    assert not marker.exists()


# --- fuzzing: random small configs and data files either train or fail with one of our errors ---------
TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=20)


@st.composite
def tsv_files(draw) -> str:
    rows = ["id\tsentence1\tsentence2\tis_duplicate"] if draw(st.integers(0, 4)) else []  # 1 in 5: no header
    for i in range(draw(st.integers(0, 6))):
        label = draw(st.sampled_from(["0", "1", "1", "0", "2", "", "yes"]))
        q1, q2 = draw(TEXT), draw(TEXT)
        sep = draw(st.sampled_from(["\t", "\t", "\t", ","]))
        rows.append(sep.join([f"p{i}", q1.replace("\n", " "), q2.replace("\n", " "), label]))
    return "\n".join(rows) + draw(st.sampled_from(["\n", "", "\r\n"]))


@st.composite
def stage_trees(draw) -> dict:
    stage = {"name": "s", "epochs": draw(st.integers(0, 2)), "log_every": 1, "eval_at_start": draw(st.booleans()),
             "objective": {"name": draw(st.sampled_from(["nll", "dft", "dpo", "chi2", "ipo", "nope"]))},
             "optim": {"lr": draw(st.sampled_from([1e-3, 0.0, -1.0, 1e9])),
                       "batch_size": draw(st.integers(-1, 5))}}
    if draw(st.booleans()):
        stage["parameterization"] = {"method": draw(st.sampled_from(["fft", "lora", "qlora"])),
                                     "lora": {"r": draw(st.integers(0, 4))}}
    if draw(st.booleans()):
        stage[draw(st.sampled_from(["max_steps", "unknown_key", "eval_every_steps"]))] = draw(st.integers(-1, 3))
    return stage


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(data=tsv_files(), stage=stage_trees())
def test_fuzz_configs_and_data_train_or_fail_clearly(data, stage, tiny_llama, tmp_path_factory, capsys):
    tmp = tmp_path_factory.mktemp("fuzz")
    (tmp / "train.tsv").write_text(data, encoding="utf-8")
    stage["task"] = {"name": "paraphrase", "train": str(tmp / "train.tsv"), "dev": str(tmp / "train.tsv"), "dev_limit": 4}
    tree = {"model": {"name": str(tiny_llama), "device": "cpu", "precision": "fp32"}, "output_dir": str(tmp / "run"), "reuse_stages": False, "stages": [stage]}
    (tmp / "c.yaml").write_text(yaml.safe_dump(tree))
    rc = main(["train", str(tmp / "c.yaml")])  # any other exception fails the test
    err = capsys.readouterr().err
    assert rc in (0, 2)
    if rc == 2:
        assert err.startswith("error: ") and "Traceback" not in err
    else:
        assert (tmp / "run" / "result.json").is_file()


def test_resume_accepts_a_config_saved_before_a_field_was_added(tiny_llama, tmp_path):
    """A run saved by an older postlab (its config.yaml lacks a field added since, at its default)
    resumes; a real change of a value is still refused."""
    data = write_pairs(tmp_path / "pairs.tsv", 8)
    cfg = parse_run_config(run_config(tiny_llama, tmp_path / "run", data, epochs=1))
    run(cfg)
    saved = tmp_path / "run" / "config.yaml"
    tree = yaml.safe_load(saved.read_text())
    del tree["stages"][0]["teacher"]  # as written before `teacher` existed
    saved.write_text(yaml.safe_dump(tree))
    (tmp_path / "run" / "result.json").unlink()
    assert run(cfg, resume=True)["stages"][0]["name"] == "sft"
    changed = parse_run_config(run_config(tiny_llama, tmp_path / "run", data, epochs=2))
    (tmp_path / "run" / "result.json").unlink()
    from postlab.errors import ConfigError

    with pytest.raises(ConfigError, match="differs from the config given"):
        run(changed, resume=True)


def test_a_failed_checkpoint_write_says_so_and_keeps_the_previous_one(tiny_llama, tmp_path, monkeypatch):
    """A full disk mid-save (simulated: torch.save raises as it does with ENOSPC) gives a clear error,
    leaves no temporary directory, and the previous checkpoint still resumes."""
    import postlab.checkpoint as ck

    data = write_pairs(tmp_path / "pairs.tsv", 24)
    cfg = parse_run_config(run_config(tiny_llama, tmp_path / "run", data, save_every_steps=2, eval_at_start=False))
    real, calls = ck.torch.save, {"n": 0}

    def failing_save(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 113315072 vs 113314960")
        return real(*a, **k)

    monkeypatch.setattr(ck.torch, "save", failing_save)
    with pytest.raises(TrainingError, match=r"could not write the checkpoint .*GiB free .*rerun with --resume"):
        run(cfg)
    stage = tmp_path / "run" / "0-sft"
    assert json.loads((stage / "checkpoint" / "state.json").read_text())["step"] == 2
    assert not list(stage.glob(".checkpoint.tmp-*"))
    monkeypatch.setattr(ck.torch, "save", real)
    assert run(cfg, resume=True)["stages"][0]["steps"] == 12
