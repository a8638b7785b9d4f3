"""Preference pairs built from samples (sonnets): chosen = the true continuation, rejected = sampled
continuations (same-sonnet or top-k by chrF), seeded and cached on disk; built from training data
only (no dev example leaks in); the sampler is the stage-start model, the base model or a path; and
an SFT->DPO run on sonnets end to end. Tiny random models only."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

import postlab.generate as sampler_module
import postlab.preferences as prefs
from postlab.cache import weights_hash
from postlab.config import GenerationConfig, PairsConfig, StageConfig, TaskConfig, parse_run_config
from postlab.errors import ConfigError
from postlab.metrics import sentence_chrf as chrf
from postlab.models import load_lm
from postlab.preferences import build_pairs, draw_seed
from postlab.tasks import get_task
from postlab.tasks.sonnets import cut_continuation

GEN = {"max_new_tokens": 6, "batch_size": 4, "seed": 0}


@pytest.fixture
def sonnet_files(data_dir) -> dict[str, str]:
    d = data_dir / "sonnets"
    return {"train": str(d / "sonnets.txt"), "dev": str(d / "sonnets_held_out_dev.txt"),
            "dev_reference": str(d / "TRUE_sonnets_held_out_dev.txt")}


@pytest.fixture
def sonnets(sonnet_files):
    return get_task(TaskConfig(name="sonnets", train_limit=4, **sonnet_files))


@pytest.fixture(scope="module")
def lm(tiny_llama):
    return load_lm(str(tiny_llama), device="cpu", precision="fp32")


def pairs_cfg(**kw) -> PairsConfig:
    gen = {**GEN, **kw.pop("generation", {})}
    return PairsConfig(generation=GenerationConfig(**gen), **kw)


def cache_files(d: Path) -> list[Path]:
    return sorted(d.glob("*.json"))


def test_config_validation():
    with pytest.raises(ValidationError, match="n must be >= k"):
        PairsConfig(strategy="top-k", k=3, n=2)
    PairsConfig(strategy="top-k", k=2, n=2)
    PairsConfig(strategy="same-sonnet", k=6)  # n only counts for top-k
    with pytest.raises(ValidationError):
        PairsConfig(k=0)
    with pytest.raises(ValidationError):
        PairsConfig(strategy="best-of")
    with pytest.raises(ValidationError, match="greedy"):
        PairsConfig(k=2, generation={"greedy": True})
    assert PairsConfig(rejected_from="runs/x/0-sft/model").rejected_from == "runs/x/0-sft/model"
    with pytest.raises(ConfigError, match=r"stages\.0\.task\.pairs\.kk: unknown key"):
        parse_run_config({"stages": [{"task": {"name": "sonnets", "pairs": {"kk": 1}}}]})
    cfg = parse_run_config({"stages": [{"task": {"name": "sonnets", "pairs": {"strategy": "top-k", "k": 2, "n": 5}}}]})
    assert cfg.stages[0].task.pairs.n == 5


def test_same_sonnet_k_pairs_per_sonnet(sonnets, lm, tmp_path):
    cfg = pairs_cfg(k=2)
    pairs = build_pairs(sonnets, cfg, lm, tmp_path)
    examples = sonnets.train_examples()
    assert len(examples) == 4 and len(pairs) == 8
    (cache,) = cache_files(tmp_path)
    samples = json.loads(cache.read_text())["samples"]
    for i, ex in enumerate(examples):
        mine = [p for p in pairs if p.id.startswith(f"{ex.id}/")]
        assert [p.id for p in mine] == [f"{ex.id}/s0", f"{ex.id}/s1"]
        assert all(p.prompt == ex.prompt and p.chosen == ex.completion for p in mine)
        # rejected = the sample cut as evaluation cuts it; the two draws differ
        assert [p.rejected for p in mine] == ["\n".join(cut_continuation(s)) for s in samples[i]]
        assert samples[i][0] != samples[i][1]


def test_top_k_keeps_lowest_chrf(sonnets, lm, tmp_path):
    cfg = pairs_cfg(strategy="top-k", k=2, n=4)
    pairs = build_pairs(sonnets, cfg, lm, tmp_path)
    (cache,) = cache_files(tmp_path)
    data = json.loads(cache.read_text())
    assert data["settings"]["strategy"] == "top-k" and all(len(s) == 4 for s in data["samples"])
    examples = sonnets.train_examples()
    assert len(pairs) == 2 * len(examples)
    for ex, raw in zip(examples, data["samples"]):
        cands = ["\n".join(cut_continuation(s)) for s in raw]
        scores = [chrf(c, ex.completion) for c in cands]
        mine = [p for p in pairs if p.id.startswith(f"{ex.id}/")]
        kept = [int(p.id.rsplit("/s", 1)[1]) for p in mine]
        assert [p.rejected for p in mine] == [cands[j] for j in kept]
        assert all(p.chosen == ex.completion for p in mine)
        assert [scores[j] for j in kept] == sorted(scores[j] for j in kept)  # lowest first
        dropped = [scores[j] for j in range(4) if j not in kept]
        assert max(scores[j] for j in kept) <= min(dropped)
        assert sorted(scores)[:2] == [scores[j] for j in kept]


def test_selection_by_score():
    cfg = PairsConfig(strategy="top-k", k=2, n=4)
    truth = "the quick brown fox"
    cands = ["the quick brown fox jumps", "zzz", "the quick", "qqq"]
    picked = prefs.select_rejected(cands, truth, cfg, chrf)
    assert [j for j, _ in picked] == sorted([1, 3], key=lambda j: (chrf(cands[j], truth), j))
    assert prefs.select_rejected(cands, truth, PairsConfig(k=4), chrf) == list(enumerate(cands))


def test_deterministic_and_cache_reused(sonnets, lm, tmp_path, monkeypatch, caplog):
    cfg = pairs_cfg(k=2)
    a = build_pairs(sonnets, cfg, lm, tmp_path / "a")
    b = build_pairs(sonnets, cfg, lm, tmp_path / "b")  # sampled afresh: same seed, same pairs
    assert a == b
    assert cache_files(tmp_path / "a")[0].name == cache_files(tmp_path / "b")[0].name

    def no_generate(*args, **kwargs):
        raise AssertionError("generate() called although the samples are cached")

    monkeypatch.setattr(sampler_module, "generate", no_generate)  # (preferences samples through it)
    with caplog.at_level(logging.INFO, logger="postlab"):
        c = build_pairs(sonnets, cfg, lm, tmp_path / "a")
    assert c == a
    assert "reusing cached samples" in caplog.text


def test_cache_key_changes_with_settings_and_model(sonnets, lm, tmp_path, tiny_llama):
    base = build_pairs(sonnets, pairs_cfg(), lm, tmp_path)
    reseeded = build_pairs(sonnets, pairs_cfg(generation={"seed": 1}), lm, tmp_path)
    assert len(cache_files(tmp_path)) == 2
    assert [p.rejected for p in base] != [p.rejected for p in reseeded]
    build_pairs(sonnets, pairs_cfg(generation={"temperature": 0.7}), lm, tmp_path)
    build_pairs(sonnets, pairs_cfg(strategy="top-k", k=1, n=1), lm, tmp_path)
    assert len(cache_files(tmp_path)) == 4
    other = load_lm(str(tiny_llama), device="cpu", precision="fp32")
    with torch.no_grad():
        next(other.model.parameters()).add_(0.01)  # another model: another key
    build_pairs(sonnets, pairs_cfg(), other, tmp_path)
    assert len(cache_files(tmp_path)) == 5
    # draw seeds: distinct per draw, deterministic, seed 1 draw 0 is not seed 0 draw 1
    assert draw_seed(0, 0) == 0 and draw_seed(0, 1) == draw_seed(0, 1) != 1
    assert len({draw_seed(s, j) for s in range(5) for j in range(5)}) == 25


def test_corrupt_cache_is_resampled(sonnets, lm, tmp_path, caplog):
    cfg = pairs_cfg()
    first = build_pairs(sonnets, cfg, lm, tmp_path)
    (cache,) = cache_files(tmp_path)
    cache.write_text(cache.read_text()[:50])
    with caplog.at_level(logging.WARNING, logger="postlab"):
        again = build_pairs(sonnets, cfg, lm, tmp_path)
    assert again == first and "sampling again" in caplog.text
    json.loads(cache.read_text())  # rewritten whole


def test_no_dev_leak_sonnets(sonnet_files, lm, tmp_path, monkeypatch):
    task = get_task(TaskConfig(name="sonnets", **sonnet_files))  # all 131 training sonnets
    dev = task.dev_examples()
    assert len(dev) == 12
    seen_prompts: list[str] = []
    real = sampler_module.generate

    def spy(lm_, prompts, cfg, desc=None):
        seen_prompts.extend(prompts)
        return real(lm_, prompts, cfg, desc=desc)

    monkeypatch.setattr(sampler_module, "generate", spy)
    pairs = build_pairs(task, pairs_cfg(generation={"max_new_tokens": 3, "batch_size": 32}), lm, tmp_path)
    assert len(pairs) == 131
    dev_texts = [d.prompt for d in dev] + [d.completion for d in dev]
    dev_lines = {line.strip() for d in dev for line in (d.prompt + d.completion).splitlines() if line.strip()}
    for p in pairs:
        for text in dev_texts:
            assert text not in p.prompt and text not in p.chosen
            assert p.prompt not in text and p.chosen not in text
        assert not dev_lines & {line.strip() for line in (p.prompt + p.chosen).splitlines()}
    assert not {d.id for d in dev} & {p.id.split("/")[0] for p in pairs}
    assert seen_prompts and not set(seen_prompts) & {d.prompt for d in dev}  # the sampler saw train prompts only
    assert set(seen_prompts) == {e.prompt for e in task.train_examples()}


def test_no_dev_leak_paraphrase(data_dir, tmp_path):
    q = data_dir / "quora"
    task = get_task(TaskConfig(name="paraphrase", train=str(q / "quora-train.tsv"), dev=str(q / "quora-dev.tsv")))
    pairs = build_pairs(task, PairsConfig(), None, tmp_path)
    dev = task.dev_examples()
    assert len(pairs) == 15212 and len(dev) == 2000
    assert not {p.id for p in pairs} & {d.id for d in dev}
    assert not {p.prompt for p in pairs} & {d.prompt for d in dev}
    assert all({p.chosen, p.rejected} == {" yes", " no"} for p in pairs)
    assert not cache_files(tmp_path)  # nothing sampled


def stage(rejected_from: str, sonnet_files: dict) -> StageConfig:
    return StageConfig(name="dpo", objective={"name": "dpo"},
                       task={"name": "sonnets", "train_limit": 2, **sonnet_files,
                             "pairs": {"rejected_from": rejected_from, "generation": GEN}})


def sampler_hash(home: Path, before: set[Path]) -> str:
    (new,) = set((home / "cache" / "samples").glob("*.json")) - before
    return json.loads(new.read_text())["sampler"]["weights"]


def test_stage_items_picks_the_sampler(tiny_llama, sonnet_files, tmp_path, monkeypatch):
    from postlab.config import ModelConfig
    from postlab.stage import stage_items

    monkeypatch.setenv("POSTLAB_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("POSTLAB_CACHE", str(tmp_path / "home" / "cache"))
    home = tmp_path / "home"
    base_hash = weights_hash(load_lm(str(tiny_llama), device="cpu", precision="fp32").model)
    policy = load_lm(str(tiny_llama), device="cpu", precision="fp32")
    with torch.no_grad():  # stands in for an SFT stage that changed the weights
        for p in policy.model.parameters():
            p.add_(0.01)
    policy_hash = weights_hash(policy.model)
    other = load_lm(str(tiny_llama), device="cpu", precision="fp32")  # a checkpoint named by path
    with torch.no_grad():
        next(other.model.parameters()).mul_(2.0)
    ckpt = tmp_path / "ckpt"
    other.model.save_pretrained(ckpt)
    other.tokenizer.save_pretrained(ckpt)
    other_hash = weights_hash(other.model)
    mcfg = ModelConfig(name=str(tiny_llama), device="cpu", precision="fp32")

    seen: set[Path] = set()
    for source, expected in [("stage-start", policy_hash), ("base", base_hash), (str(ckpt), other_hash)]:
        task, items = stage_items(policy, stage(source, sonnet_files), mcfg)
        assert len(items) == 2 and len(items[0].completions) == 2
        assert sampler_hash(home, seen) == expected, source
        seen = set((home / "cache" / "samples").glob("*.json"))
    with pytest.raises(ConfigError, match="rejected_from=base"):
        stage_items(policy, stage("base", sonnet_files))


def test_sft_then_dpo_run_on_sonnets(tiny_llama, sonnet_files, tmp_path, monkeypatch):
    from postlab.run import run

    monkeypatch.setenv("POSTLAB_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("POSTLAB_CACHE", str(tmp_path / "home" / "cache"))
    task = {"name": "sonnets", "train_limit": 4, "dev_limit": 2, **sonnet_files,
            "generation": {"max_new_tokens": 8, "batch_size": 4}, "pairs": {"generation": {"max_new_tokens": 8}}}
    common = {"task": task, "optim": {"lr": 1e-3, "batch_size": 4}, "epochs": 1, "log_every": 1}
    stages = [{"name": "sft", **common}, {"name": "dpo", "objective": {"name": "dpo"}, **common}]
    cfg = parse_run_config({"model": {"name": str(tiny_llama), "device": "cpu", "precision": "fp32"}, "output_dir": str(tmp_path / "run"),
                            "stages": stages})
    result = run(cfg)
    saved = json.loads((tmp_path / "run" / "result.json").read_text())
    assert [s["name"] for s in saved["stages"]] == ["sft", "dpo"] == [s["name"] for s in result["stages"]]
    assert saved["stages"][1]["objective"] == "dpo" and saved["stages"][1]["examples"] == 4
    assert "chrf" in saved["metrics"]
    # stage-start: the rejected answers were sampled from the SFT model, not the base model
    (cache,) = (tmp_path / "home" / "cache" / "samples").glob("*.json")
    sampler = json.loads(cache.read_text())["sampler"]["weights"]
    assert sampler == weights_hash(load_lm(str(tmp_path / "run" / "0-sft" / "model"), device="cpu", precision="fp32").model)
    assert sampler != weights_hash(load_lm(str(tiny_llama), device="cpu", precision="fp32").model)
    recs = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("stage") == "dpo" and "loss" in r for r in recs)
