"""Configs are validated before any model loads; bad input gives one clear error naming the key or file."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from postlab.config import TaskConfig, apply_overrides, load_run_config, parse_run_config
from postlab.errors import ConfigError, DataError
from postlab.tasks import get_task


def write(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_unknown_key_names_the_key(tmp_path):
    p = write(tmp_path, "stages:\n  - name: sft\n    optim: {lr: 1e-4, learning_rate: 3}\n")
    with pytest.raises(ConfigError, match=r"stages\.0\.optim\.learning_rate: unknown key"):
        load_run_config(p)


@pytest.mark.parametrize("text,where", [
    ("stages:\n  - optim: {lr: -1}\n", r"stages\.0\.optim\.lr"),
    ("stages:\n  - epochs: many\n", r"stages\.0\.epochs"),
    ("seed: [1]\n", r"seed"),
    ("stages:\n  - objective: {name: nope}\n", r"objective: unknown name 'nope'"),
    ("stages:\n  - objective: {name: dpo, betta: 0.1}\n", r"betta"),
    ("stages:\n  - parameterization: {method: qlora}\n", r"parameterization\.method"),
    ("stages: []\n", r"stages"),
    ("stages:\n  - {name: a}\n  - {name: a}\n", r"unique"),
])
def test_bad_values_name_the_field(tmp_path, text, where):
    with pytest.raises(ConfigError, match=where):
        load_run_config(write(tmp_path, text))


def test_not_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_run_config(write(tmp_path, "stages: [\n"))
    with pytest.raises(ConfigError, match="not found"):
        load_run_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="mapping"):
        load_run_config(write(tmp_path, "- 1\n- 2\n"))


def test_overrides_apply_to_every_stage_or_one():
    tree = {"stages": [{"name": "a"}, {"name": "b"}]}
    apply_overrides(tree, ["optim.lr=1e-4", "stages.1.epochs=3", "seed=5"])
    cfg = parse_run_config(tree)
    assert [s.optim.lr for s in cfg.stages] == [1e-4, 1e-4]
    assert [s.epochs for s in cfg.stages] == [1, 3] and cfg.seed == 5
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["optim.lr"])
    with pytest.raises(ConfigError, match="not a valid index"):
        apply_overrides({"stages": [{}]}, ["stages.4.epochs=1"])


def test_shipped_configs_validate():
    for p in sorted((Path(__file__).parents[1] / "configs").glob("*.yaml")):
        load_run_config(p)


@pytest.mark.parametrize("content,match", [
    ("", "empty"),
    ("id\tsentence1\tsentence2\n1\ta\tb\n", "lacks the columns"),
    ("id\tsentence1\tsentence2\tis_duplicate\n1\ta\tb\tmaybe\n", r"line 2: is_duplicate must be 0 or 1"),
    ("id\tsentence1\tsentence2\tis_duplicate\n1\ta\tb\n", r"line 2: 3 fields"),
    ("id\tsentence1\tsentence2\tis_duplicate\n", "no data rows"),
])
def test_malformed_paraphrase_files(tmp_path, content, match):
    p = write(tmp_path, content, "q.tsv")
    with pytest.raises(DataError, match=match) as e:
        get_task(TaskConfig(name="paraphrase", train=str(p))).train_examples()
    assert str(p) in str(e.value) or match == "empty"


def test_paraphrase_reads_glue_columns_and_non_utf8_is_refused(tmp_path):
    glue = write(tmp_path, "question1,question2,label\nIs it?,Is it so?,1\n", "g.csv")
    ex = get_task(TaskConfig(name="paraphrase", train=str(glue))).train_examples()
    assert ex[0].completion == " yes" and "Is it so?" in ex[0].prompt
    bad = tmp_path / "b.tsv"
    bad.write_bytes(b"id\tsentence1\tsentence2\tis_duplicate\n1\t\xff\xfe\tb\t0\n")
    with pytest.raises(DataError, match="not UTF-8"):
        get_task(TaskConfig(name="paraphrase", train=str(bad))).train_examples()


def test_overlong_example_refused_or_truncated(tiny_llama):
    from postlab.data import Example, tokenize
    from postlab.models import load_tokenizer

    tok = load_tokenizer(str(tiny_llama))
    ex = [Example("word " * 100, " yes")]
    with pytest.raises(DataError, match="overlength: truncate"):
        tokenize(ex, tok, 32, "refuse", append_eos=False)
    items, report = tokenize(ex, tok, 32, "truncate", append_eos=False)
    assert report.truncated == 1 and items[0].length == 32


def test_cli_reports_config_errors_without_traceback(tmp_path):
    p = write(tmp_path, "stages:\n  - optim: {lrr: 1}\n")
    r = subprocess.run([sys.executable, "-m", "postlab", "train", str(p)], capture_output=True, text=True)
    assert r.returncode == 2
    assert "stages.0.optim.lrr: unknown key" in r.stderr and "Traceback" not in r.stderr


def test_missing_model_is_a_clear_error(tmp_path):
    from postlab.errors import ModelError
    from postlab.models import load_lm

    with pytest.raises(ModelError, match="not found"):
        load_lm(str(tmp_path / "no-such-model"), device="cpu", precision="fp32")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="cannot load model"):
        load_lm(str(tmp_path / "empty"), device="cpu", precision="fp32")


@pytest.mark.auto_precision
@pytest.mark.parametrize("fast_bf16,expected", [(True, "bf16"), (False, "fp32")])
def test_precision_auto_follows_the_cpu_and_stated_precisions_do_not(monkeypatch, fast_bf16, expected):
    """`auto` is bf16 where the CPU has native bf16 matmuls (AVX-512 BF16 or AMX) and fp32 elsewhere
    (CPU flags fixed here, whatever the machine); a stated precision is used as stated."""
    import torch

    from postlab import models

    monkeypatch.setattr(models, "cpu_has_fast_bf16", lambda: fast_bf16)
    assert models.resolve_precision("auto", torch.device("cpu")) == expected
    for stated in ("fp32", "bf16"):
        assert models.resolve_precision(stated, torch.device("cpu")) == stated


@pytest.mark.parametrize("fast_bf16,precision,warned", [(False, "bf16", True), (True, "bf16", False),
                                                        (False, "fp32", False)])
def test_stated_bf16_on_a_cpu_without_native_bf16_is_warned(monkeypatch, caplog, tiny_llama, fast_bf16, precision,
                                                           warned):
    """bf16 stated on a CPU that emulates it (an AVX2-only CPU: ~150x slower matmuls than fp32) trains, with a
    warning that says so and what to set; CPU flags fixed here, device cpu."""
    import logging

    from postlab import models

    monkeypatch.setattr(models, "cpu_has_fast_bf16", lambda: fast_bf16)
    with caplog.at_level(logging.WARNING, logger="postlab"):
        lm = models.load_lm(str(tiny_llama), device="cpu", precision=precision)
    assert lm.precision == precision
    assert ("no native bf16" in caplog.text and "model.precision to auto" in caplog.text) == warned


def test_a_test_that_relies_on_precision_auto_fails_loudly(tiny_llama):
    """The suite's guard (conftest.precision_must_be_stated): no test depends on what auto resolves to."""
    from postlab.models import load_lm

    with pytest.raises(AssertionError, match="relies on precision: auto"):
        load_lm(str(tiny_llama), device="cpu")
