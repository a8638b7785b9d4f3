"""The SFT objective family (dft, asft, chi2, klsft): values on hand-computed inputs, gradients, the
defining properties, the top-k distribution cache, and an end-to-end asft stage on a tiny model."""
from __future__ import annotations

import json
import math

import pytest
import torch

from postlab.objectives import TokenLogps, get_objective
from postlab.objectives.divergence import bucket_kl, with_tail


def call(name: str, x: TokenLogps, **args):
    spec = get_objective(name)
    return spec.fn(x, spec.args(**args))


def hand_inputs(requires_grad: bool = True) -> TokenLogps:
    policy = torch.log(torch.tensor([[0.5, 0.25, 0.9]], dtype=torch.float64)).requires_grad_(requires_grad)
    reference = torch.log(torch.tensor([[0.25, 0.5, 0.9]], dtype=torch.float64))
    mask = torch.tensor([[True, True, False]])  # the third token is padding
    return TokenLogps(policy, mask, reference=reference)


def test_dft_value_and_gradient_is_probability_weighted_nll():
    x = hand_inputs()
    loss, m = call("dft", x)
    assert loss.item() == pytest.approx(-(0.5 * math.log(0.5) + 0.25 * math.log(0.25)) / 2)
    assert m["nll"].item() == pytest.approx(-(math.log(0.5) + math.log(0.25)) / 2)
    loss.backward()
    # d/dlogp of −sg(p)·logp = −p, averaged over the 2 real tokens; padding gets no gradient
    assert x.policy.grad[0].tolist() == pytest.approx([-0.25, -0.125, 0.0])


def test_chi2_value_and_gradient():
    x = hand_inputs()
    beta, alpha = 2.0, 0.5
    loss, _ = call("chi2", x, beta=beta, alpha=alpha)
    r = [beta * math.log(2), beta * math.log(0.5)]
    assert loss.item() == pytest.approx(sum(-ri + ri ** 2 / (4 * alpha) for ri in r) / 2)
    loss.backward()
    assert x.policy.grad[0, :2].tolist() == pytest.approx([(-beta + beta * ri / (2 * alpha)) / 2 for ri in r])


@pytest.mark.parametrize("name", ["chi2", "klsft"])
def test_large_alpha_gradient_is_beta_times_nll_gradient(name):
    beta = 0.7
    x, y = hand_inputs(), hand_inputs()
    call(name, x, beta=beta, alpha=1e9)[0].backward()
    call("nll", y)[0].backward()
    assert torch.allclose(x.policy.grad, beta * y.policy.grad, atol=1e-7)


@pytest.mark.parametrize("name,optimum", [("chi2", lambda a: 2 * a), ("klsft", lambda a: a * math.log(2))])
def test_penalty_pulls_toward_reference_past_the_optimum(name, optimum):
    beta, alpha = 1.0, 0.3
    r_star = optimum(alpha)
    for r, sign in ((r_star - 0.2, -1), (r_star + 0.2, +1)):  # below: raise log π; above: lower it, toward πref
        x = TokenLogps(torch.tensor([[r / beta - 2.0]], requires_grad=True), torch.tensor([[True]]),
                       reference=torch.tensor([[-2.0]]))
        call(name, x, beta=beta, alpha=alpha)[0].backward()
        assert math.copysign(1, x.policy.grad.item()) == sign
    # Gradient descent on a free 4-way softmax ends at the optimum log-ratio, where NLL would run to 0.
    ref = torch.log_softmax(torch.tensor([0.0, 1.0, 0.5, -1.0]), -1)
    logits = ref.clone().requires_grad_(True)
    opt = torch.optim.SGD([logits], lr=0.1)
    for _ in range(2000):
        opt.zero_grad()
        lp = torch.log_softmax(logits, -1)
        x = TokenLogps(lp[None, :1], torch.tensor([[True]]), reference=ref[None, :1])
        call(name, x, beta=beta, alpha=alpha)[0].backward()
        opt.step()
    assert (torch.log_softmax(logits, -1)[0] - ref[0]).item() == pytest.approx(r_star / beta, abs=1e-3)


@pytest.mark.parametrize("name,extra", [("dft", {}), ("chi2", {"alpha": 0.4}), ("klsft", {"alpha": 0.4})])
def test_gradcheck(name, extra):
    ref = torch.log(torch.rand(2, 3, dtype=torch.float64) * 0.9 + 0.05)
    mask = torch.tensor([[True, True, True], [True, False, False]])
    spec = get_objective(name)
    args = spec.args(**extra)

    def f(p):
        return spec.fn(TokenLogps(p, mask, reference=ref), args)[0]

    p = torch.log(torch.rand(2, 3, dtype=torch.float64) * 0.9 + 0.05).requires_grad_(True)
    if name == "dft":  # the stop-gradient makes dft's loss and its "gradient" differ on purpose
        f(p).backward()
        assert torch.allclose(p.grad, -(p.detach().exp() * mask) / mask.sum())
    else:
        assert torch.autograd.gradcheck(f, (p,))


def topk_inputs(policy_logits: torch.Tensor, ref_logits: torch.Tensor, k: int, target_tok: torch.Tensor):
    """TokenLogps for asft from full logits [B, T, V]: the reference's top-k and the policy at those ids."""
    pol, ref = torch.log_softmax(policy_logits, -1), torch.log_softmax(ref_logits, -1)
    values, index = ref.topk(k, -1)
    policy = pol.gather(-1, target_tok[..., None])[..., 0]
    reference = ref.gather(-1, target_tok[..., None])[..., 0]
    return TokenLogps(policy, torch.ones_like(policy, dtype=torch.bool), reference=reference,
                      topk_policy=pol.gather(-1, index), topk_target=values)


def test_asft_is_dft_plus_bucketed_kl_to_the_reference():
    torch.manual_seed(0)
    V = 12
    ref_logits = torch.randn(2, 3, V, dtype=torch.float64)
    pol_logits = (ref_logits + 0.5 * torch.randn(2, 3, V, dtype=torch.float64)).requires_grad_(True)
    tok = torch.randint(0, V, (2, 3))
    # λ = 0: exactly dft
    x = topk_inputs(pol_logits, ref_logits, 4, tok)
    assert call("asft", x, lam=0.0, topk=4)[0].item() == pytest.approx(call("dft", x)[0].item())
    # k = V: the anchor is the exact full-vocabulary KL(π‖πref)
    full = topk_inputs(pol_logits, ref_logits, V, tok)
    pol, ref = torch.log_softmax(pol_logits, -1), torch.log_softmax(ref_logits, -1)
    exact = (pol.exp() * (pol - ref)).sum(-1).mean()
    _, m = call("asft", full, lam=1.0, topk=V)
    assert m["kl_ref"].item() == pytest.approx(exact.item(), rel=1e-6)
    # smaller k: a lower bound (buckets merge outcomes), and a reported tail mass
    for k in (1, 3, 6):
        _, mk = call("asft", topk_inputs(pol_logits, ref_logits, k, tok), lam=1.0, topk=k)
        assert 0 <= mk["kl_ref"].item() <= exact.item() + 1e-9
        assert 0 < mk["tail_mass"].item() < 1
    # the policy equal to the reference: no anchor term
    same = topk_inputs(ref_logits, ref_logits, 5, tok)
    assert call("asft", same, lam=1.0, topk=5)[1]["kl_ref"].item() == pytest.approx(0.0, abs=1e-9)
    # the anchor's gradient pulls the policy's logits toward the reference's
    loss, _ = call("asft", full, lam=1.0, topk=V)
    g_anchor = torch.autograd.grad(loss - call("dft", full)[0], pol_logits)[0]
    assert (g_anchor * (pol_logits - ref_logits)).sum() > 0  # descent moves along ref − pol


def test_with_tail_adds_the_missing_mass():
    logp = torch.log(torch.tensor([0.5, 0.2]))
    assert with_tail(logp).exp().tolist() == pytest.approx([0.5, 0.2, 0.3])
    assert bucket_kl(with_tail(logp), with_tail(logp)).item() == pytest.approx(0.0, abs=1e-7)


def test_score_at_matches_full_log_softmax(tiny_llama, precision):
    """Scoring with the head only at scored rows (in chunks) equals a full forward's log-softmax, under
    the same autocast: exact up to float round-off in fp32, up to bf16 rounding of the logits in bf16."""
    from conftest import tolerance
    from postlab.data import Example, score_batch, tokenize
    from postlab.logprobs import score, score_topk
    from postlab.models import load_lm

    lm = load_lm(str(tiny_llama), device="cpu", precision=precision)
    items, _ = tokenize([Example("Count: one", " two three four"), Example("Hi", " there")], lm.tokenizer, 64)
    batch = score_batch(items, lm.tokenizer.pad_token_id)
    logps, mask, values, index = score_topk(lm, batch, 5)
    with torch.no_grad(), lm.autocast():
        logits = lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask()).logits.float()
    full = torch.log_softmax(logits, -1)
    atol = tolerance(precision, scale=float(logits.abs().max()))
    for a in range(batch.n_answers):
        start = len(items[a].prompt)
        for s in range(int(mask[a].sum())):
            row = full[a, start + s - 1]
            assert torch.allclose(values[a, s], row.topk(5).values, atol=atol)
            assert logps[a, s].item() == pytest.approx(row[items[a].completions[0][s]].item(), abs=atol)
    _, _, at = score(lm, batch, at=index)
    assert torch.allclose(at[mask], values[mask], atol=atol)


def test_asft_stage_trains_with_cached_reference_topk(tiny_llama, tmp_path, own_cache):
    from helpers import run_config, write_pairs
    from postlab.config import parse_run_config
    from postlab.run import run

    data = write_pairs(tmp_path / "pairs.tsv")
    cfg = parse_run_config(run_config(tiny_llama, tmp_path / "run", data, epochs=1,
                                      objective={"name": "asft", "lam": 0.1, "topk": 8}))
    run(cfg)
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r.get("split") == "train"]
    assert train and all(math.isfinite(r["loss"]) and "kl_ref" in r and 0 < r["tail_mass"] < 1 for r in train)
    assert train[0]["kl_ref"] == pytest.approx(0.0, abs=1e-6)  # the first step starts at the reference
    assert list((own_cache / "logps").glob("reference-top8-*.safetensors"))


@pytest.mark.parametrize("name,extra", [("asft", {"lam": 0.3, "topk": 4}), ("kd", {"divergence": "forward", "topk": 4}),
                                        ("kd", {"divergence": "reverse", "topk": 4}),
                                        ("kd", {"divergence": "jsd", "beta": 0.3, "topk": 4})])
def test_gradcheck_topk_objectives(name, extra):
    """Gradients through the bucketed divergences (top-k + tail) match finite differences."""
    torch.manual_seed(3)
    V = 9
    ref_logits = torch.randn(2, 3, V, dtype=torch.float64)
    tok = torch.randint(0, V, (2, 3))
    spec = get_objective(name)
    args = spec.args(**extra)

    def f(pol_logits):
        return spec.fn(topk_inputs(pol_logits, ref_logits, 4, tok), args)[0]

    # asft's dft part carries a stop-gradient, which finite differences cannot see: check the anchor only
    g = (lambda p: f(p) - spec.fn(topk_inputs(p, ref_logits, 4, tok), spec.args(**{**extra, "lam": 0.0}))[0]) \
        if name == "asft" else f
    assert torch.autograd.gradcheck(g, (torch.randn(2, 3, V, dtype=torch.float64, requires_grad=True),))
