"""On-disk cache of per-token log-probs (reference or teacher), computed once per stage so no second
model stays in memory during training. Keyed by a hash of the model weights, the tokenized data and
the settings; validated on load."""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from safetensors import safe_open

from . import faults
from .checkpoint import atomic_write_bytes
from .lazy import lazy, torch

safetensors_torch = lazy("safetensors.torch")
from .data import Tokenized
from .parameterizations import function_state

if TYPE_CHECKING:
    from .models import LM

log = logging.getLogger("postlab")


def postlab_home() -> Path:
    return Path(os.environ.get("POSTLAB_HOME", Path.home() / ".cache" / "postlab")).expanduser()


def cache_dir() -> Path:
    """Computed results reused across runs (log-probs, samples, evaluations, completed stages):
    $POSTLAB_CACHE, else <postlab home>/cache. Safe to delete; everything in it is recomputed."""
    return Path(os.environ.get("POSTLAB_CACHE", postlab_home() / "cache")).expanduser()


@contextlib.contextmanager
def lock(name: str):
    """An exclusive lock, across the processes of this machine, on one cached result (by its key): the
    runs of a study executed side by side (`--workers`) compute each shared result once, and the others
    wait for it and read it. (A file lock: on a cluster, give each machine its own POSTLAB_CACHE.)"""
    import fcntl

    path = location("locks") / f"{name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def location(kind: str) -> Path:
    """Where one kind of cached result lives: logps (reference/teacher log-probs), eval (evaluations),
    samples (sampled preference pairs and distillation responses), stages (completed-stage index)."""
    return cache_dir() / kind


def weights_hash(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(function_state(model).items()):
        h.update(name.encode())
        if t.numel():  # hashed in place: a bytes copy of each tensor doubled the time (0.65 s -> 0.37 s, 135M)
            h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy())
    return h.hexdigest()


def items_hash(items: list[Tokenized]) -> str:
    h = hashlib.sha256()
    for it in items:
        h.update(json.dumps([it.prompt, it.completions]).encode())
    return h.hexdigest()


def tokenizer_fingerprint(tok) -> str:
    """What the tokenizer maps text to, not where it was loaded from: a model saved with its
    tokenizer in a new folder (a stage's model/) keeps its cache entries."""
    fp = getattr(tok, "_postlab_fingerprint", None)
    if fp is None:
        h = hashlib.sha256(json.dumps(sorted(tok.get_vocab().items())).encode())
        h.update(json.dumps([tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token]).encode())
        fp = h.hexdigest()
        try:
            tok._postlab_fingerprint = fp
        except AttributeError:
            pass
    return fp


def cache_key(lm: LM, items: list[Tokenized], settings: dict) -> str:
    tok = lm.tokenizer
    parts = {"weights": weights_hash(lm.model), "data": items_hash(items), "vocab": len(tok),
             "tokenizer": tokenizer_fingerprint(tok), "precision": lm.precision, **settings}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def _content_hash(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_tensors(path: Path, key: str, tensors: dict[str, list[list[torch.Tensor]]]) -> None:
    """Each named structure (per item, per completion: a tensor with completion tokens first) is
    stored flat, with the lengths to split it again."""
    first = next(iter(tensors.values()))
    flat = {name: torch.cat([t for v in values for t in v]).contiguous() for name, values in tensors.items()}
    flat["lengths"] = torch.tensor([len(t) for v in first for t in v], dtype=torch.long)
    data = safetensors_torch.save(flat, metadata={"key": key, "items": str(len(first)), "per_item": str(len(first[0])),
                                "sha256": _content_hash(flat)})
    faults.point("cache-write")
    atomic_write_bytes(path, data)


def load_tensors(path: Path, key: str, n_items: int, names: tuple[str, ...]) -> dict[str, list[list[torch.Tensor]]] | None:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            if meta.get("key") != key or int(meta["items"]) != n_items:
                log.warning("%s: cache file belongs to other data or another model; recomputing", path)
                return None
            lengths, per = f.get_tensor("lengths"), int(meta["per_item"])
            flat = {name: f.get_tensor(name) for name in names}
    except Exception as e:  # noqa: BLE001 - a corrupt cache is recomputed, never trusted
        log.warning("%s: unreadable cache (%s); recomputing", path, e)
        return None
    if any(int(lengths.sum()) != t.shape[0] for t in flat.values()):
        log.warning("%s: cache file is truncated; recomputing", path)
        return None
    if _content_hash({**flat, "lengths": lengths}) != meta.get("sha256"):
        log.warning("%s: cache contents do not match their checksum; recomputing", path)
        return None
    out = {}
    for name, t in flat.items():
        pieces = list(torch.split(t, lengths.tolist()))
        out[name] = [pieces[i * per:(i + 1) * per] for i in range(n_items)]
    return out


def cached_evaluation(lm: LM, settings: dict, out_dir: Path, compute: Callable[[Path], dict[str, float]]) -> dict[str, float]:
    """Task metrics of `lm` under `settings` (the task's dev data and evaluation settings), computed
    once per model weights: the base model's evaluation is shared by every run that starts from it,
    and a stage's starting evaluation is its predecessor's final one. Files the evaluation writes
    (predictions, generated text) are kept with the cached metrics and copied to `out_dir`."""
    from . import __version__

    # per_example 2: evaluations write per-example statistics (postlab.metrics); older entries lack them;
    # 3: classification tasks also report dev_loss (the correct answer's NLL)
    key = cache_key(lm, [], {"role": "evaluation", "postlab": __version__, "per_example": 3, **settings})
    with lock(f"eval-{key}"):
        return _cached_evaluation(location("eval") / key, out_dir, compute)


def _cached_evaluation(entry: Path, out_dir: Path, compute: Callable[[Path], dict[str, float]]) -> dict[str, float]:
    import shutil

    from .checkpoint import atomic_write_json

    metrics_file = entry / "metrics.json"
    if metrics_file.is_file():
        try:
            metrics = json.loads(metrics_file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            log.warning("%s: unreadable cached evaluation (%s); evaluating again", metrics_file, e)
        else:
            log.info("evaluation: reusing cached result for these weights (%s)", entry)
            if (entry / "files").is_dir():
                shutil.copytree(entry / "files", out_dir, dirs_exist_ok=True)
            return metrics
    files = entry / "files"
    shutil.rmtree(files, ignore_errors=True)
    files.mkdir(parents=True, exist_ok=True)
    metrics = compute(files)
    shutil.copytree(files, out_dir, dirs_exist_ok=True)
    atomic_write_json(metrics_file, metrics)  # last: an entry without it is incomplete
    return metrics
