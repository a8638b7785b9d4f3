"""The benchmark scripts import against the current package (a moved function broke one unnoticed)
and show their usage; they are not run here (they time the real model)."""
from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.mark.parametrize("script", sorted(p.stem for p in BENCH.glob("*.py")))
def test_a_benchmark_script_imports(script, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    module = importlib.import_module(script)
    assert module.__doc__, f"bench/{script}.py says what it measures and how to run it"
    sys.modules.pop(script, None)


def test_paired_ratios_pair_each_repeat_and_bound_their_geometric_mean(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    from paired_ratio import comparisons, ratio_ci

    doc = {"results": {"sft": {"runs": {"trl": [{"seconds": 30.0}, {"seconds": 20.0}, {"seconds": 40.0}],
                                         "postlab": [{"seconds": 10.0}, {"seconds": 10.0}, {"seconds": 10.0}]}}}}
    ratios = comparisons(doc)["sft: postlab vs TRL"]
    assert ratios == [3.0, 2.0, 4.0]  # repeat by repeat, not medians against medians
    r = ratio_ci(ratios)
    assert abs(r["ratio"] - 24 ** (1 / 3)) < 1e-9 and r["ci_low"] < r["ratio"] < r["ci_high"]
    casts = {"results": {"generation": {"frozen": {"per forward": {"seconds": [3.0, 4.0]},
                                                    "per pass": {"seconds": [2.0, 2.0]}, "per_pass_speedup": 1.75}}}}
    assert comparisons(casts) == {"generation (frozen): per pass vs per forward": [1.5, 2.0]}  # inference_casts.py
    commits = {"results": {"dpo": {"runs": {"past": [{"seconds": 12.0}, {"seconds": 10.0}],
                                            "now": [{"seconds": 10.0}, {"seconds": 10.0}]}}}}
    assert comparisons(commits) == {"dpo: now vs past": [1.2, 1.0]}  # vs_commit.py
    same = ratio_ci([3.0, 3.0])  # no spread: the interval is the point (exp(log 3) to rounding)
    assert same["ci_low"] == same["ci_high"] and abs(same["ratio"] - 3.0) < 1e-12


def test_the_gpu_scripts_parse_and_give_vs_trl_only_flags_it_knows():
    """bench/gpu/check.sh runs once per lent GPU (minutes of device time): a typo there is found here."""
    for script in sorted((BENCH / "gpu").glob("*.sh")):
        subprocess.run(["bash", "-n", str(script)], check=True)
    call = (BENCH / "gpu" / "check.sh").read_text().split("step vs-trl", 1)[1].split("\n\n", 1)[0]
    usage = subprocess.run([sys.executable, str(BENCH / "vs_trl.py"), "--help"], capture_output=True, text=True,
                           check=True).stdout
    given, known = set(re.findall(r"--[a-z][a-z-]*", call)), set(re.findall(r"--[a-z][a-z-]*", usage))
    assert {"--device", "--precision", "--warm"} <= given <= known, given - known


def test_profile_counts_matmul_flops_from_shapes_as_the_profiler_would(monkeypatch):
    """bench/profile_step.py counts matmul FLOPs from recorded shapes (the profiler's own counting slows
    the ops it profiles); on mm, addmm, bmm and baddbmm the count equals torch.profiler's. fp32, CPU."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    monkeypatch.syspath_prepend(str(BENCH))
    from profile_step import matmul_flops

    a, b, bias = torch.randn(5, 7), torch.randn(7, 3), torch.randn(3)
    x, y, z = torch.randn(2, 5, 7), torch.randn(2, 7, 4), torch.randn(2, 5, 4)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True, with_flops=True) as prof:
        torch.mm(a, b), torch.addmm(bias, a, b), torch.bmm(x, y), torch.baddbmm(z, x, y)
    events = [e for e in prof.key_averages(group_by_input_shape=True) if e.key in
              ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")]
    assert {e.key for e in events} == {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"}
    for e in events:
        assert matmul_flops(e.key, e.input_shapes) == e.flops / e.count > 0, e.key
    assert matmul_flops("aten::mm", [[5, 7], [7, 3]]) == 2 * 5 * 7 * 3


def test_profile_with_emulated_bf16_matmuls_counts_each_other_op_once_and_no_matmul_detail(monkeypatch):
    """bench/profile_step.py --emulate-bf16-matmuls: a bf16 matmul is computed in fp32 and rounded back
    (the same numbers as a bf16 product of those inputs, to bf16 rounding); the breakdown keeps neither the
    emulation's casts and product nor the dispatch mode's outer record of an op it passed on. CPU; bf16
    inputs, fp32 products."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    monkeypatch.syspath_prepend(str(BENCH))
    from profile_step import EmulatedBf16Matmuls, StepProfile

    torch.manual_seed(0)
    a, b = torch.randn(8, 16, dtype=torch.bfloat16), torch.randn(16, 4, dtype=torch.bfloat16)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof, EmulatedBf16Matmuls():
        product = a @ b
        total = product + product
    assert product.dtype == total.dtype == torch.bfloat16
    assert torch.equal(product, (a.float() @ b.float()).bfloat16())
    emulated = StepProfile(emulated=True, gpu=False)
    emulated.read(prof)
    assert emulated.by_op["aten::add"][1] == 1, dict(emulated.by_op)
    assert not {"aten::mm", "aten::_to_copy", "aten::copy_"} & {k for k, (_, n) in emulated.by_op.items() if n}
    assert emulated.flops == 0

    # autocast's casts of a linear layer's fp32 input and weight are work of a bf16 step: they stay
    w = torch.randn(4, 16)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as cast_prof, EmulatedBf16Matmuls(), \
            torch.autocast("cpu", dtype=torch.bfloat16):
        torch.nn.functional.linear(a.float(), w)
    casts = StepProfile(emulated=True, gpu=False)
    casts.read(cast_prof)
    assert casts.by_op["aten::_to_copy"][1] == 3, dict(casts.by_op)  # a.float(), then input and weight to bf16
    assert casts.by_op["aten::mm"][1] == 0

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as plain_prof:
        a.float() @ b.float()
    plain = StepProfile(emulated=False, gpu=False)
    plain.read(plain_prof)
    assert plain.by_op["aten::mm"][1] == 1 and plain.flops == 2 * 8 * 16 * 4
