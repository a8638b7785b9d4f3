"""Trainable weights leave transformers' copy-on-write file mapping before training writes them
(models.own_trainable_weights, called by train_stage); frozen ones stay mapped. fp32, CPU."""
from __future__ import annotations

import torch

from helpers import run_config, write_pairs
from postlab.config import ParameterizationConfig, parse_run_config
from postlab.models import _file_mapped_ranges, load_lm, own_trainable_weights
from postlab.parameterizations import prepare
from postlab.run import run


def _mapped(params) -> list[bool]:
    ranges = _file_mapped_ranges()
    return [any(lo <= p.data_ptr() < hi for lo, hi in ranges) for p in params]


def test_trainable_weights_get_memory_of_their_own(tiny_llama):
    lm = load_lm(str(tiny_llama), device="cpu", precision="fp32")
    params = list(lm.model.parameters())
    assert all(_mapped(params))  # the premise: from_pretrained maps model.safetensors
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    assert own_trainable_weights(lm.model) == len(params)
    assert not any(_mapped(params))
    assert all(torch.equal(before[n], p) for n, p in lm.model.named_parameters())
    assert own_trainable_weights(lm.model) == 0  # nothing left to copy


def test_frozen_weights_stay_mapped_and_ties_hold(tiny_llama):
    lm = load_lm(str(tiny_llama), device="cpu", precision="fp32")
    lm.model.tie_weights()
    model, _ = prepare(lm.model, ParameterizationConfig(method="lora", lora={"r": 4}))
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert frozen and all(_mapped(frozen))
    own_trainable_weights(model)
    assert all(_mapped(frozen))

    full = load_lm(str(tiny_llama), device="cpu", precision="fp32").model
    full.get_input_embeddings().weight = full.get_output_embeddings().weight  # a tied pair, as SmolLM2's
    own_trainable_weights(full)
    assert full.get_input_embeddings().weight is full.get_output_embeddings().weight
    assert not any(_mapped([full.get_output_embeddings().weight]))


def test_a_stage_trains_weights_outside_the_file_mapping(tiny_llama, tmp_path, monkeypatch):
    """Without the copy, the trained weights would still lie in the file's mapping (copied on write
    page by page): what the stage held at its end tells."""
    import postlab.train as train_mod

    seen = []
    real = train_mod._optimizer_step

    def watching_step(loop):
        out = real(loop)
        seen.append(any(_mapped([p for p in loop.model.parameters() if p.requires_grad])))
        return out

    monkeypatch.setattr(train_mod, "_optimizer_step", watching_step)
    data = write_pairs(tmp_path / "pairs.tsv", 8)
    run(parse_run_config(run_config(tiny_llama, tmp_path / "run", data, epochs=1)))
    assert seen and not any(seen)
