"""The bad-input corpus (tests/bad_inputs/cases.yaml): every case is refused with its expected
message -- or, where the case says rc 0, recovered from with it -- never with a bare traceback, and
an existing run directory is left byte-identical by a refused command."""
from __future__ import annotations

import copy
import hashlib
import re
import shutil
from pathlib import Path

import pytest
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

from helpers import write_pairs
from postlab.cli import main

HERE = Path(__file__).parent / "bad_inputs"
CASES = yaml.safe_load((HERE / "cases.yaml").read_text(encoding="utf-8"))


def merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def fill(x, subs: dict):
    if isinstance(x, str):
        for k, v in subs.items():
            x = x.replace("{" + k + "}", str(v))
        return x
    if isinstance(x, list):
        return [fill(v, subs) for v in x]
    if isinstance(x, dict):
        return {k: fill(v, subs) for k, v in x.items()}
    return x


def good_config(model: Path, good: Path, out: Path, objective: str = "nll") -> dict:
    return {"model": {"name": str(model), "device": "cpu", "precision": "fp32"}, "output_dir": str(out), "seed": 0, "reuse_stages": False,
            "stages": [{"name": "sft", "task": {"name": "paraphrase", "train": str(good), "dev": str(good), "dev_limit": 4},
                        "objective": {"name": objective}, "optim": {"batch_size": 4}, "epochs": 1}]}


def write_config(path: Path, tree: dict) -> Path:
    path.write_text(yaml.safe_dump(tree), encoding="utf-8")
    return path


def tree_digest(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*")) if p.is_file()}


def train(cfg: Path, *extra: str) -> int:
    return main(["train", str(cfg), *extra])


# Prepared situations: each returns (argv, run directory that must stay byte-identical or None).
def corrupt_model_weights(tmp: Path, model: Path, good: Path):
    broken = tmp / "broken-model"
    shutil.copytree(model, broken)
    w = broken / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 3])
    return ["train", str(write_config(tmp / "c.yaml", good_config(broken, good, tmp / "run")))], None


def _completed(tmp: Path, model: Path, good: Path, objective: str = "nll") -> Path:
    cfg = write_config(tmp / "c.yaml", good_config(model, good, tmp / "run", objective))
    assert train(cfg) == 0
    return cfg


def corrupt_resume_checkpoint(tmp: Path, model: Path, good: Path):
    tree = good_config(model, good, tmp / "run")
    tree["stages"][0]["save_model"] = False  # the finished stage keeps its checkpoint (no model/ holds its weights)
    cfg = write_config(tmp / "c.yaml", tree)
    assert train(cfg) == 0
    run = tmp / "run"
    for f in (run / "result.json", run / "0-sft" / "done.json"):
        f.unlink()  # as if killed before the stage was marked done
    w = run / "0-sft" / "checkpoint" / "trainable.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    return ["train", str(cfg), "--resume"], run


def resume_changed_config(tmp: Path, model: Path, good: Path):
    cfg = _completed(tmp, model, good)
    return ["train", str(cfg), "stages.0.optim.lr=1e-3", "--resume"], tmp / "run"


def rerun_without_resume(tmp: Path, model: Path, good: Path):
    cfg = _completed(tmp, model, good)
    return ["train", str(cfg)], tmp / "run"


def _reference_cache(tmp: Path, model: Path, good: Path) -> tuple[Path, Path]:
    _completed(tmp, model, good, objective="dpo")  # a finished DPO run leaves its reference cache
    cache = next(Path(p) for p in (tmp / "postlab-cache" / "logps").glob("reference-*.safetensors"))
    tree = good_config(model, good, tmp / "run2", objective="dpo")
    return cache, write_config(tmp / "c2.yaml", tree)


def foreign_reference_cache(tmp: Path, model: Path, good: Path):
    cache, cfg = _reference_cache(tmp, model, good)
    with safe_open(str(cache), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(cache), metadata={**meta, "key": "another-model"})
    return ["train", str(cfg)], None


def corrupt_reference_cache(tmp: Path, model: Path, good: Path):
    cache, cfg = _reference_cache(tmp, model, good)
    cache.write_bytes(cache.read_bytes()[:64])
    return ["train", str(cfg)], None


def bitflip_reference_cache(tmp: Path, model: Path, good: Path):
    cache, cfg = _reference_cache(tmp, model, good)
    raw = bytearray(cache.read_bytes())
    raw[-3] ^= 0x40  # a flipped bit in the stored values: the file still parses
    cache.write_bytes(bytes(raw))
    return ["train", str(cfg)], None


SETUPS = {f.__name__: f for f in (corrupt_model_weights, corrupt_resume_checkpoint, resume_changed_config,
                                  rerun_without_resume, foreign_reference_cache, corrupt_reference_cache,
                                  bitflip_reference_cache)}


def test_corpus_is_large_and_ids_are_unique():
    ids = [c["id"] for c in CASES]
    assert len(ids) >= 30 and len(set(ids)) == len(ids)


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_bad_input(case, tiny_llama, tmp_path, own_cache, capsys, caplog):
    good = write_pairs(tmp_path / "good.tsv", 8)
    subs = {"dir": HERE, "good": good, "model": tiny_llama, "out": tmp_path / "out"}
    keep = None
    if "setup" in case:
        argv, keep = SETUPS[case["setup"]](tmp_path, tiny_llama, good)
    elif "argv" in case:
        subs["config"] = write_config(tmp_path / "good.yaml", good_config(tiny_llama, good, tmp_path / "run"))
        argv = fill(case["argv"], subs)
    elif "config_text" in case:
        cfg = tmp_path / "case.yaml"
        cfg.write_text(fill(case["config_text"], subs), encoding="utf-8")
        argv = ["train", str(cfg)]
    else:
        tree = good_config(tiny_llama, good, tmp_path / "run")
        tree = merge(tree, fill(case.get("run", {}), subs))
        tree["stages"][0] = merge(tree["stages"][0], fill(case.get("stage", {}), subs))
        argv = ["train", str(write_config(tmp_path / "case.yaml", tree))]
    before = tree_digest(keep) if keep else None
    capsys.readouterr()
    caplog.clear()
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    said = out.err + out.out + caplog.text
    assert rc == case.get("rc", 2), said[-2000:]
    assert "Traceback" not in said
    assert re.search(case["expect"], said, re.S), f"expected /{case['expect']}/ in:\n{said[-2000:]}"
    if keep:
        assert tree_digest(keep) == before, "a refused command changed the existing run directory"
    if rc == 2 and "setup" not in case:  # a refused command leaves no output behind
        assert not (tmp_path / "run").exists() and not (tmp_path / "out").exists()
