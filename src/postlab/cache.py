"""On-disk cache of per-token log-probs (reference or teacher), computed once per stage so no second
model stays in memory during training. Keyed by a hash of the model weights, the tokenized data and
the settings; validated on load."""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .data import Tokenized
from .logprobs import token_logps
from .models import LM, postlab_home

log = logging.getLogger("postlab")


def weights_hash(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def items_hash(items: list[Tokenized]) -> str:
    h = hashlib.sha256()
    for it in items:
        h.update(json.dumps([it.prompt, it.completions]).encode())
    return h.hexdigest()


def cache_key(lm: LM, items: list[Tokenized], settings: dict) -> str:
    tok = lm.tokenizer
    parts = {"weights": weights_hash(lm.model), "data": items_hash(items), "vocab": len(tok),
             "tokenizer": getattr(tok, "name_or_path", ""), "precision": lm.precision, **settings}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def _save(path: Path, key: str, values: list[list[torch.Tensor]]) -> None:
    flat = torch.cat([t for v in values for t in v]).float().contiguous()
    lengths = torch.tensor([len(t) for v in values for t in v], dtype=torch.long)
    tmp = path.with_name(path.name + ".tmp")
    save_file({"values": flat, "lengths": lengths}, str(tmp),
              metadata={"key": key, "items": str(len(values)), "per_item": str(len(values[0]))})
    tmp.replace(path)


def _load(path: Path, key: str, n_items: int) -> list[list[torch.Tensor]] | None:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            if meta.get("key") != key or int(meta["items"]) != n_items:
                log.warning("%s: cache file belongs to other data or another model; recomputing", path)
                return None
            flat, lengths, per = f.get_tensor("values"), f.get_tensor("lengths"), int(meta["per_item"])
    except Exception as e:  # noqa: BLE001 - a corrupt cache is recomputed, never trusted
        log.warning("%s: unreadable cache (%s); recomputing", path, e)
        return None
    if int(lengths.sum()) != flat.numel():
        log.warning("%s: cache file is truncated; recomputing", path)
        return None
    pieces = list(torch.split(flat, lengths.tolist()))
    return [pieces[i * per:(i + 1) * per] for i in range(n_items)]


def cached_token_logps(lm: LM, items: list[Tokenized], role: str, batch_size: int = 16,
                       cache_dir: Path | None = None) -> list[list[torch.Tensor]]:
    """Per item, per completion: the model's per-token log-probs (fp32, CPU). `role` names the use
    (reference, teacher) in logs and file names."""
    key = cache_key(lm, items, {"role": role})
    cache_dir = cache_dir or postlab_home() / "cache" / "logps"
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"{role}-{key}.safetensors"
    if path.is_file():
        got = _load(path, key, len(items))
        if got is not None:
            log.info("%s log-probs: reusing cache %s", role, path)
            return got
    out = token_logps(lm, items, batch_size, desc=f"{role} log-probs")
    _save(path, key, out)
    log.info("%s log-probs: computed for %d items, cached at %s", role, len(items), path)
    return out
