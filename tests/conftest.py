"""Shared fixtures: tiny random-weight models (Llama and GPT-2 architectures) around the real
SmolLM2 tokenizer, so tests exercise real tokenization at a fraction of the cost."""
from __future__ import annotations

import os
from pathlib import Path

# Tiny models gain nothing from a second thread, and one thread keeps the suite from fighting a
# training run (or CI's other job) for the cores. Subprocesses inherit it through the environment.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

import postlab.models  # noqa: E402
from postlab.models import embedded_tokenizer_dir  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# The data sits next to the repository (../shared/data); a clone elsewhere points at it with
# POSTLAB_DATA (the variable postlab itself reads), or the tests that read it are skipped, saying so.
DATA = Path(os.environ.get("POSTLAB_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch) -> Path:
    """Each test gets its own result cache (log-probs, samples, evaluations, completed stages), so no
    test sees another's results; the converted model and tokenizer stay shared."""
    monkeypatch.setenv("POSTLAB_CACHE", str(tmp_path / "postlab-cache"))
    return tmp_path / "postlab-cache"


@pytest.fixture(scope="session")
def tokenizer_dir() -> Path:
    return embedded_tokenizer_dir()


def build_tiny_model(out: Path, arch: str, tokenizer_dir: Path, seed: int = 0) -> Path:
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    if arch == "llama":
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                          tie_word_embeddings=True, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
        model = LlamaForCausalLM(cfg)
    elif arch == "gpt2":
        cfg = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=512,
                         eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
        model = GPT2LMHeadModel(cfg)
    else:
        raise ValueError(arch)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, tokenizer_dir) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama", tokenizer_dir)


@pytest.fixture(scope="session")
def peaky_llama(tmp_path_factory, tokenizer_dir) -> Path:
    """The tiny Llama with its final norm scaled up: less uniform next-token distributions, for tests whose
    quantities vanish on a near-uniform model (WPO's pair weights are 1 there; here 0.2-0.4)."""
    from transformers import AutoModelForCausalLM

    out = build_tiny_model(tmp_path_factory.mktemp("peaky-llama"), "llama", tokenizer_dir)
    model = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        model.model.norm.weight.mul_(5.0)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory, tokenizer_dir) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-gpt2"), "gpt2", tokenizer_dir)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA.is_dir():
        pytest.skip(f"shared data not found at {DATA} (set POSTLAB_DATA to its folder)")
    return DATA


# --------------------------------------------------------------------------------------------
# Precision: every test states the precision it assumes; none depends on what `auto` resolves to
# on the machine that runs it (bf16 where the CPU has AVX-512 BF16 or AMX, fp32 elsewhere).
# --------------------------------------------------------------------------------------------

BF16_UNIT_ROUNDOFF = 2.0 ** -8  # bf16 keeps 8 significant bits: a stored value is off by at most this, relatively


def tolerance(precision: str, scale: float = 1.0, ulps: float = 4.0) -> float:
    """Absolute tolerance for comparing two computations of the same quantity of size ~`scale` that
    round differently (other batch shapes, another order of sums). fp32: float round-off (1e-5
    relative). bf16: `ulps` units of bf16's unit roundoff at that scale (each value a forward pass
    stores in bf16 is off by up to half a unit; a log-softmax of such logits by up to one per input).
    Derived from the format, not measured on one machine."""
    if precision == "fp32":
        return 1e-5 * max(scale, 1.0)
    return ulps * BF16_UNIT_ROUNDOFF * max(scale, 1.0)


@pytest.fixture(params=["fp32", "bf16"])
def precision(request) -> str:
    """Run a numeric test under each precision postlab trains in on CPU (bf16 autocast works on any
    x86 CPU, natively fast only with AVX-512 BF16/AMX)."""
    return request.param


@pytest.fixture(autouse=True)
def precision_must_be_stated(request, monkeypatch):
    """`precision: auto` inside a test is an error unless the test is marked `auto_precision`
    (tests of the auto rule itself, which then fix the CPU flags they assume)."""
    if request.node.get_closest_marker("auto_precision"):
        return
    resolve = postlab.models.resolve_precision

    def stated_only(precision: str, device):
        if precision == "auto":
            raise AssertionError("this test relies on precision: auto, which resolves differently on different "
                                 "CPUs; state model.precision (fp32 or bf16)")
        return resolve(precision, device)

    monkeypatch.setattr(postlab.models, "resolve_precision", stated_only)
