"""`postlab merge` (soups, ExPO; FFT checkpoints and LoRA adapters) and `postlab diagnose`."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import build_tiny_model
from helpers import write_pairs
from postlab.cli import main


def weights(path: Path) -> dict[str, torch.Tensor]:
    return AutoModelForCausalLM.from_pretrained(path).state_dict()


@pytest.fixture(scope="module")
def three_llamas(tmp_path_factory, tokenizer_dir) -> list[Path]:
    return [build_tiny_model(tmp_path_factory.mktemp(f"llama{s}"), "llama", tokenizer_dir, seed=s) for s in range(3)]


def test_soup_is_the_weighted_average_and_loads_in_transformers(three_llamas, tmp_path):
    a, b, c = (weights(p) for p in three_llamas)
    assert main(["merge", "soup", *map(str, three_llamas), "--out", str(tmp_path / "uniform")]) == 0
    got = weights(tmp_path / "uniform")  # plain transformers load
    for k in a:
        assert torch.allclose(got[k], (a[k] + b[k] + c[k]) / 3, atol=1e-6), k
    assert main(["merge", "soup", str(three_llamas[0]), str(three_llamas[1]), "--weights", "3", "1",
                 "--out", str(tmp_path / "weighted")]) == 0
    got = weights(tmp_path / "weighted")
    assert all(torch.allclose(got[k], 0.75 * a[k] + 0.25 * b[k], atol=1e-6) for k in a)
    note = json.loads((tmp_path / "weighted" / "postlab_merge.json").read_text())
    assert note["coefficients"] == [0.75, 0.25]


@pytest.mark.parametrize("lam", [0.0, 1.0, 2.0])
def test_expo_extrapolates_from_sft_through_dpo(three_llamas, tmp_path, lam):
    sft, dpo = weights(three_llamas[0]), weights(three_llamas[1])
    assert main(["merge", "expo", "--sft", str(three_llamas[0]), "--dpo", str(three_llamas[1]), "--lam", str(lam),
                 "--out", str(tmp_path / "expo")]) == 0
    got = weights(tmp_path / "expo")
    assert all(torch.allclose(got[k], sft[k] + lam * (dpo[k] - sft[k]), atol=1e-5) for k in sft)


def test_merge_takes_lora_adapters_merged_and_the_output_evaluates(three_llamas, tmp_path, capsys):
    from peft import LoraConfig, get_peft_model

    base = three_llamas[0]
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.peft_config["default"].base_model_name_or_path = str(base)
    model.save_pretrained(tmp_path / "adapter")
    merged = model.merge_and_unload().state_dict()
    plain = weights(base)
    assert main(["merge", "soup", str(tmp_path / "adapter"), str(base), "--out", str(tmp_path / "soup")]) == 0
    got = weights(tmp_path / "soup")
    assert any(not torch.equal(merged[k], plain[k]) for k in plain)  # the adapter did change something
    assert all(torch.allclose(got[k], (merged[k] + plain[k]) / 2, atol=1e-6) for k in plain)
    data = write_pairs(tmp_path / "pairs.tsv", 8)
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "soup"), "--task", "paraphrase", "--dev", str(data), "--precision", "fp32"]) == 0
    soup_metrics = json.loads(capsys.readouterr().out)
    assert soup_metrics["n"] == 8 and (soup_metrics["accuracy"] * 8).is_integer()


def test_merge_refuses_different_architectures(three_llamas, tmp_path, tokenizer_dir, capsys):
    gpt2 = build_tiny_model(tmp_path / "gpt2", "gpt2", tokenizer_dir)
    assert main(["merge", "soup", str(three_llamas[0]), str(gpt2), "--out", str(tmp_path / "x")]) == 2
    assert "same base architecture" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_diagnose_rewards_kl_and_plot(three_llamas, tmp_path, capsys):
    from postlab.config import TaskConfig
    from postlab.data import tokenize
    from postlab.diagnose import diagnose
    from postlab.models import load_lm
    from postlab.tasks import get_task

    data = write_pairs(tmp_path / "pairs.tsv", 6)
    pairs = get_task(TaskConfig(name="paraphrase", dev=str(data))).preference_pairs("dev")
    ref = load_lm(str(three_llamas[0]), device="cpu", precision="fp32")
    same = diagnose(load_lm(str(three_llamas[0]), device="cpu", precision="fp32"), ref, pairs, 0.1, tmp_path / "same", n_plot=2)
    assert same["kl_per_token"] == pytest.approx(0.0, abs=1e-6) and same["reward_margin"] == pytest.approx(0.0, abs=1e-6)
    other = load_lm(str(three_llamas[1]), device="cpu", precision="fp32")
    s = diagnose(other, ref, pairs, 0.5, tmp_path / "other", n_plot=2)
    rows = [json.loads(l) for l in (tmp_path / "other" / "per_example.jsonl").read_text().splitlines()]
    assert len(rows) == 6 == s["pairs"]
    assert s["reward_accuracy"] == pytest.approx(sum(r["margin"] > 0 for r in rows) / 6)
    r0 = rows[0]
    assert r0["reward_chosen"] == pytest.approx(0.5 * (r0["logp_chosen"] - r0["ref_logp_chosen"]), rel=1e-5)
    # KL by hand: full softmaxes of both models at the last prompt position of each pair
    items, _ = tokenize(pairs, ref.tokenizer, 512, append_eos=False)
    kls = []
    with torch.no_grad():
        for it in items:
            ids = torch.tensor([it.prompt])
            p = torch.log_softmax(other.model(ids).logits[0, -1], -1)
            q = torch.log_softmax(ref.model(ids).logits[0, -1], -1)
            kls.append(float((p.exp() * (p - q)).sum()))
    assert s["kl_per_token"] == pytest.approx(sum(kls) / len(kls), rel=1e-2)  # batched vs single rows and s["kl_per_token"] > 0
    assert (tmp_path / "other" / "q_view.png").stat().st_size > 1000
    # the command line, with a prompt/chosen/rejected file
    f = tmp_path / "pairs.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"Q{i}:", "chosen": " good answer", "rejected": " bad"}) + "\n"
                         for i in range(3)))
    capsys.readouterr()
    assert main(["diagnose", str(three_llamas[1]), "--reference", str(three_llamas[0]), "--pairs", str(f),
                 "--out", str(tmp_path / "cli"), "--precision", "fp32"]) == 0
    assert "reward accuracy" in capsys.readouterr().out
    assert json.loads((tmp_path / "cli" / "summary.json").read_text())["pairs"] == 3


@pytest.mark.parametrize("method", ["fft", "lora"])
def test_expo_lambda_stage_option_extrapolates_the_stage_update(tiny_llama, tmp_path, method):
    from helpers import run_config
    from postlab.config import parse_run_config
    from postlab.run import run

    data = write_pairs(tmp_path / "pairs.tsv", 8)
    param = {"method": method, **({"lora": {"r": 4}} if method == "lora" else {})}
    models = {}
    for lam in (None, 2.5):
        out = tmp_path / f"run-{lam}"
        run(parse_run_config(run_config(tiny_llama, out, data, epochs=1, expo_lambda=lam, parameterization=param)))
        models[lam] = out / "0-sft" / "model"
    if method == "fft":
        start, end, got = weights(tiny_llama), weights(models[None]), weights(models[2.5])
        assert any(not torch.equal(start[k], end[k]) for k in start)
        assert all(torch.allclose(got[k], start[k] + 2.5 * (end[k] - start[k]), atol=1e-5) for k in start)
    else:  # the adapter's update B·A is scaled by λ: B scaled, A as trained
        end = load_file(str(models[None] / "adapter_model.safetensors"))
        got = load_file(str(models[2.5] / "adapter_model.safetensors"))
        for k in end:
            assert torch.allclose(got[k], end[k] * (2.5 if "lora_B" in k else 1.0), atol=1e-6), k
    rows = [json.loads(l) for l in (tmp_path / "run-2.5" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["expo_lambda"] == 2.5 and "accuracy" in rows[-1]


@pytest.mark.parametrize("method", ["uniform", "block-influence"])
def test_prune_drops_layers_and_loads_in_transformers(tiny_llama, tmp_path, capsys, method):
    from conftest import build_tiny_model
    from postlab.models import load_lm
    from postlab.prune import block_influence

    deep = build_tiny_model(tmp_path / "deep", "llama", tiny_llama, seed=3)
    cfg = json.loads((deep / "config.json").read_text())
    cfg["num_hidden_layers"] = 5
    (deep / "config.json").write_text(json.dumps(cfg))
    from transformers import LlamaForCausalLM

    LlamaForCausalLM.from_pretrained(deep).save_pretrained(deep)  # 5 layers (2 trained + 3 fresh)
    prompts = tmp_path / "calib.txt"
    prompts.write_text("How do I learn physics?\n\nWhat is the best way to cook rice?\n\nShall I compare thee")
    assert main(["prune", str(deep), "--drop", "0.4", "--method", method, "--prompt-file", str(prompts),
                 "--out", str(tmp_path / "pruned")]) == 0
    assert "5 -> 3 layers" in capsys.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")  # plain transformers
    assert model.config.num_hidden_layers == 3 and len(model.model.layers) == 3
    assert [l.self_attn.layer_idx for l in model.model.layers] == [0, 1, 2]
    report = json.loads((tmp_path / "pruned" / "prune.json").read_text())
    assert report["params_after"] == sum(p.numel() for p in model.parameters()) < report["params_before"]
    if method == "uniform":
        assert report["dropped"] == [1, 3]
    else:  # the two layers with the lowest block influence are the ones removed
        bi = block_influence(load_lm(str(deep), device="cpu", precision="fp32"), prompts.read_text().split("\n\n"))
        assert report["dropped"] == sorted(sorted(range(5), key=lambda i: bi[i])[:2])
        assert report["block_influence"] == pytest.approx(bi)
    out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False)  # cache indices consistent
    assert out.shape == (1, 6)
