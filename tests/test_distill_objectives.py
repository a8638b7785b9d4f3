"""Distillation objectives: kd (forward/reverse KL, generalized JSD; checked against TRL's GKD loss),
ddpo, dadpo (β2 = 0 is ddpo exactly; gradient against the hand-derived value), and stages that read
a cached teacher."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

from postlab.objectives import PairLogps, TokenLogps, get_objective


def call(name, x, **args):
    spec = get_objective(name)
    return spec.fn(x, spec.args(**args))


def pair(seed: int = 0, b: int = 3, t: int = 4) -> PairLogps:
    g = torch.Generator().manual_seed(seed)

    def side():
        mask = torch.ones(b, t, dtype=torch.bool)
        mask[0, -1] = False
        logp = lambda: -3 * torch.rand(b, t, generator=g, dtype=torch.float64)  # noqa: E731
        return TokenLogps(logp().requires_grad_(True), mask, reference=logp(), teacher=logp())

    return PairLogps(side(), side())


def test_dadpo_with_beta2_zero_is_ddpo_exactly():
    x, y = pair(), pair()
    l1, _ = call("dadpo", x, beta1=0.3, beta2=0.0)
    l2, _ = call("ddpo", y, beta=0.3)
    assert l1.item() == l2.item()
    l1.backward()
    l2.backward()
    assert torch.equal(x.chosen.policy.grad, y.chosen.policy.grad)
    assert torch.equal(x.rejected.policy.grad, y.rejected.policy.grad)


def test_dadpo_value_and_gradient_by_hand():
    x = pair(1)
    b1, b2 = 0.2, 0.5
    loss, m = call("dadpo", x, beta1=b1, beta2=b2)
    d = {w: (getattr(x.chosen, w) * x.chosen.mask).sum(-1) - (getattr(x.rejected, w) * x.rejected.mask).sum(-1)
         for w in ("policy", "reference", "teacher")}
    z = (b1 + b2) * d["policy"] - b1 * d["reference"] - b2 * d["teacher"]
    assert loss.item() == pytest.approx(float(-torch.log(torch.sigmoid(z)).mean()), rel=1e-12)
    loss.backward()
    # dL/dlogπθ(y_c,t) = −σ(−z)·(β1+β2)/B at real chosen tokens; +σ(−z)·(β1+β2)/B at rejected ones
    coef = (torch.sigmoid(-z) * (b1 + b2) / 3).detach()
    assert torch.allclose(x.chosen.policy.grad, -coef[:, None] * x.chosen.mask)
    assert torch.allclose(x.rejected.policy.grad, coef[:, None] * x.rejected.mask)
    assert m["teacher_margin"].item() == pytest.approx(float((d["policy"] - d["teacher"]).mean()))
    # the teacher term pulls toward the teacher's own preference: a teacher margin that grows lowers the loss
    x2 = pair(1)
    x2.chosen.teacher = x2.chosen.teacher - 1.0  # the teacher likes the chosen answer less...
    assert call("dadpo", x2, beta1=b1, beta2=b2)[0].item() < loss.item()  # ...so the policy's margin over it is larger


def full_topk(student_logits, teacher_logits, k):
    s, t = torch.log_softmax(student_logits, -1), torch.log_softmax(teacher_logits, -1)
    values, index = t.topk(k, -1)
    mask = torch.ones(s.shape[:-1], dtype=torch.bool)
    return TokenLogps(s[..., 0], mask, topk_policy=s.gather(-1, index), topk_target=values), s, t


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_kd_jsd_equals_trl_gkd_loss_on_the_full_vocabulary(beta):
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    try:
        from trl import GKDTrainer
    except ImportError:
        from trl.experimental.gkd import GKDTrainer
    torch.manual_seed(0)
    V = 16
    student = torch.randn(2, 5, V, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, 5, V, dtype=torch.float64)
    x, _, _ = full_topk(student, teacher, V)
    ours, _ = call("kd", x, divergence="jsd", beta=beta, topk=V)
    theirs = GKDTrainer.generalized_jsd_loss(student, teacher, beta=beta, reduction="batchmean")
    # TRL's "batchmean" divides the summed divergence by the batch size; ours is the mean per token
    assert ours.item() == pytest.approx(theirs.item() * 2 / 10, rel=1e-9)
    g1 = torch.autograd.grad(ours, student)[0]
    g2 = torch.autograd.grad(theirs * 2 / 10, student)[0]
    assert torch.allclose(g1, g2, atol=1e-12)


def test_kd_forward_and_reverse_kl_exact_at_full_k_and_lower_bounds_below():
    torch.manual_seed(1)
    V = 20
    student, teacher = torch.randn(3, 4, V, dtype=torch.float64), torch.randn(3, 4, V, dtype=torch.float64)
    x, s, t = full_topk(student, teacher, V)
    fwd = (t.exp() * (t - s)).sum(-1).mean()
    rev = (s.exp() * (s - t)).sum(-1).mean()
    assert call("kd", x, divergence="forward", topk=V)[0].item() == pytest.approx(fwd.item(), rel=1e-9)
    assert call("kd", x, divergence="reverse", topk=V)[0].item() == pytest.approx(rev.item(), rel=1e-9)
    for k in (1, 5, 12):
        xk, _, _ = full_topk(student, teacher, k)
        assert 0 <= call("kd", xk, divergence="forward", topk=k)[0].item() <= fwd.item() + 1e-12
        assert 0 <= call("kd", xk, divergence="reverse", topk=k)[0].item() <= rev.item() + 1e-12
    same, _, _ = full_topk(teacher, teacher, 6)
    assert call("kd", same, divergence="jsd", topk=6)[0].item() == pytest.approx(0.0, abs=1e-12)


@pytest.fixture(scope="module")
def teacher_model(tmp_path_factory, tokenizer_dir):
    from conftest import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("teacher"), "llama", tokenizer_dir, seed=7)


def test_kd_and_dadpo_stages_read_a_cached_teacher(tiny_llama, teacher_model, tmp_path, own_cache):
    from postlab.config import parse_run_config
    from postlab.run import run

    sft_data = tmp_path / "sft.jsonl"
    sft_data.write_text("".join(json.dumps({"prompt": f"Count to {i}:", "completion": " one two three"}) + "\n"
                                for i in range(8)))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Say {i}:", "chosen": " teacher says this",
                                         "rejected": " student said that"}) + "\n" for i in range(8)))
    stage = lambda name, data, obj: {"name": name, "task": {"name": "file", "train": str(data)},  # noqa: E731
                                     "objective": obj, "teacher": str(teacher_model), "epochs": 1,
                                     "log_every": 1, "optim": {"lr": 1e-3, "batch_size": 4}}
    tree = {"model": {"name": str(tiny_llama), "device": "cpu", "precision": "fp32"}, "output_dir": str(tmp_path / "run"), "reuse_stages": False,
            "stages": [stage("kd", sft_data, {"name": "kd", "divergence": "jsd", "topk": 8}),
                       stage("dadpo", pairs, {"name": "dadpo", "beta1": 0.1, "beta2": 0.1})]}
    run(parse_run_config(tree))
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    kd = [r for r in rows if r.get("stage") == "kd" and r.get("split") == "train"]
    da = [r for r in rows if r.get("stage") == "dadpo" and r.get("split") == "train"]
    assert kd and all(math.isfinite(r["loss"]) and r["kd"] > 0 for r in kd)
    assert da and all(math.isfinite(r["loss"]) and "teacher_margin" in r for r in da)
    assert len(list((own_cache / "logps").glob("teacher-top8-*.safetensors"))) == 1
    assert len(list((own_cache / "logps").glob("teacher-[0-9a-f]*.safetensors"))) == 1  # dadpo: per-token only


def test_teacher_objective_without_teacher_is_refused(tiny_llama, tmp_path):
    from helpers import run_config, write_pairs
    from postlab.config import parse_run_config
    from postlab.errors import ConfigError
    from postlab.run import run

    data = write_pairs(tmp_path / "p.tsv", 8)
    with pytest.raises(ConfigError, match="needs a teacher; set teacher: MODEL"):
        run(parse_run_config(run_config(tiny_llama, tmp_path / "run", data, objective={"name": "kd"})))


def test_distill_sample_writes_dsft_and_pairs_and_caches(tiny_llama, teacher_model, tmp_path, own_cache, capsys):
    from postlab.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n\n".join(f"Tell me about number {i}:" for i in range(5)))
    argv = ["distill", "sample", "--teacher", str(teacher_model), "--student", str(tiny_llama), "--prompt-file",
            str(prompts), "--max-new-tokens", "6", "--seed", "3", "--precision", "fp32", "--out", str(tmp_path / "d")]
    assert main(argv) == 0
    dsft = [json.loads(l) for l in (tmp_path / "d" / "dsft.jsonl").read_text().splitlines()]
    pairs = [json.loads(l) for l in (tmp_path / "d" / "pairs.jsonl").read_text().splitlines()]
    assert len(dsft) == 5 and {r["prompt"] for r in dsft} == {f"Tell me about number {i}:" for i in range(5)}
    assert pairs and all(p["chosen"] == next(d["completion"] for d in dsft if d["id"] == p["id"]) for p in pairs)
    assert all(p["chosen"] != p["rejected"] for p in pairs)
    assert len(list((own_cache / "samples").glob("distill-teacher-*.json"))) == 1
    first = (tmp_path / "d" / "pairs.jsonl").read_text()
    assert main(argv[:-1] + [str(tmp_path / "again")]) == 0  # from the cache: the same responses
    assert len(list((own_cache / "samples").glob("distill-*.json"))) == 2
    assert (tmp_path / "again" / "pairs.jsonl").read_text() == first
