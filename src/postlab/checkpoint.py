"""Checkpoints and atomic files. Everything is written under a temporary name and renamed into
place, so a killed process leaves either the old file or the new one, never half of one.
Weights are safetensors; optimizer/RNG state loads with torch.load(weights_only=True)."""
from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path

from . import faults
from .errors import ModelError, TrainingError
from .lazy import lazy, torch

safetensors_torch = lazy("safetensors.torch")  # (the atomic writers here serve the torch-free front too)


def _umask() -> int:
    """The process's umask (read by setting it, so read when needed, not once at import)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` under a temporary name in the same folder, fsync, and rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        faults.point("file-write")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: str | Path) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ModelError(f"{path}: unreadable ({e}); delete it to start that part again") from None


def honour_umask(path: Path) -> None:
    """Give a directory written under a temporary name (mkdtemp: 0700) and everything in it the
    permissions the user's umask asks for (files 0666 & ~umask, folders 0777 & ~umask), as files
    written in place would have: on a shared machine others can then read saved models."""
    mask = _umask()
    for p in [path, *Path(path).rglob("*")]:
        if not p.is_symlink():
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def replace_dir(tmp: Path, final: Path) -> None:
    """Swap a fully written directory into place (with the umask's permissions). A crash in between
    leaves `final.old`, which `existing_dir` picks up."""
    honour_umask(tmp)
    old = final.with_name(final.name + ".old")
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
        faults.point("dir-swap")  # killed here: `final.old` is picked up on resume
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def remove_dir(final: Path) -> None:
    """Remove a directory written with `replace_dir`, with its leftovers (`final.old`, and the temporary
    folders of a write that was killed)."""
    for d in (final, final.with_name(final.name + ".old"), *final.parent.glob(f".{final.name}.tmp-*")):
        shutil.rmtree(d, ignore_errors=True)


def existing_dir(final: Path) -> Path | None:
    if (final / "state.json").is_file() or (final / "config.json").is_file() or (final / "adapter_config.json").is_file():
        return final
    old = final.with_name(final.name + ".old")
    return old if old.is_dir() else None


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_trainable(path: Path, model: torch.nn.Module) -> None:
    """The model's trainable weights alone (safetensors), written atomically."""
    tmp = path.with_name(f".{path.name}.tmp")
    safetensors_torch.save_file(trainable_state(model), str(tmp))
    honour_umask(tmp)
    os.replace(tmp, path)


def load_trainable(path: Path, model: torch.nn.Module) -> None:
    """Copy weights that `save_trainable` wrote into the model's trainable parameters."""
    try:
        weights = safetensors_torch.load_file(str(path), device=str(next(model.parameters()).device))
    except Exception as e:  # noqa: BLE001 - any corruption becomes one clear message
        raise ModelError(f"{path}: unreadable trained weights ({type(e).__name__}: {e}); delete it") from None
    _copy_trainable(model, weights, path)


def _copy_trainable(model: torch.nn.Module, weights: dict[str, torch.Tensor], where: Path) -> None:
    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    if set(weights) != expected:
        raise ModelError(f"{where}: holds other parameters than this stage trains "
                         f"({len(set(weights) ^ expected)} differ): was the config changed?")
    with torch.no_grad():
        params = dict(model.named_parameters())
        for n, t in weights.items():
            params[n].copy_(t)


def save_checkpoint(path: Path, weights: dict[str, torch.Tensor], optimizer_state: dict | None, scheduler,
                    state: dict) -> None:
    """Trainable weights, optimizer (None: not kept), scheduler and RNG state, plus `state` (progress counters)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.tmp-*"):  # left by a run killed while writing
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        safetensors_torch.save_file(weights, str(tmp / "trainable.safetensors"))
        rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save({"optimizer": optimizer_state, "scheduler": scheduler.state_dict(), "rng": rng},
                   tmp / "trainer_state.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=2))
    except (OSError, RuntimeError) as e:  # a full disk surfaces as either, with cryptic messages
        shutil.rmtree(tmp, ignore_errors=True)
        free = shutil.disk_usage(path.parent).free / 2**30
        raise TrainingError(f"{path}: could not write the checkpoint ({str(e).splitlines()[0][:200]}); "
                            f"{free:.1f} GiB free on that disk. The previous checkpoint (if any) is kept; free "
                            f"space and rerun with --resume") from None
    faults.point("checkpoint-write")  # files written, not yet in place
    replace_dir(tmp, path)


def load_checkpoint(path: Path, model) -> tuple[dict, dict, dict]:
    """Load the trainable weights into `model` and restore the RNG state; returns the optimizer and
    scheduler states (for the caller to load once it has built them) and the progress counters."""
    found = existing_dir(path)
    if found is None:
        raise ModelError(f"{path}: no checkpoint to resume from")
    try:
        weights = safetensors_torch.load_file(str(found / "trainable.safetensors"), device=str(next(model.parameters()).device))
        trainer = torch.load(found / "trainer_state.pt", weights_only=True, map_location="cpu")
        state = json.loads((found / "state.json").read_text())
    except Exception as e:  # noqa: BLE001 - any corruption becomes one clear message
        raise ModelError(f"{found}: corrupt checkpoint ({type(e).__name__}: {e}); delete it to restart "
                         f"the stage from its beginning") from None
    _copy_trainable(model, weights, found)
    torch.set_rng_state(trainer["rng"]["torch"])
    random.setstate(_as_tuple(trainer["rng"]["python"]))
    if "cuda" in trainer["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(trainer["rng"]["cuda"])
    return trainer["optimizer"], trainer["scheduler"], state


def _as_tuple(x):
    return tuple(_as_tuple(i) for i in x) if isinstance(x, (list, tuple)) else x
