"""The real embedded model (slow: converts the GGUF once, ~40 s, then loads 135M parameters)."""
from __future__ import annotations

import pytest
import torch

from postlab.config import ParameterizationConfig, TaskConfig
from postlab.models import embedded_model_dir, load_lm
from postlab.parameterizations import count_parameters, prepare
from postlab.tasks import get_task

pytestmark = pytest.mark.slow


def test_embedded_model_converts_and_loads_as_plain_llama():
    d = embedded_model_dir("smollm2-135m")
    assert (d / "model.safetensors").is_file() and (d / "tokenizer_config.json").is_file()
    lm = load_lm("smollm2-135m", precision="fp32")
    assert type(lm.model).__name__ == "LlamaForCausalLM"
    assert count_parameters(lm.model) == (134_515_008, 134_515_008)
    assert lm.tokenizer.pad_token is not None
    lora, _ = prepare(lm.model, ParameterizationConfig(method="lora"))
    trainable, total = count_parameters(lora)
    assert 0 < trainable < 0.05 * total


def test_embedded_model_scores_paraphrase_dev(data_dir):
    lm = load_lm("smollm2-135m", precision="fp32")
    task = get_task(TaskConfig(name="paraphrase", dev=str(data_dir / "quora" / "quora-dev.tsv"), dev_limit=16))
    m = task.evaluate(lm, batch_size=16)
    assert m["n"] == 16 and 0 <= m["accuracy"] <= 1
    with torch.no_grad():
        out = lm.model(torch.tensor([lm.tokenizer("The capital of France is").input_ids]))
    assert lm.tokenizer.decode(out.logits[0, -1].argmax()) .strip() == "Paris"
