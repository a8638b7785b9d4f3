"""The sonnets task: Folger parser on the real files, example construction, clear errors on malformed
files, and evaluate() (perplexity, chrF, seeded generation) on a tiny random model."""
from __future__ import annotations

import math
from dataclasses import replace

import pytest

from postlab.config import GenerationConfig, TaskConfig
from postlab.errors import ConfigError, DataError
from postlab.models import load_lm
from postlab.tasks import get_task
from postlab.tasks.sonnets import cut_continuation, parse_sonnets

SONNET = "\n".join(f"line {i} of the sonnet" for i in range(1, 15))


def folger(*sonnets: tuple[int, str], header: str = "Collected verses\nby A. Poet\n\n\n") -> str:
    return header + "".join(f"{n}\n\n{text}\n\n" for n, text in sonnets)


@pytest.fixture
def files(data_dir):
    d = data_dir / "sonnets"
    return d / "sonnets.txt", d / "sonnets_held_out_dev.txt", d / "TRUE_sonnets_held_out_dev.txt"


def raw_lines_after(path, number: int) -> list[str]:
    """The file's non-blank lines between the line holding only `number` and the next number line,
    read straight from the file (no text of the data is copied into this test)."""
    raw = path.read_bytes().decode("utf-8").split("\n")
    start = next(i for i, l in enumerate(raw) if l.strip() == str(number))
    out = []
    for l in raw[start + 1:]:
        if l.strip().isdigit():
            break
        if l.strip():
            out.append(l)
    return out


def test_parser_on_real_files(files):
    train, dev, ref = files
    sonnets = parse_sonnets(train)
    assert [n for n, _ in sonnets] == list(range(1, 132))
    lines = dict(sonnets)
    raw1 = raw_lines_after(train, 1)
    assert lines[1] == [l.rstrip() for l in raw1]
    assert raw1[-1].startswith("  ") and lines[1][-1].startswith("  ")  # couplet indent kept
    assert all("\r" not in l for l in lines[1]) and any(l.endswith("\r") for l in raw1)  # CR dropped
    assert sum(len(v) == 14 for v in lines.values()) == 129  # 99 has 15 lines, 126 has 12
    assert len(lines[99]) == 15 and len(lines[126]) == 12
    prompts = parse_sonnets(dev, min_lines=3)
    assert [n for n, _ in prompts] == list(range(132, 144))
    assert all(len(v) == 3 for _, v in prompts)
    refs = parse_sonnets(ref)
    assert [n for n, _ in refs] == list(range(132, 144))
    assert all(len(v) == 14 for _, v in refs)
    assert all(p == r[:3] for (_, p), (_, r) in zip(prompts, refs))


def test_examples_and_defaults(data_dir, monkeypatch):
    monkeypatch.setenv("POSTLAB_DATA", str(data_dir))
    task = get_task(TaskConfig(name="sonnets"))
    assert task.primary_metrics == ("chrf",) and task.append_eos
    train = task.train_examples()
    assert len(train) == 131 and train[0].id == "1"
    ex = train[0]
    raw1 = [l.rstrip() for l in raw_lines_after(data_dir / "sonnets" / "sonnets.txt", 1)]
    assert ex.prompt == "\n".join(raw1[:3]) + "\n"
    assert ex.completion == "\n".join(raw1[3:])
    assert len(ex.completion.split("\n")) == 11 and "\r" not in ex.completion
    assert len(get_task(TaskConfig(name="sonnets", train_limit=5)).train_examples()) == 5
    dev = task.dev_examples()
    assert [e.id for e in dev] == [str(n) for n in range(132, 144)]
    ref132 = [l.rstrip() for l in raw_lines_after(data_dir / "sonnets" / "TRUE_sonnets_held_out_dev.txt", 132)]
    assert dev[0].prompt == "\n".join(ref132[:3]) + "\n" and dev[0].prompt.count("\n") == 3
    assert dev[0].completion.startswith(ref132[3] + "\n")
    assert len(dev[0].completion.split("\n")) == 11
    assert len(get_task(TaskConfig(name="sonnets", dev_limit=2)).dev_examples()) == 2
    with pytest.raises(ConfigError):  # rejected answers must be sampled from a model
        task.preference_pairs()


@pytest.mark.parametrize("content, match", [
    (b"", "empty"),
    (b"  \n\n", "empty"),
    (b"Sonnets\nno numbers here\nat all\n", "no numbered sonnets"),
    (b"Sonnets\n\n1\n\ncaf\xe9 au lait\nb\nc\nd\n", "line 5: not UTF-8"),
    (folger((1, SONNET), (2, "one\ntwo\nthree")).encode(), r"line 22: sonnet 2 has 3 line\(s\), expected at least 4"),
    (folger((1, SONNET), (1, SONNET)).encode(), "sonnet 1 appears twice"),
])
def test_malformed_files(tmp_path, content, match):
    path = tmp_path / "bad_sonnets.txt"
    path.write_bytes(content)
    with pytest.raises(DataError, match=match) as e:
        get_task(TaskConfig(name="sonnets", train=str(path))).train_examples()
    assert "bad_sonnets.txt" in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="nope.txt.*not found"):
        get_task(TaskConfig(name="sonnets", train=str(tmp_path / "nope.txt"))).train_examples()


def test_dev_reference_mismatch(tmp_path):
    prompts = tmp_path / "prompts.txt"
    refs = tmp_path / "refs.txt"
    prompts.write_text(folger((5, "a\nb\nc"), (6, "d\ne\nf")))
    refs.write_text(folger((5, "a\nb\nc\nx\ny"), (7, "d\nE\nf\nx\ny")))
    task = get_task(TaskConfig(name="sonnets", dev=str(prompts), dev_reference=str(refs)))
    with pytest.raises(DataError, match="prompt 6 \\(paired by order with sonnet 7\\): the prompt lines differ") as e:
        task.dev_examples()
    assert "prompts.txt" in str(e.value) and "refs.txt" in str(e.value)
    refs.write_text(folger((5, "a\nb\nc\nx\ny")))
    with pytest.raises(DataError, match="2 prompts but 1 references"):
        task.dev_examples()
    refs.write_text(folger((5, "a\nb\nc\nx\ny"), (6, "d\nE\nf\nx\ny")))
    with pytest.raises(DataError, match="sonnet 6: the prompt lines differ"):
        task.dev_examples()


def test_files_numbered_differently_pair_by_order(tmp_path, caplog):
    """The course's held-out files: a `--Generated Sonnets--` header and sonnets numbered from 0 in the
    prompts, while the references keep the Folger numbers."""
    prompts = tmp_path / "prompts.txt"
    refs = tmp_path / "refs.txt"
    prompts.write_text("--Generated Sonnets--\n\n" + folger((0, "a\nb\nc"), (1, "d\ne\nf")))
    refs.write_text(folger((132, "a\nb\nc\nx\ny"), (133, "d\ne\nf\nz\nw")))
    task = get_task(TaskConfig(name="sonnets", dev=str(prompts), dev_reference=str(refs)))
    with caplog.at_level("INFO", logger="postlab"):
        dev = task.dev_examples()
    assert [e.id for e in dev] == ["132", "133"] and dev[1].completion == "z\nw"
    assert "paired by order" in caplog.text


def test_cut_continuation():
    text = "\n".join(f"l{i}" for i in range(20))
    assert cut_continuation(text) == [f"l{i}" for i in range(11)]
    assert cut_continuation("\n  a  \n\n\nb\n") == ["  a", "b"]
    assert cut_continuation("") == []
    assert cut_continuation("a\nb\n\n17\n\nnext sonnet") == ["a", "b"]  # moved on to another sonnet


def test_evaluate_tiny_llama(tiny_llama, data_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("POSTLAB_DATA", str(data_dir))
    lm = load_lm(str(tiny_llama), device="cpu", precision="fp32")
    gen = GenerationConfig(max_new_tokens=8, seed=3)
    task = get_task(TaskConfig(name="sonnets", dev_limit=2, generation=gen))
    m1 = task.evaluate(lm, tmp_path / "a", batch_size=2)
    assert m1["n"] == 2.0
    assert math.isfinite(m1["chrf"]) and 0 <= m1["chrf"] <= 100
    assert math.isfinite(m1["chrf_continuation"]) and m1["chrf_continuation"] <= m1["chrf"]
    assert math.isfinite(m1["perplexity"]) and m1["perplexity"] > 1
    assert m1["perplexity"] == pytest.approx(math.exp(m1["dev_loss"]))
    text = (tmp_path / "a" / "generated_sonnets.txt").read_text()
    back = parse_sonnets(tmp_path / "a" / "generated_sonnets.txt", min_lines=3)
    assert [n for n, _ in back] == [132, 133]
    assert back[0][1][:3] == [line.rstrip() for line in task.dev_examples()[0].prompt.splitlines()]
    # same seed: same text and metrics; another seed: other text
    m2 = task.evaluate(lm, tmp_path / "b", batch_size=2)
    assert (tmp_path / "b" / "generated_sonnets.txt").read_text() == text
    assert m2 == m1
    other = get_task(TaskConfig(name="sonnets", dev_limit=2, generation=GenerationConfig(max_new_tokens=8, seed=4)))
    other.evaluate(lm, tmp_path / "c", batch_size=2)
    assert (tmp_path / "c" / "generated_sonnets.txt").read_text() != text
    assert task.evaluate(lm, None, batch_size=2) == m1  # no out_dir: nothing written, same numbers
    # per-example statistics give back every corpus metric (what the report's paired tests resample)
    from postlab.metrics import read_per_example

    per = read_per_example(tmp_path / "a")
    assert per.ids == ["132", "133"]
    for metric in ("chrf", "chrf_continuation", "dev_loss", "perplexity"):
        assert per.value(metric) == pytest.approx(m1[metric], rel=1e-9), metric
    assert not per.specs["dev_loss"].higher_is_better and per.specs["chrf"].higher_is_better


@pytest.mark.parametrize("temperature,top_p", [(1.0, 0.9), (0.7, 0.9), (1.5, 0.5), (1.0, 1.0)])
def test_sample_nucleus_draws_from_the_distribution_transformers_samples(temperature, top_p):
    """Peaked and flat rows alike (flat ones hold less than top_p in their top 4 or 8: the wider and the
    whole-row paths).
    fp32 scores on CPU. The drawn tokens are the nucleus transformers' temperature + top-p keeps, with
    its renormalized probabilities."""
    import torch
    from transformers import TemperatureLogitsWarper, TopPLogitsWarper

    from postlab.generate import SampleNucleus

    torch.manual_seed(0)
    scores = torch.randn(6, 40) * torch.tensor([0.3, 1.0, 2.0, 3.0, 5.0, 8.0])[:, None]
    ref = TemperatureLogitsWarper(temperature)(None, scores.clone())
    if top_p < 1:
        ref = TopPLogitsWarper(top_p)(None, ref)
    want = ref.softmax(-1)
    sampler = SampleNucleus(temperature, top_p, ks=(4, 8))
    draws = 4000
    counts = torch.zeros_like(scores)
    for _ in range(draws):
        out = sampler(None, scores)
        finite = torch.isfinite(out)
        assert (finite.sum(-1) == 1).all() and (out[finite] == 0).all()  # generate's argmax takes the draw
        counts += finite
    freq = counts / draws
    assert (freq[want == 0] == 0).all()  # nothing outside the nucleus
    assert (freq - want).abs().max() < 4 * (0.25 / draws) ** 0.5  # within 4 binomial standard errors


def test_sample_nucleus_draws_the_same_tokens_whatever_ks():
    """fp32 on CPU. One uniform per row and step: rows found among their top tokens and rows sorted
    whole draw what they would with any other search, so a faster one cannot change a seed's text."""
    import torch

    from postlab.generate import SampleNucleus

    scores = torch.randn(8, 49152, generator=torch.Generator().manual_seed(1)) * torch.linspace(0.5, 6, 8)[:, None]
    scores = scores.bfloat16().float()  # ties, as bf16 logits have
    drawn = []
    for ks in ((256, 2048), (1024,), (64,), ()):
        torch.manual_seed(0)
        drawn.append(torch.stack([SampleNucleus(0.8, 0.9, ks=ks)(None, scores).argmax(-1) for _ in range(20)]))
    assert all(torch.equal(drawn[0], d) for d in drawn[1:])


def test_lora_generation_decodes_a_merged_copy_and_leaves_the_adapter(tiny_llama):
    """fp32 on CPU. Greedy text of a LoRA model (B != 0) is the merged model's; the model keeps its
    adapter and weights."""
    import copy

    import torch

    from postlab.config import StageConfig
    from postlab.generate import generate
    from postlab.models import load_lm
    from postlab.parameterizations import adapter_of, plain, prepare
    from postlab.tasks.base import GenerationConfig

    lm = load_lm(str(tiny_llama), device="cpu", precision="fp32")
    lm.model, _ = prepare(lm.model, StageConfig(name="s", task={"name": "sonnets"}, objective={"name": "nll"},
                                                parameterization={"method": "lora", "lora": {"r": 4}}).parameterization)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in lm.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    merged = replace(lm, model=plain(copy.deepcopy(lm.model)))
    cfg = GenerationConfig(max_new_tokens=8, batch_size=2, greedy=True)
    prompts = ["Count 1:", "Count 2: one"]
    assert generate(lm, prompts, cfg, None) == generate(merged, prompts, cfg, None)
    assert adapter_of(lm.model) is not None
    assert all(torch.equal(v, lm.model.state_dict()[k]) for k, v in before.items())