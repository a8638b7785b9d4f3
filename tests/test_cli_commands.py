"""`postlab eval`, `generate` and `export --merge` on a tiny LoRA run."""
from __future__ import annotations

import json

import torch

from helpers import run_config, write_pairs
from postlab.cli import main
from postlab.config import parse_run_config
from postlab.run import run


def test_export_merge_eval_generate(tiny_llama, tmp_path, capsys):
    data = write_pairs(tmp_path / "pairs.tsv")
    tree = run_config(tiny_llama, tmp_path / "run", data, epochs=1, optim={"lr": 1e-2},
                      parameterization={"method": "lora", "lora": {"r": 4}})
    result = run(parse_run_config(tree))
    adapter = tmp_path / "run" / "0-sft" / "model"
    assert (adapter / "adapter_config.json").is_file()

    assert main(["export", str(adapter), "--merge", "--out", str(tmp_path / "merged")]) == 0
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("lora" in n for n, _ in merged.named_parameters())
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), adapter).eval()
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, peft_model(ids).logits, atol=1e-4, rtol=1e-4)

    capsys.readouterr()
    assert main(["eval", str(tmp_path / "merged"), "--task", "paraphrase", "--dev", str(data), "--dev-limit", "8",
                 "--reference", str(tiny_llama), "--precision", "fp32"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["accuracy"] == result["metrics"]["accuracy"]  # the merged model predicts like the adapter
    # the implicit-reward view against the base: computed on the 8 dev pairs, and it sees the training
    assert metrics["pairs"] == 8 and (metrics["reward_accuracy"] * 8).is_integer()
    assert metrics["reward_margin"] != 0 and metrics["logratio_chosen"] != 0

    assert main(["generate", str(tmp_path / "merged"), "--prompt", "Hello", "--max-new-tokens", "5", "--seed", "3", "--precision", "fp32"]) == 0
    first = capsys.readouterr().out
    main(["generate", str(tmp_path / "merged"), "--prompt", "Hello", "--max-new-tokens", "5", "--seed", "3", "--precision", "fp32"])
    assert capsys.readouterr().out == first and first.startswith("Hello")
