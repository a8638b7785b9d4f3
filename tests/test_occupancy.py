"""Training processes that share a CPU: a run that starts while others' threads already fill the
cores is warned; processes that have ended are forgotten; a study's workers, which split the cores,
are not warned. CPU, fp32."""
from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest

from helpers import run_config, write_pairs
from postlab import occupancy
from postlab.config import parse_run_config
from postlab.run import run

WARNING = "other postlab processes are training on this machine's CPU"


@pytest.fixture
def registry(tmp_path, monkeypatch):
    monkeypatch.setattr(occupancy, "registry_dir", lambda: tmp_path / "training")
    (tmp_path / "training").mkdir()
    return tmp_path / "training"


@pytest.fixture
def other_process():
    """A live process standing in for another postlab run."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc.pid
    proc.kill()
    proc.wait()


def test_a_run_is_warned_when_another_fills_the_cores(registry, other_process, monkeypatch, caplog):
    monkeypatch.setattr(occupancy.os, "cpu_count", lambda: 2)
    (registry / f"{other_process}.json").write_text(json.dumps({"pid": other_process, "threads": 2, "what": "r1/0-sft"}))
    with caplog.at_level(logging.WARNING, logger="postlab"):
        with occupancy.training_on_cpu(2, "r2/0-sft") as busy:
            assert [o["pid"] for o in busy] == [other_process]
            mine = json.loads((registry / f"{occupancy.os.getpid()}.json").read_text())
            assert mine["threads"] == 2 and mine["what"] == "r2/0-sft"
    assert WARNING in caplog.text and f"pid {other_process} (r1/0-sft, 2 threads)" in caplog.text
    assert "4 threads on 2 cores" in caplog.text
    assert sorted(p.name for p in registry.iterdir()) == [f"{other_process}.json"]  # this one has left


def test_split_cores_and_ended_processes_are_not_warned_about(registry, other_process, monkeypatch, caplog):
    monkeypatch.setattr(occupancy.os, "cpu_count", lambda: 2)
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    (registry / f"{ended.pid}.json").write_text(json.dumps({"pid": ended.pid, "threads": 2}))
    (registry / f"{other_process}.json").write_text(json.dumps({"pid": other_process, "threads": 1}))
    (registry / "partial.json").write_text("{")  # being written by another process: skipped
    with caplog.at_level(logging.WARNING, logger="postlab"):
        with occupancy.training_on_cpu(1, "worker 2 of 2") as busy:  # as study --workers 2 on 2 cores
            assert [o["pid"] for o in busy] == [other_process]
    assert WARNING not in caplog.text
    assert not (registry / f"{ended.pid}.json").exists()


def test_a_run_registers_while_it_trains(registry, other_process, tiny_llama, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(occupancy.os, "cpu_count", lambda: 1)
    (registry / f"{other_process}.json").write_text(json.dumps({"pid": other_process, "threads": 1, "what": "r1"}))
    tree = run_config(tiny_llama, tmp_path / "run", write_pairs(tmp_path / "pairs.tsv", 8), epochs=1)
    with caplog.at_level(logging.WARNING, logger="postlab"):
        run(parse_run_config(tree))
    assert WARNING in caplog.text and "(run/0-sft," not in caplog.text  # the warning names the others
    assert sorted(p.name for p in registry.iterdir()) == [f"{other_process}.json"]
