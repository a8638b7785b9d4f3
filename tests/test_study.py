"""Studies: grid expansion (variants, scalar axes, exclude/include, overrides), shards, plan-time
validation, cost estimates, and study runs on tiny models that complete, record failures, and
resume after an interruption without retraining complete runs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from helpers import tiny_study, write_pairs, write_study
from postlab import study as st
from postlab.cli import main
from postlab.errors import ConfigError, DataError, TrainingError
from postlab.report import find_incomplete, load_runs
from postlab.study.estimate import estimate

REPO = Path(__file__).resolve().parents[1]


def grid_study(tmp_path: Path, model: str = "tiny", **extra) -> dict:
    data = str(tmp_path / "pairs.tsv")
    tree = {
        "name": "grid",
        "base": {"model": {"name": model, "device": "cpu", "precision": "fp32"}, "optim": {"batch_size": 4},
                 "task": {"name": "paraphrase", "train": data, "dev": data, "dev_limit": 8}},
        "axes": {
            "regime": {"sft": {"stages": [{"name": "sft"}]},
                       "dpo": {"stages": [{"name": "dpo", "objective": {"name": "dpo", "beta": 0.1}}]},
                       "sft->dpo": {"stages": [{"name": "sft", "epochs": 2},
                                               {"name": "dpo", "objective": {"name": "dpo", "beta": 0.1}}]}},
            "param": {"fft": {"parameterization": {"method": "fft"}, "by_stage": {"dpo": {"optim": {"lr": 5.0e-6}}}},
                      "lora-r8": {"parameterization": {"method": "lora", "lora": {"r": 8}}}},
            "optim.lr": [1.0e-5, 2.0e-5],
            "seed": [0, 1],
        },
    }
    tree.update(extra)
    return tree


def test_grid_expansion_variants_scalars_exclude_include(tmp_path):
    tree = grid_study(tmp_path,
                      exclude=[{"regime": "dpo", "param": "lora-r8"}, {"optim.lr": 2.0e-5, "seed": 1}],
                      include=[{"regime": "dpo", "param": "lora-r8", "seed": 0}],
                      overrides=[{"when": {"regime": "sft->dpo", "param": "lora-r8"},
                                  "set": {"by_stage": {"dpo": {"epochs": 3}}}}])
    study = st.load_study(write_study(tmp_path / "grid.yaml", tree))
    runs = st.plan(study)
    full = 3 * 2 * 2 * 2
    # exclude: dpo+lora (4 runs) and lr=2e-5+seed=1 (6 runs, 1 of them dpo+lora: 9 distinct);
    # include adds dpo+lora+seed 0 back for both lrs (2 runs)
    assert len(runs) == full - 9 + 2
    ids = [r.run_id for r in runs]
    assert len(set(ids)) == len(ids)
    assert ids[0] == "regime=sft,param=fft,lr=1e-05,seed=0"  # the dotted axis is shortened
    assert "regime=sft-to-dpo,param=lora-r8,lr=1e-05,seed=1" in ids  # '->' is made path-safe
    assert ids[-2:] == ["regime=dpo,param=lora-r8,lr=1e-05,seed=0", "regime=dpo,param=lora-r8,lr=2e-05,seed=0"]
    assert all(r.axes["seed"] == 0 for r in runs if r.axes["regime"] == "dpo" and r.axes["param"] == "lora-r8")
    assert not any(r.axes["optim.lr"] == 2.0e-5 and r.axes["seed"] == 1 for r in runs)
    by_id = {r.run_id: r for r in runs}
    r = by_id["regime=sft-to-dpo,param=fft,lr=2e-05,seed=0"]
    assert r.axes == {"regime": "sft->dpo", "param": "fft", "optim.lr": 2.0e-5, "seed": 0}
    sft, dpo = r.config.stages
    assert (sft.name, sft.epochs, dpo.name, dpo.objective.name) == ("sft", 2, "dpo", "dpo")
    # base stage keys reach stages that a variant replaced; the scalar axis reaches every stage, and
    # by_stage (applied before the later lr axis) is overridden by it
    assert sft.task.train == dpo.task.train == str(tmp_path / "pairs.tsv")
    assert sft.optim.lr == dpo.optim.lr == 2.0e-5 and sft.optim.batch_size == 4
    assert r.config.seed == 0
    lora = by_id["regime=sft-to-dpo,param=lora-r8,lr=1e-05,seed=0"].config
    assert [s.parameterization.method for s in lora.stages] == ["lora", "lora"]
    assert lora.stages[0].parameterization.model_extra["lora"]["r"] == 8
    assert [s.epochs for s in lora.stages] == [2, 3]  # the override
    assert [s.epochs for s in r.config.stages] == [2, 1]


def test_variant_axis_order_does_not_matter_and_ids_are_deterministic(tmp_path):
    tree = grid_study(tmp_path)
    axes = tree["axes"]
    del axes["param"]["fft"]["by_stage"]  # two axes setting the same stage key: the later one wins
    tree2 = {**tree, "axes": {"seed": axes["seed"], "optim.lr": axes["optim.lr"], "param": axes["param"],
                              "regime": axes["regime"]}}
    a = st.plan(st.load_study(write_study(tmp_path / "a.yaml", tree)))
    b = st.plan(st.load_study(write_study(tmp_path / "b.yaml", tree2)))
    again = st.plan(st.load_study(tmp_path / "a.yaml"))
    assert [r.run_id for r in a] == [r.run_id for r in again]
    cfg_a = {tuple(sorted((k, str(v)) for k, v in r.axes.items())): r.config.model_dump(exclude={"output_dir"})
             for r in a}
    cfg_b = {tuple(sorted((k, str(v)) for k, v in r.axes.items())): r.config.model_dump(exclude={"output_dir"})
             for r in b}
    assert cfg_a == cfg_b


def test_shards_partition_the_plan(tmp_path):
    runs = st.plan(st.load_study(write_study(tmp_path / "grid.yaml", grid_study(tmp_path))))
    for n in (1, 2, 3, 5):
        shards = [st.shard_runs(runs, st.parse_shard(f"{i}/{n}")) for i in range(n)]
        ids = [r.run_id for s in shards for r in s]
        assert sorted(ids) == sorted(r.run_id for r in runs)  # every run exactly once
        assert len(ids) == len(set(ids))
    s0, s1 = (st.shard_runs(runs, (i, 2)) for i in range(2))
    assert {r.run_id for r in s0}.isdisjoint(r.run_id for r in s1)
    assert [r.run_id for r in s0] == [r.run_id for r in st.shard_runs(runs, (0, 2))]  # deterministic
    for bad in ("2/2", "1/0", "a/b", "1"):
        with pytest.raises(ConfigError, match="--shard"):
            st.parse_shard(bad)


def test_plan_validates_every_run_and_names_run_and_key(tmp_path):
    tree = grid_study(tmp_path)
    tree["axes"]["param"]["lora-r8"]["optim"] = {"lrr": 1.0}  # a typo in one variant only
    study = st.load_study(write_study(tmp_path / "bad.yaml", tree))
    with pytest.raises(ConfigError) as e:
        st.plan(study)
    msg = str(e.value)
    assert "run regime=sft,param=lora-r8,lr=1e-05,seed=0" in msg
    assert "stages.0.optim.lrr" in msg and "unknown key" in msg
    assert "param=fft" not in msg  # valid runs are not blamed

    tree = grid_study(tmp_path)
    tree["axes"]["param"]["fft"]["by_stage"]["dpo"]["objective"] = {"name": "dpo", "beta": -1}
    with pytest.raises(ConfigError, match=r"run regime=dpo,param=fft.*\n?.*beta"):
        st.plan(st.load_study(write_study(tmp_path / "bad2.yaml", tree)))


@pytest.mark.parametrize("change, match", [
    (lambda t: t.update(axis={"seed": [0]}), "unknown key"),
    (lambda t: t.update(exclude=[{"regim": "sft"}]), "not an axis"),
    (lambda t: t.update(exclude=[{"regime": "sfft"}]), "has no variant 'sfft'"),
    (lambda t: t["axes"].update(lrr=[1, 2]), "not one"),
    (lambda t: t["axes"]["regime"]["sft"].update(stagez=[]), "stagez: unknown key"),
    (lambda t: t.update(overrides=[{"when": {"regime": "sft", "param": "fft", "seed": 5}, "set": {}}]),
     "not a value of axis 'seed'"),
    (lambda t: t["axes"]["param"]["fft"]["by_stage"].update(dpoo={"epochs": 2}), "no run with this variant"),
    (lambda t: t["base"].update(output_dir="x"), "base.output_dir"),
])
def test_study_file_errors(tmp_path, change, match):
    tree = grid_study(tmp_path)
    change(tree)
    with pytest.raises(ConfigError, match=match):
        st.plan(st.load_study(write_study(tmp_path / "s.yaml", tree)))


def test_presets_plan(capsys, monkeypatch):
    """The shipped studies expand and validate (no model is loaded; the estimate is skipped)."""
    monkeypatch.chdir(REPO)
    expected = {"quick": 12, "sft-dpo-paper": 96, "lr-reduction": 24}
    for name, n in expected.items():
        runs = st.plan(st.load_study(REPO / "studies" / f"{name}.yaml"))
        assert len(runs) == n
    quick = {r.run_id: r for r in st.plan(st.load_study(REPO / "studies" / "quick.yaml"))}
    r = quick["task=sonnets,regime=sft-to-dpo,param=lora-r8,seed=0"].config
    assert [s.optim.lr for s in r.stages] == [5.0e-4, 5.0e-5]
    assert r.stages[0].task.generation.max_new_tokens == 64
    assert [s.task.max_completion_tokens for s in r.stages] == [64, 24]
    r = quick["task=paraphrase,regime=dpo,param=fft,seed=0"].config
    assert (r.stages[0].objective.name, r.stages[0].optim.lr, r.stages[0].task.train_limit) == ("dpo", 5.0e-6, 160)


def test_plan_estimate_and_measure(tmp_path, tiny_llama, capsys):
    write_pairs(tmp_path / "pairs.tsv", n=16)
    tree = grid_study(tmp_path, model=str(tiny_llama))
    tree["axes"] = {"regime": tree["axes"]["regime"], "seed": [0]}
    path = write_study(tmp_path / "grid.yaml", tree)
    assert main(["study", "plan", str(path), "--output-dir", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "3 run(s)" in out and "regime=sft-to-dpo,seed=0" in out
    assert "sft 16x2, dpo 16x1" in out
    assert "estimates" in out and "default for" in out and "--measure" in out
    assert "tokenizer" in out  # the tiny model's directory holds a tokenizer

    runs = st.plan(st.load_study(path))
    est, notes = estimate(runs, measure=True)
    assert all(e.seconds and e.seconds > 0 and e.train_tokens > 0 for e in est)
    assert notes["measured"] and any(t.startswith("measured here") for t in notes["throughput"])
    by = {e.run.run_id: e for e in est}
    assert by["regime=sft-to-dpo,seed=0"].train_tokens > by["regime=sft,seed=0"].train_tokens


@pytest.mark.auto_precision
@pytest.mark.parametrize("flags,precision,rate,where", [
    ({"avx2", "avx512_bf16", "amx_bf16"}, "bf16", 625, "AMX"),
    ({"avx2", "avx512_bf16"}, "bf16", 230, "AVX-512 BF16"),
    ({"avx2"}, "fp32", 123, "AVX2 only"),
])
def test_default_throughput_follows_the_cpu_and_names_where_it_was_measured(monkeypatch, flags, precision, rate, where):
    """Without --measure the estimate uses the default for this CPU's bf16 support (flags fixed here,
    whatever the machine), and says which machine measured it; bf16 on a CPU without native bf16 is
    flagged as far slower."""
    from postlab import hardware
    from postlab.config import ModelConfig
    from postlab.study.estimate import default_throughput

    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset(flags))
    t = default_throughput(ModelConfig(name="m", device="cpu", precision="auto"))
    assert t.tokens_per_s == rate and where in t.source and f"in {precision}" in t.source
    assert "no native bf16" not in t.source
    if precision == "fp32":  # bf16 stated on a CPU that lacks it
        slow = default_throughput(ModelConfig(name="m", device="cpu", precision="bf16"))
        assert "no native bf16" in slow.source


def test_study_run_completes_writes_report_and_skips_on_rerun(tmp_path, tiny_llama, capsys):
    path = tiny_study(tmp_path, tiny_llama)
    out = tmp_path / "study"
    assert main(["study", "run", str(path), "--output-dir", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "4 run(s) trained, 0 already complete, 0 failed" in printed
    assert f"report: {out / 'report' / 'report.md'}" in printed
    assert (out / "study.yaml").read_text() == path.read_text()
    plan = json.loads((out / "plan.json").read_text())
    assert [p["run_id"] for p in plan["runs"]] == ["regime=sft,seed=0", "regime=sft,seed=1",
                                                   "regime=dpo,seed=0", "regime=dpo,seed=1"]
    for p in plan["runs"]:
        result = json.loads((out / "runs" / p["run_id"] / "result.json").read_text())
        assert result["axes"] == p["axes"] and result["run_id"] == p["run_id"]
        assert json.loads((out / "runs" / p["run_id"] / "axes.json").read_text()) == p["axes"]
    df = load_runs(out)
    assert len(df) == 4 and df.attrs["axes"] == ["regime", "seed"] and not df.attrs["incomplete"]
    report = (out / "report" / "report.md").read_text()
    assert "# Study report: tiny" in report and "regime" in report

    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/result.json")}
    assert main(["study", "run", str(path), "--output-dir", str(out), "--no-progress"]) == 0
    assert "0 run(s) trained, 4 already complete" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/result.json")} == mtimes

    assert main(["study", "report", str(out)]) == 0
    assert "report.md" in capsys.readouterr().out


def test_interrupted_study_resumes_without_retraining(tmp_path, tiny_llama, monkeypatch):
    """The 2nd run is interrupted mid-way (KeyboardInterrupt at its 6th optimizer step, after its
    epoch-1 checkpoint); rerunning skips run 1, resumes run 2 from its checkpoint, and runs 3."""
    import postlab.run as run_mod

    path = tiny_study(tmp_path, tiny_llama, regimes=("sft",), seeds=(0, 1, 2), epochs=2)
    study = st.load_study(path)
    out = tmp_path / "study"
    real_step = torch.optim.AdamW.step
    calls = {"n": 0, "die_at": 8 + 6}  # run 1: 2 epochs x 4 steps

    def counting_step(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == calls["die_at"]:
            raise KeyboardInterrupt
        return real_step(self, *a, **k)

    started = []
    real_run = run_mod.run

    def recording_run(cfg, resume=False):
        started.append(Path(cfg.output_dir).name)
        return real_run(cfg, resume=resume)

    monkeypatch.setattr(torch.optim.AdamW, "step", counting_step)
    monkeypatch.setattr(run_mod, "run", recording_run)
    with pytest.raises(KeyboardInterrupt):
        st.run_study(study, out, progress=False)
    first, second, third = (out / "runs" / f"regime=sft,seed={s}" for s in range(3))
    assert (first / "result.json").is_file() and not (second / "result.json").exists()
    assert (second / "0-sft" / "checkpoint").is_dir()
    assert started == [first.name, second.name]
    assert [r["run_id"] for r in find_incomplete(out)] == [second.name, third.name]
    assert find_incomplete(out)[0]["axes"] == {"regime": "sft", "seed": 1}  # from axes.json
    mtime = (first / "result.json").stat().st_mtime_ns

    # Rerun from another spelling of the same directory: the saved output_dir is brought along.
    monkeypatch.chdir(tmp_path)
    started.clear()
    calls.update(n=0, die_at=-1)
    outcome = st.run_study(st.load_study(path), Path("study"), progress=False)
    assert outcome.skipped == [first.name] and outcome.ran == [second.name, third.name] and not outcome.failed
    assert started == [second.name, third.name]  # run 1 was not retrained
    assert (first / "result.json").stat().st_mtime_ns == mtime
    assert calls["n"] == 4 + 8  # run 2 resumed at step 4 of 8; run 3 trained all 8
    assert (out / "report" / "report.md").is_file()
    assert len(load_runs(out)) == 3


def test_failed_run_is_recorded_and_study_goes_on(tmp_path, tiny_llama, monkeypatch, capsys):
    import postlab.run as run_mod

    path = tiny_study(tmp_path, tiny_llama, regimes=("sft",), seeds=(0, 1, 2))
    out = tmp_path / "study"
    real_run = run_mod.run

    def flaky_run(cfg, resume=False):
        if Path(cfg.output_dir).name == "regime=sft,seed=1":
            raise TrainingError("stage sft: loss is nan at step 3; stopped")
        return real_run(cfg, resume=resume)

    monkeypatch.setattr(run_mod, "run", flaky_run)
    assert main(["study", "run", str(path), "--output-dir", str(out), "--no-progress"]) == 1
    printed = capsys.readouterr().out
    assert "2 run(s) trained, 0 already complete, 1 failed" in printed
    assert "FAILED regime=sft,seed=1: stage sft: loss is nan" in printed
    err = (out / "runs" / "regime=sft,seed=1" / "error.txt").read_text()
    assert "TrainingError" in err and "loss is nan" in err
    report = (out / "report" / "report.md").read_text()
    assert "regime=sft,seed=1" in report and "regime=sft, seed=1" in report  # incomplete, with its axes

    monkeypatch.setattr(run_mod, "run", real_run)  # the cause is fixed: a rerun retries it
    assert main(["study", "run", str(path), "--output-dir", str(out), "--no-progress"]) == 0
    assert "1 run(s) trained, 2 already complete, 0 failed" in capsys.readouterr().out
    assert not (out / "runs" / "regime=sft,seed=1" / "error.txt").exists()


def test_sharded_runs_cover_the_study_and_skip_the_report(tmp_path, tiny_llama, capsys):
    path = tiny_study(tmp_path, tiny_llama, regimes=("sft",), seeds=(0, 1, 2))
    out = tmp_path / "study"
    assert main(["study", "run", str(path), "--output-dir", str(out), "--shard", "1/2", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "(shard 1/2)" in printed and "postlab study report" in printed
    assert sorted(p.parent.name for p in out.glob("runs/*/result.json")) == ["regime=sft,seed=1"]
    assert not (out / "report").exists()
    assert main(["study", "run", str(path), "--output-dir", str(out), "--shard", "0/2", "--no-progress"]) == 0
    capsys.readouterr()
    assert len(list(out.glob("runs/*/result.json"))) == 3
    assert main(["study", "report", str(out)]) == 0
    assert len(load_runs(out)) == 3


def test_missing_data_stops_the_study_before_training(tmp_path, tiny_llama, capsys):
    path = tiny_study(tmp_path, tiny_llama, regimes=("sft",), seeds=(0,))
    (tmp_path / "pairs.tsv").unlink()
    assert main(["study", "plan", str(path)]) == 1
    assert "data problem" in capsys.readouterr().out
    with pytest.raises(ConfigError, match=r"task paraphrase \(run regime=sft,seed=0\).*pairs.tsv"):
        st.run_study(st.load_study(path), tmp_path / "study", progress=False)
    assert not (tmp_path / "study").exists()


def test_demo_runs_a_study_on_the_data_dir_and_prints_the_main_table(tmp_path, tiny_llama, capsys, monkeypatch):
    from postlab.demo import demo

    monkeypatch.setenv("POSTLAB_DATA", "unset")  # demo() points it at --data; restored after the test
    data = tmp_path / "data"
    (data / "quora").mkdir(parents=True)
    (data / "sonnets").mkdir()
    write_pairs(data / "quora" / "quora-train.tsv", n=16)
    write_pairs(data / "quora" / "quora-dev.tsv", n=16)
    (data / "sonnets" / "sonnets.txt").write_text("1\n")
    tree = {"name": "mini",
            "base": {"model": {"name": str(tiny_llama), "device": "cpu", "precision": "fp32"}, "task": {"name": "paraphrase", "dev_limit": 8},
                     "optim": {"lr": 1.0e-3, "batch_size": 4}, "epochs": 1},
            "axes": {"regime": {"sft": {"stages": [{"name": "sft", "objective": {"name": "nll"}}]}}}}
    study = write_study(tmp_path / "mini.yaml", tree)
    assert demo(str(data), study, str(tmp_path / "out")) == 0
    out = capsys.readouterr().out
    assert "1 run(s) trained" in out
    assert out.index("Finding:") < out.index("Results (mean ± std over seeds):")  # the short summary
    table = [line for line in out.splitlines() if line.startswith("|")]
    assert table and "accuracy" in out and all(line.count("|") <= 12 for line in table)  # narrow, not every metric
    assert f"report     {tmp_path / 'out' / 'report' / 'report.md'}" in out
    result = json.loads((tmp_path / "out" / "runs" / "regime=sft" / "result.json").read_text())
    assert result["metrics"]["n"] == 8  # the dev file under --data was read

    with pytest.raises(DataError, match="no-such-dir: the shared data directory is not there"):
        demo(str(tmp_path / "no-such-dir"), study, str(tmp_path / "out2"))
    from postlab.errors import ConfigError

    with pytest.raises(ConfigError, match="quora-dev.tsv"):  # a file the study reads, found missing before training
        (data / "quora" / "quora-dev.tsv").unlink()
        demo(str(data), study, str(tmp_path / "out3"))


def test_estimate_counts_reused_stages_as_free_and_cut_completions_as_shorter(tmp_path, tiny_llama):
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Tell story {i}:", "completion": " once upon a time" * 20}) + "\n"
                            for i in range(16)))
    task = {"name": "file", "train": str(data), "dev": str(data)}
    tree = {"name": "est", "base": {"model": {"name": str(tiny_llama), "device": "cpu", "precision": "fp32"}, "optim": {"batch_size": 4}, "task": task},
            "axes": {"regime": {"sft": {"stages": [{"name": "sft"}]},
                                "sft->dpo": {"stages": [{"name": "sft"}, {"name": "dpo", "objective": {"name": "dpo"},
                                                                          "task": {"name": "file", "train": str(data)}}]},
                                "sft-cut": {"stages": [{"name": "sft", "task": {**task, "max_completion_tokens": 8}}]}}}}
    runs = st.plan(st.load_study(write_study(tmp_path / "est.yaml", tree)))
    by = {e.run.run_id: e for e in estimate(runs)[0]}
    sft, staged, cut = by["regime=sft"], by["regime=sft-to-dpo"], by["regime=sft-cut"]
    assert not sft.stages[0].reused and staged.stages[0].reused
    assert staged.stages[0].seconds == 0 and staged.stages[0].train_tokens == 0
    assert not staged.stages[1].reused and staged.stages[1].seconds > 0
    assert cut.train_tokens < sft.train_tokens / 3  # 8 of ~81 completion tokens kept
    assert "sft (reused)" in st.format_plan(st.load_study(tmp_path / "est.yaml"), runs, tmp_path, estimate(runs)[0],
                                            estimate(runs)[1])


def _results(out: Path) -> dict:
    """Per run: final metrics and every logged loss (wall-clock fields aside)."""
    res = {}
    for d in sorted((out / "runs").iterdir()):
        result = json.loads((d / "result.json").read_text())
        losses = [json.loads(x).get("loss") for x in (d / "metrics.jsonl").read_text().splitlines()]
        res[d.name] = (result["metrics"], losses)
    return res


@pytest.mark.parametrize("how", [{"workers": 2}, {"executor": "ray"}])
def test_runs_side_by_side_give_the_same_results_as_one_after_another(tmp_path, tiny_llama, how, monkeypatch):
    """4 runs (2 regimes x 2 seeds; sft->dpo shares its SFT stage with sft): in worker processes or as Ray
    tasks, the same results as in this process, and the shared SFT stage trained once per seed."""
    if how.get("executor") == "ray":
        pytest.importorskip("ray")
    regimes = {"sft": {"stages": [{"name": "sft", "objective": {"name": "nll"}}]},
               "sft->dpo": {"stages": [{"name": "sft", "objective": {"name": "nll"}},
                                       {"name": "dpo", "objective": {"name": "dpo", "beta": 0.1}}]}}
    path = tiny_study(tmp_path, tiny_llama, seeds=(0, 1))
    tree = yaml.safe_load(path.read_text())
    tree["axes"]["regime"] = regimes
    path = write_study(tmp_path / "side.yaml", tree)
    study = st.load_study(path)
    monkeypatch.setenv("POSTLAB_CACHE", str(tmp_path / "cache-one"))
    one = st.run_study(study, tmp_path / "one", progress=False, report=False)
    monkeypatch.setenv("POSTLAB_CACHE", str(tmp_path / "cache-side"))  # nothing computed before
    side = st.run_study(study, tmp_path / "side", progress=False, report=False, **how)
    assert not one.failed and not side.failed and len(side.ran) == 4
    assert _results(tmp_path / "side") == _results(tmp_path / "one")
    reused = [json.loads((tmp_path / "side" / "runs" / rid / "0-sft" / "done.json").read_text()).get("reused_from")
              for rid in side.ran]
    assert sum(r is not None for r in reused) == 2  # each seed's SFT stage trained once, reused once
