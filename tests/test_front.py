"""The command line a new user meets: shipped configs and studies valid from any directory, look-ups
(--version, list, --dry-run, defaults in --help), quiet output when asked or when piped."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import run_config, write_pairs
from postlab.cli import main

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
STUDIES = sorted((REPO / "studies").glob("*.yaml"))
PREPARED = {"distill", "distill-pilot"}  # studies whose inputs a script writes before they plan


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_shipped_config_is_valid_and_finds_its_data_from_another_directory(path, data_dir, tmp_path,
                                                                                   monkeypatch):
    from postlab.config import load_run_config
    from postlab.run import check_inputs

    monkeypatch.chdir(tmp_path)  # nothing beside this directory
    monkeypatch.setenv("POSTLAB_DATA", str(data_dir))
    cfg = load_run_config(path)
    check_inputs([(path.stem, cfg)])  # every data file read, every model found


@pytest.mark.parametrize("path", STUDIES, ids=[p.stem for p in STUDIES])
def test_every_shipped_study_plans_and_finds_its_data_from_another_directory(path, data_dir, tmp_path, monkeypatch):
    from postlab.study import check_data, load_study, plan

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("POSTLAB_DATA", str(data_dir))
    if path.stem in PREPARED:  # its teacher, student and records are made by studies/distill-prepare.sh first
        load_study(path)
        pytest.skip(f"studies/{path.name} reads models and records that studies/distill-prepare.sh writes")
    check_data(plan(load_study(path)))


def test_the_default_data_is_found_beside_the_checkout_not_the_current_directory(tmp_path, monkeypatch):
    from postlab.tasks.base import data_dir

    monkeypatch.delenv("POSTLAB_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    assert data_dir() == REPO.parent / "shared" / "data"
    monkeypatch.setenv("POSTLAB_DATA", str(tmp_path))
    assert data_dir() == tmp_path


def test_data_option_points_the_tasks_at_a_folder(tmp_path, monkeypatch, capsys):
    import os

    monkeypatch.setenv("POSTLAB_DATA", "unset")
    (tmp_path / "quora").mkdir()
    write_pairs(tmp_path / "quora" / "quora-train.tsv", 8)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"stages": [{"task": {"name": "paraphrase"}}]}))
    assert main(["train", str(cfg), "--data", str(tmp_path), "--dry-run"]) == 0
    assert os.environ["POSTLAB_DATA"] == str(tmp_path.resolve())


def test_dry_run_prints_the_resolved_config_with_its_defaults_and_writes_nothing(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    out = tmp_path / "run"
    path.write_text(yaml.safe_dump({"output_dir": str(out), "stages": [{"optim": {"lr": 3e-5}}]}))
    assert main(["train", str(path), "optim.batch_size=4", "--dry-run"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    stage = printed["stages"][0]
    assert stage["optim"]["lr"] == 3e-5 and stage["optim"]["batch_size"] == 4  # given, and overridden
    assert stage["optim"]["schedule"] == "linear" and stage["objective"]["name"] == "nll"  # defaults filled in
    assert not out.exists()


@pytest.mark.parametrize("what, expect", [("tasks", ["paraphrase:", "sonnets:", "options under task.cloze:"]),
                                          ("objectives", ["dpo (preference; needs the reference)", "beta: float = 0.1"]),
                                          ("parameterizations", ["lora:", "r: int = 8", "fft:"])])
def test_list_names_what_a_config_can_name_with_options(what, expect, capsys):
    assert main(["list", what]) == 0
    said = capsys.readouterr().out
    for e in expect:
        assert e in said


def test_version_and_defaults_in_help(capsys):
    from postlab import __version__

    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"postlab {__version__}"
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 0.9)" in text and "(default: auto)" in text


def test_a_run_piped_to_a_file_draws_no_progress_bars(tmp_path, tiny_llama):
    """Standard error is a file here, not a terminal: no carriage-return progress output."""
    data = write_pairs(tmp_path / "p.tsv", 8)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(run_config(tiny_llama, tmp_path / "run", data, epochs=1)))
    err = tmp_path / "err.txt"
    with open(err, "w") as f:
        p = subprocess.run([sys.executable, "-m", "postlab", "train", str(cfg)], stderr=f, stdout=subprocess.PIPE,
                           text=True, cwd=tmp_path)
    assert p.returncode == 0, err.read_text()[-2000:]
    assert "\r" not in err.read_text() and "step/s" not in err.read_text()


FRESH = """
import sys
from postlab.cli import main
try:
    main({argv!r})
except SystemExit:
    pass
print("IMPORTED", "torch" in sys.modules, "transformers" in sys.modules)
"""


def _imports_after(argv: list[str], cwd: Path) -> tuple[bool, bool]:
    """(torch imported, transformers imported) by `postlab <argv>` in a fresh interpreter."""
    p = subprocess.run([sys.executable, "-c", FRESH.format(argv=argv)], capture_output=True, text=True, cwd=cwd)
    line = next(x for x in p.stdout.splitlines() if x.startswith("IMPORTED"))
    return line.split()[1] == "True", line.split()[2] == "True"


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["study", "plan", "--help"], ["list", "objectives"]],
                         ids=lambda a: " ".join(a))
def test_help_and_lookups_import_neither_torch_nor_transformers(argv, tmp_path):
    assert _imports_after(argv, tmp_path) == (False, False)


def test_validating_every_shipped_config_imports_neither_torch_nor_transformers(tmp_path):
    argv_list = [["train", str(p), "--dry-run"] for p in CONFIGS]
    code = "\n".join(["import sys", "from postlab.cli import main"]
                     + [f"assert main({a!r}) == 0" for a in argv_list]
                     + ["print('IMPORTED', 'torch' in sys.modules, 'transformers' in sys.modules)"])
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip().splitlines()[-1] == "IMPORTED False False"


def test_study_plan_imports_no_torch(tmp_path, data_dir):
    import os

    code = FRESH.format(argv=["study", "plan", str(REPO / "studies" / "quick.yaml")])
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                       env={**os.environ, "POSTLAB_DATA": str(data_dir)})
    assert "total: 12 run(s)" in p.stdout, p.stderr[-2000:]
    assert p.stdout.strip().splitlines()[-1].split()[1] == "False"  # torch
