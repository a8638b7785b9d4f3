"""Parameterizations are registered building blocks: FFT, LoRA and DoRA (PEFT's use_dora) through one
interface, and a new method is one class and a registration (tiny Llama, fp32, CPU)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from helpers import final_weights, run_config, write_pairs
from postlab.cache import weights_hash
from postlab.config import ParameterizationConfig, parse_run_config
from postlab.models import load_lm
from postlab.parameterizations import REGISTRY, Parameterization, adapter_of, prepare, register
from postlab.run import run


def test_dora_stage_trains_adapter_and_magnitudes_keeps_base_and_reloads(tiny_llama, tmp_path):
    data = write_pairs(tmp_path / "pairs.tsv")
    before = load_file(str(tiny_llama / "model.safetensors"))
    result = run(parse_run_config(run_config(tiny_llama, tmp_path / "run", data, epochs=1,
                                             parameterization={"method": "dora", "dora": {"r": 4}})))
    trained = final_weights(tmp_path / "run")
    assert trained and all("lora_" in k for k in trained)
    assert any("lora_magnitude_vector" in k for k in trained)  # DoRA's magnitudes train too
    adapter_dir = tmp_path / "run" / "0-sft" / "model"
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["use_dora"] is True
    lm = load_lm(str(adapter_dir), device="cpu", precision="fp32")
    assert adapter_of(lm.model).name == "dora"
    base = lm.model.get_base_model().state_dict()
    for k, t in before.items():  # the frozen base weights are bit-identical to the originals
        key = next((b for b in base if b.replace(".base_layer.", ".") == k), None)
        if key is not None:
            assert torch.equal(base[key], t), k
    from postlab.config import TaskConfig
    from postlab.tasks import get_task

    again = get_task(TaskConfig(name="paraphrase", train=str(data), dev=str(data), dev_limit=8)).evaluate(lm)
    assert again == result["metrics"]


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_a_fresh_adapter_computes_and_hashes_like_its_base(tiny_llama, method):
    lm = load_lm(str(tiny_llama), device="cpu", precision="fp32")
    ids = torch.tensor([lm.tokenizer("How do I learn physics?").input_ids])
    with torch.no_grad():
        base_logits = lm.model(ids).logits
    base_hash = weights_hash(lm.model)
    torch.manual_seed(0)
    model, merged = prepare(lm.model, ParameterizationConfig(method=method, **{method: {"r": 4}}))
    assert not merged and adapter_of(model).name == method
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, base_logits, rtol=1e-5, atol=1e-5)
    assert weights_hash(model) == base_hash  # the base model's cached log-probs and evaluations serve it


def test_an_adapter_continues_only_under_the_same_method(tiny_llama):
    lm = load_lm(str(tiny_llama), device="cpu", precision="fp32")
    lora, _ = prepare(lm.model, ParameterizationConfig(method="lora", lora={"r": 4}))
    same, merged = prepare(lora, ParameterizationConfig(method="lora", lora={"r": 4}))
    assert same is lora and not merged
    dora, merged = prepare(lora, ParameterizationConfig(method="dora"))
    assert merged and adapter_of(dora).name == "dora"
    full, merged = prepare(dora, ParameterizationConfig(method="fft"))
    assert merged and adapter_of(full) is None and all(p.requires_grad for p in full.parameters())
    fresh, merged = prepare(lora, ParameterizationConfig(method="lora", adapter="merge"))
    assert merged and adapter_of(fresh).name == "lora"


def test_expo_on_a_dora_stage_scales_b_and_the_magnitudes(tiny_llama, tmp_path):
    data = write_pairs(tmp_path / "pairs.tsv")
    common = dict(epochs=1, parameterization={"method": "dora", "dora": {"r": 4}})
    run(parse_run_config(run_config(tiny_llama, tmp_path / "plain", data, **common)))
    run(parse_run_config(run_config(tiny_llama, tmp_path / "expo", data, expo_lambda=2.0, **common)))
    plain = load_file(str(tmp_path / "plain" / "0-sft" / "model" / "adapter_model.safetensors"))
    expo = load_file(str(tmp_path / "expo" / "0-sft" / "model" / "adapter_model.safetensors"))
    lm = load_lm(str(tiny_llama), device="cpu", precision="fp32")
    start, _ = prepare(lm.model, ParameterizationConfig(method="dora", dora={"r": 4}))
    init = {k.replace(".default.weight", "").replace(".default", ""): v.detach().clone()
            for k, v in start.state_dict().items()}  # under the adapter file's names
    magnitudes = [k for k in plain if "lora_magnitude_vector" in k]
    assert magnitudes
    for k, v in plain.items():
        if "lora_B" in k:
            torch.testing.assert_close(expo[k], 2.0 * v)  # B starts at 0: θ0 + 2(θ − θ0) = 2θ
        elif "lora_A" in k:
            torch.testing.assert_close(expo[k], v)  # A is left as trained
        else:  # the magnitudes start at ‖W‖ (whatever the seed): θ0 + 2(θ − θ0)
            torch.testing.assert_close(expo[k], init[k] + 2.0 * (v - init[k]))


class NormsOnly(Parameterization):
    """Trains only the normalization weights (a toy method for this test)."""

    name = "norms-only"

    def apply(self, model, options):
        for n, p in model.named_parameters():
            p.requires_grad_("norm" in n)
        return model


@pytest.fixture
def norms_only():
    register(NormsOnly)
    yield REGISTRY["norms-only"]
    del REGISTRY["norms-only"]


def test_a_new_method_is_one_class_and_a_registration(norms_only, tiny_llama, tmp_path):
    data = write_pairs(tmp_path / "pairs.tsv")
    run(parse_run_config(run_config(tiny_llama, tmp_path / "run", data, epochs=1,
                                    parameterization={"method": "norms-only"})))
    before = load_file(str(tiny_llama / "model.safetensors"))
    after = load_file(str(tmp_path / "run" / "0-sft" / "model" / "model.safetensors"))
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("norm" in k for k in changed)


def test_the_weights_hash_keeps_its_value(tiny_llama):
    """The cache keys of existing caches stay valid: sha256 over each function-state tensor's name and
    raw bytes in name order (fp32 and a bf16 copy, CPU)."""
    import hashlib

    from postlab.cache import function_state

    for dtype in (torch.float32, torch.bfloat16):
        model = load_lm(str(tiny_llama), device="cpu", precision="fp32").model.to(dtype)
        h = hashlib.sha256()
        for name, t in sorted(function_state(model).items()):
            h.update(name.encode())
            h.update(t.detach().contiguous().view(torch.uint8).numpy().tobytes())
        assert weights_hash(model) == h.hexdigest()
