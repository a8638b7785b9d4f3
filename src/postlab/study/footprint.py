"""Disk a study keeps, for `postlab study plan`: the weights each run leaves behind (full models,
adapters, kept checkpoints) and the most a stage adds while it trains (its checkpoint with AdamW's
two moments). Sizes come from the model's files where they are on disk (a local directory, the
embedded model's converted copy), else from its config.json shapes, else they are unknown. No torch.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

BYTES_PER_PARAM = 4  # fp32 master weights, as postlab saves them
# The embedded SmolLM2-135M's shapes, for a machine that has not converted it yet.
EMBEDDED_CONFIG = {"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                   "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152,
                   "tie_word_embeddings": True}
TOKENIZER_BYTES = 3.6e6  # tokenizer files written beside every saved model (SmolLM2's: ~3.5 MB)


def _model_dir(name: str) -> Path | None:
    from ..cache import postlab_home

    if Path(name).expanduser().is_dir():
        return Path(name).expanduser()
    converted = postlab_home() / "models" / name
    return converted if converted.is_dir() else None


def model_config(name: str) -> dict | None:
    """The model's config.json as a dict, or the embedded model's known shapes, or None."""
    d = _model_dir(name)
    if d is not None and (d / "config.json").is_file():
        try:
            return json.loads((d / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
    from ..hub import EMBEDDED

    return dict(EMBEDDED_CONFIG) if name in EMBEDDED else None


def _linear_shapes(cfg: dict) -> dict[str, tuple[int, int]] | None:
    """(in, out) of each linear layer of one transformer block, by module name (Llama and GPT-2)."""
    kind = cfg.get("model_type")
    if kind in ("llama", "mistral", "qwen2"):
        h, inter = cfg["hidden_size"], cfg["intermediate_size"]
        heads = cfg["num_attention_heads"]
        hd = cfg.get("head_dim") or h // heads
        kv = cfg.get("num_key_value_heads") or heads
        return {"q_proj": (h, heads * hd), "k_proj": (h, kv * hd), "v_proj": (h, kv * hd), "o_proj": (heads * hd, h),
                "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}
    if kind == "gpt2":
        h = cfg["n_embd"]
        inner = cfg.get("n_inner") or 4 * h
        return {"c_attn": (h, 3 * h), "attn.c_proj": (h, h), "c_fc": (h, inner), "mlp.c_proj": (inner, h)}
    return None


def _layers(cfg: dict) -> int:
    return int(cfg.get("num_hidden_layers") or cfg.get("n_layer") or 0)


def full_params(cfg: dict) -> int | None:
    shapes = _linear_shapes(cfg)
    if shapes is None:
        return None
    h = cfg.get("hidden_size") or cfg.get("n_embd")
    vocab = cfg["vocab_size"]
    embed = vocab * h * (1 if cfg.get("tie_word_embeddings", True) else 2)
    if cfg.get("model_type") == "gpt2":
        embed += cfg.get("n_positions", 1024) * h
    per_layer = sum(i * o for i, o in shapes.values()) + 2 * h
    return embed + _layers(cfg) * per_layer + h


def model_bytes(name: str) -> float | None:
    """Bytes of the model's weights in fp32: its safetensors files where they are on disk, else from its shapes."""
    d = _model_dir(name)
    if d is not None:
        files = list(d.glob("*.safetensors"))
        if files and not (d / "adapter_config.json").is_file():
            return float(sum(f.stat().st_size for f in files))
    cfg = model_config(name)
    n = full_params(cfg) if cfg else None
    return None if n is None else float(n * BYTES_PER_PARAM)


def adapter_bytes(name: str, rank: int, targets) -> float | None:
    """Bytes of a LoRA/DoRA adapter of rank `rank` on `targets` ('all-linear' or module names)."""
    cfg = model_config(name)
    shapes = _linear_shapes(cfg) if cfg else None
    if shapes is None:
        return None
    chosen = [s for m, s in shapes.items() if targets == "all-linear" or any(m.endswith(t) or t in m for t in targets)]
    return float(_layers(cfg) * sum(rank * (i + o) for i, o in chosen) * BYTES_PER_PARAM)


@dataclass
class Footprint:
    kept: float = 0.0  # bytes the study's runs keep when they are done
    peak_extra: float = 0.0  # the most a stage adds while it trains (its checkpoint, optimizer state included)
    unknown: int = 0  # stages whose sizes could not be estimated
    parts: dict[str, list[float]] | None = None  # what is kept: label -> sizes

    def add(self, label: str, size: float) -> None:
        self.parts = self.parts or {}
        self.parts.setdefault(label, []).append(size)
        self.kept += size


def study_footprint(runs, reused: set[tuple[str, int]]) -> Footprint:
    """What the runs keep on disk; `reused` holds (run id, stage index) of stages copied from an earlier
    run (hard links: no extra disk)."""
    fp = Footprint()
    trained: set[str] = set()
    for r in runs:
        cfg = r.config
        for i, s in enumerate(cfg.stages):
            if (r.run_id, i) in reused:
                continue
            last = i == len(cfg.stages) - 1
            method = s.parameterization.method
            opts = (s.parameterization.model_extra or {}).get(method) or {}
            full = model_bytes(cfg.model.name)
            trainable = full if method == "fft" else adapter_bytes(cfg.model.name, int(opts.get("r", 8)),
                                                                   opts.get("target_modules", "all-linear"))
            if trainable is None:
                fp.unknown += 1
                continue
            fp.peak_extra = max(fp.peak_extra, 3 * trainable)  # weights + AdamW's two moments
            if s.save_model or not last:
                fp.add("full models" if method == "fft" else "adapters", trainable + TOKENIZER_BYTES)
            elif s.keep_weights:
                fp.add("finished checkpoints" if method == "fft" else "adapter checkpoints", trainable)
            if s.parameterization.adapter == "merge" and i > 0 and method != "fft" and full is not None:
                fp.add("merged bases", full + TOKENIZER_BYTES)
            if s.expo_lambda is not None and cfg.stage_key(i, trained=True) not in trained:  # stage.keep_training
                trained.add(cfg.stage_key(i, trained=True))
                fp.add("trained weights kept for ExPO", trainable)
    return fp


def human_bytes(n: float) -> str:
    if n <= 0 or math.isnan(n):
        return "0 B"
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def format_footprint(fp: Footprint) -> str:
    parts = "; ".join(f"{len(v)} {k} ({human_bytes(sum(v))})" for k, v in (fp.parts or {}).items()) or "no weights"
    line = (f"  Disk: ~{human_bytes(fp.kept)} of weights kept when every run is done ({parts}), plus up to "
            f"{human_bytes(fp.peak_extra)} while a stage trains (its checkpoint with AdamW state); evaluation "
            f"files and caches ($POSTLAB_HOME) not counted.")
    if fp.unknown:
        line += f" {fp.unknown} stage(s) of a model whose size is unknown here are not counted."
    return line
