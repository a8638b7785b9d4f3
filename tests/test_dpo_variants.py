"""TRL's other DPO loss types, LD-DPO and WPO vs TRL 1.16's ``DPOTrainer._compute_loss``: equal losses,
gradients and reward metrics on identical inputs, plus the properties TRL cannot check (what the stage must
provide for WPO, LD-DPO's limits, EXO's optimum)."""
from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from postlab.errors import ConfigError
from postlab.objectives import PairLogps, TokenLogps, get_objective, parse_args

pytest.importorskip("trl")
from trl_harness import METRICS, TRL_NAME, grads, make_pair, ours, trl_dpo  # noqa: E402

# (postlab name, its options, TRL loss types, TRL options): every DPO-family objective TRL's DPOTrainer has
FAMILY = [
    ("dpo", {}, ["sigmoid"], {}),
    ("ipo", {}, ["ipo"], {}),
    ("hinge", {}, ["hinge"], {}),
    ("robust", {"label_smoothing": 0.2}, ["robust"], {"label_smoothing": 0.2}),
    ("exo_pair", {"label_smoothing": 1e-3}, ["exo_pair"], {"label_smoothing": 1e-3}),
    ("exo_pair", {"label_smoothing": 0.2}, ["exo_pair"], {"label_smoothing": 0.2}),
    ("nca_pair", {}, ["nca_pair"], {}),
    ("bco_pair", {}, ["bco_pair"], {}),
    ("sppo_hard", {}, ["sppo_hard"], {}),
    ("aot", {}, ["aot"], {}),
    ("aot", {"label_smoothing": 0.1}, ["aot"], {"label_smoothing": 0.1}),
    ("aot_unpaired", {"label_smoothing": 0.1}, ["aot_unpaired"], {"label_smoothing": 0.1}),
    ("apo_zero", {}, ["apo_zero"], {}),
    ("apo_down", {}, ["apo_down"], {}),
    ("discopop", {}, ["discopop"], {}),
    ("discopop", {"tau": 0.5}, ["discopop"], {"discopop_tau": 0.5}),
    ("sigmoid_norm", {}, ["sigmoid_norm"], {}),
    ("rpo", {"alpha": 0.7}, ["sigmoid", "sft"], {"loss_weights": [1.0, 0.7]}),
]
NEW = ["exo_pair", "nca_pair", "bco_pair", "sppo_hard", "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop",
       "sigmoid_norm"]


def case_id(v):
    return "-".join(f"{k}={x}" for k, x in v.items()) if isinstance(v, dict) else (v if isinstance(v, str) else None)


def assert_matches_trl(name, options, loss_types, trl_options, x, **extra):
    beta = options.get("beta", 0.1)
    loss, metrics = ours(name, x, **options, **extra)
    trl_extra = {"ld_alpha": extra.get("ld_alpha"), "use_weighting": extra.get("wpo", False)}
    # TRL's use_weighting multiplies its per-pair losses in place, which autograd refuses where the loss's
    # last op saved its output (relu, sigmoid, exp): torch then keeps a copy of what TRL overwrites.
    with torch.autograd.graph.allow_mutation_on_saved_tensors():
        ref_loss, ref_metrics = trl_dpo(x, loss_types, beta=beta, **trl_options, **trl_extra)
        ref_grads = grads(ref_loss, x)
    assert_close(loss, ref_loss)
    for g, ref_g in zip(grads(loss, x), ref_grads):
        assert_close(g, ref_g)
    for k in METRICS:
        assert metrics[k].item() == pytest.approx(ref_metrics[TRL_NAME.get(k, k)], rel=1e-6, abs=1e-9), k


@pytest.mark.parametrize("name,options,loss_types,trl_options", FAMILY, ids=case_id)
@pytest.mark.parametrize("beta", [0.1, 0.6])
@pytest.mark.parametrize("seed", [0, 1])
def test_loss_types_match_trl(name, options, loss_types, trl_options, beta, seed):
    x = make_pair(seed=seed, gap=0.5)
    assert_matches_trl(name, {**options, "beta": beta}, loss_types, trl_options, x)


@pytest.mark.parametrize("name,options,loss_types,trl_options", FAMILY, ids=case_id)
@pytest.mark.parametrize("extra", [{"ld_alpha": 0.3}, {"ld_alpha": 0.0}, {"wpo": True},
                                   {"ld_alpha": 0.5, "wpo": True}], ids=case_id)
def test_ld_dpo_and_wpo_match_trl(name, options, loss_types, trl_options, extra):
    """TRL applies ``ld_alpha`` and ``use_weighting`` to every loss type; so does every member of the family."""
    if name == "rpo" and extra.get("wpo"):
        pytest.skip("TRL 1.16 cannot run it: use_weighting multiplies the 'sft' term's expanded scalar in place "
                    "(RuntimeError); test_rpo_with_wpo_weights_its_nll_by_the_mean_pair_weight checks postlab's")
    x = make_pair(seed=2, gap=0.5)
    assert_matches_trl(name, options, loss_types, trl_options, x, **extra)


def test_rpo_with_wpo_weights_its_nll_by_the_mean_pair_weight():
    """What TRL's ["sigmoid", "sft"] with use_weighting means (each term's per-pair loss times the pair weights,
    the "sft" term's being the batch NLL): mean(w·dpo) + α·NLL·mean(w)."""
    from postlab.objectives.preference import wpo_weights

    x = make_pair(seed=6)
    c = x.chosen
    nll = -(c.policy * c.mask).sum() / c.mask.sum()
    expected = ours("dpo", x, beta=0.2, wpo=True)[0] + 0.7 * nll * wpo_weights(x).mean()
    assert_close(ours("rpo", x, beta=0.2, alpha=0.7, wpo=True)[0], expected)


def test_ld_dpo_cases_have_pairs_of_unequal_lengths():
    """Guard for the LD-DPO comparisons: some pairs have tokens past the shorter answer (else α changes nothing)."""
    x = make_pair(seed=2)
    assert (x.chosen.n_tokens != x.rejected.n_tokens).sum() >= 4


def test_ld_dpo_limits():
    x = make_pair(seed=3)
    # α = 1 is plain DPO; α = 0 is DPO on each pair's first min(|c|, |r|) tokens only
    assert_close(ours("dpo", x, ld_alpha=1.0)[0], ours("dpo", x)[0])
    shared = torch.minimum(x.chosen.n_tokens, x.rejected.n_tokens)[:, None]

    def cut(t: TokenLogps) -> TokenLogps:
        return TokenLogps(t.policy, t.mask & (torch.arange(t.mask.shape[1]) < shared), reference=t.reference)

    assert_close(ours("dpo", x, ld_alpha=0.0)[0], ours("dpo", PairLogps(cut(x.chosen), cut(x.rejected)))[0])
    # pairs of equal lengths: α changes nothing
    same = PairLogps(x.chosen, TokenLogps(x.rejected.policy, x.chosen.mask, reference=x.rejected.reference))
    assert_close(ours("dpo", same, ld_alpha=0.2)[0], ours("dpo", same)[0])


def test_wpo_declares_its_input_and_the_stage_accepts_it():
    """WPO's weights need log Σ_v π(v)² over the whole vocabulary at each position: declared through the
    spec (``needs_log_sum_sq_probs``), which the stage prepares (base.STAGE_FEEDS.log_sum_sq_probs), so a
    config with ``wpo: true`` validates; a loss called without the input says what it lacks."""
    for name in ["dpo", "ipo", "rpo", "ddpo", *NEW]:
        spec = get_objective(name)
        assert not spec.needs_log_sum_sq_probs
        assert spec.for_args(spec.args(wpo=True)).needs_log_sum_sq_probs
        assert parse_args(spec, {"wpo": True}).wpo
    x = make_pair(seed=4)
    x.chosen.log_sum_sq_probs = None
    with pytest.raises(ValueError, match="log_sum_sq_probs"):
        ours("dpo", x, wpo=True)


PAIRS = [  # answers of different lengths
    ("Is the sky blue?", " Yes, the sky is blue on a clear day.", " No."),
    ("Is fire cold?", " No, fire is hot.", " Yes, fire is very cold, colder than ice."),
    ("Do fish swim?", " Yes.", " No, fish never swim in water at all."),
    ("Can birds fly?", " Most birds can fly.", " No bird has ever flown."),
]


@pytest.mark.parametrize("name,loss_types", [("dpo", ["sigmoid"]), ("ipo", ["ipo"]), ("apo_zero", ["apo_zero"])])
def test_a_wpo_stage_batch_equals_trl_use_weighting_on_the_model(name, loss_types, peaky_llama, tmp_path):
    """fp32, CPU. postlab's stage (its tokenized pairs, its reference pass, one forward of the loop with log Σπ²
    from its chunked head) against TRL's ``DPOTrainer._compute_loss`` with ``use_weighting`` on the same model,
    whose policy, reference and log Σπ² forwards are TRL's fused head: equal loss, reward metrics and
    gradients. The model's distributions are peaked, so the pair weights are far from 1 (else WPO would be
    plain DPO and the comparison would not see the weights)."""
    from helpers import nudge, stage_plan, write_records
    from postlab.forward import batch_loss
    from postlab.models import load_lm
    from trl_harness import fused_model, trl_dpo_model

    lm = load_lm(str(peaky_llama), device="cpu", precision="fp32")
    data = write_records(tmp_path / "pairs.jsonl", [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in PAIRS])
    plan = stage_plan(lm, {"name": "dpo", "task": {"name": "file", "train": str(data)},
                           "objective": {"name": name, "beta": 0.5, "wpo": True}}, tmp_path)
    idx = list(range(len(plan.items)))
    nudge(lm.model)  # the policy some steps after the stage's start (its reference)
    loss, m, _ = batch_loss(lm, plan, idx)
    loss.backward()
    policy = fused_model(peaky_llama)
    nudge(policy)
    ref_loss, ref_m = trl_dpo_model(policy, fused_model(peaky_llama), plan.items, lm.tokenizer.pad_token_id,
                                    loss_types, beta=0.5, use_weighting=True)
    ref_loss.backward()
    assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for k in METRICS:
        assert m[k].item() == pytest.approx(ref_m[TRL_NAME.get(k, k)], rel=1e-4, abs=1e-5), k
    grads = dict(policy.named_parameters())
    for n, p in lm.model.named_parameters():  # to fp32 round-off relative to each gradient's scale
        assert_close(p.grad, grads[n].grad, rtol=1e-4, atol=1e-5 * float(grads[n].grad.abs().max()))
    plain = stage_plan(lm, {"name": "dpo", "task": {"name": "file", "train": str(data)},
                            "objective": {"name": name, "beta": 0.5}}, tmp_path)
    with torch.no_grad():
        unweighted = batch_loss(lm, plain, idx)[0]
    assert abs(unweighted - loss) > 0.05 * abs(unweighted)  # the weights count


def test_wpo_weights_are_constants_and_one_for_certain_tokens():
    """The weights carry no gradient (WPO Eq. 2 reweights, it is not optimized); a pair whose every token has
    π(y_t) = 1 under a deterministic distribution (log Σπ² = 0) has weight 1."""
    from postlab.objectives.preference import wpo_weights

    x = make_pair(seed=5)
    assert not wpo_weights(x).requires_grad
    for t in (x.chosen, x.rejected):
        t.log_sum_sq_probs = torch.zeros_like(t.policy)
        t.policy = torch.zeros_like(t.policy)
    assert_close(wpo_weights(x), torch.ones(8, dtype=torch.float64))


def test_exo_is_minimal_where_the_pair_probability_is_one_minus_eps():
    """EXO minimizes KL(q‖p) with q = (σ(βh), σ(−βh)), p = (1−ε, ε): zero loss and zero gradient at σ(βh) = 1−ε."""
    eps, beta = 0.1, 0.5
    h = torch.log(torch.tensor((1 - eps) / eps, dtype=torch.float64)) / beta
    mask = torch.tensor([[True]])
    c = TokenLogps(h.reshape(1, 1).clone().requires_grad_(), mask, reference=torch.zeros(1, 1, dtype=torch.float64))
    r = TokenLogps(torch.zeros(1, 1, dtype=torch.float64), mask, reference=torch.zeros(1, 1, dtype=torch.float64))
    loss, _ = ours("exo_pair", PairLogps(c, r), beta=beta, label_smoothing=eps)
    assert loss.item() == pytest.approx(0.0, abs=1e-12)
    assert torch.autograd.grad(loss, c.policy)[0].abs().item() < 1e-10


def test_discopop_blends_logistic_and_exponential():
    """For βh ≫ τ the blend is all exponential (e^{−βh}); for βh ≪ −τ all logistic (−logσ(βh))."""
    mask = torch.tensor([[True]])
    zero = torch.zeros(1, 1, dtype=torch.float64)
    for h, expect in [(4.0, torch.exp(torch.tensor(-4.0 * 0.5))), (-4.0, -torch.nn.functional.logsigmoid(
            torch.tensor(-4.0 * 0.5)))]:
        x = PairLogps(TokenLogps(torch.full((1, 1), h, dtype=torch.float64), mask, reference=zero),
                      TokenLogps(zero.clone(), mask, reference=zero))
        assert ours("discopop", x, beta=0.5, tau=0.05)[0].item() == pytest.approx(expect.item(), rel=1e-6)


@pytest.mark.parametrize("name", NEW)
def test_registered_with_reference_and_family_options(name):
    spec = get_objective(name)
    assert spec.kind == "preference" and spec.needs_reference and spec.doc
    a = parse_args(spec, {"beta": 0.3, "ld_alpha": 0.5})
    assert (a.beta, a.ld_alpha, a.wpo) == (0.3, 0.5, False)


@pytest.mark.parametrize("name,raw,needle", [
    ("exo_pair", {"label_smoothing": 0.0}, "label_smoothing"),  # log ε: ε must be > 0
    ("aot", {"label_smoothing": 0.5}, "label_smoothing"),
    ("discopop", {"tau": 0.0}, "tau"),
    ("dpo", {"ld_alpha": 1.5}, "ld_alpha"),
    ("nca_pair", {"beta": 0.0}, "beta"),
])
def test_arg_validation(name, raw, needle):
    with pytest.raises(ConfigError, match=needle):
        parse_args(get_objective(name), raw)
