"""Every bench result can be traced to its code: the JSONs record commit, dirty and command, and the scripts write
them."""

import json
import re
import shutil
import sys
from pathlib import Path

import pytest
from conftest import REPO

import provenance  # bench/ on PYTHONPATH (tests/conftest.py)

RESULTS = sorted((REPO / "bench" / "results").glob("*.json"))


@pytest.mark.parametrize("path", RESULTS, ids=[p.name for p in RESULTS])
def test_every_result_names_its_commit_and_command(path):
    record = json.loads(path.read_text())
    assert "commit" in record and "command" in record and "dirty" in record, "run bench/provenance.py's keys"
    for key in ("commit", "command"):
        if record[key] is None:  # unknown only where the record says why
            assert key in record.get("provenance_note", ""), f"{key} is null and provenance_note does not say why"
    if record["commit"] is not None:
        assert re.match(r"[0-9a-f]{7,40}\b", record["commit"])


def test_there_are_results_to_check():
    assert len(RESULTS) > 50


@pytest.mark.skipif(shutil.which("git") is None or not (REPO / ".git").exists(), reason="needs a git checkout")
def test_provenance_reads_the_checkout_and_the_command_line():
    record = provenance.provenance()
    assert re.fullmatch(r"[0-9a-f]{40}", record["commit"])
    assert isinstance(record["dirty"], bool)
    if not record["dirty"]:
        assert record["diff_sha256"] is None and "untracked" not in record
    assert record["command"].split()[0] == Path(sys.executable).name and sys.argv[0] in record["command"]


def test_outside_a_git_checkout_the_commit_is_none_and_said(tmp_path, monkeypatch):
    monkeypatch.setattr(provenance, "REPO", tmp_path)  # not a checkout: git fails, nothing raises
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    monkeypatch.delenv("BENCH_COMMIT", raising=False)
    record = provenance.provenance()
    assert record["commit"] is None and record["dirty"] is None and "not a git checkout" in record["provenance_note"]
    monkeypatch.setenv("BENCH_COMMIT", "0123abc")
    assert provenance.provenance()["commit"] == "0123abc"


def writes_json(text):
    return bool(re.search(r"write_text\(\s*(json\.dumps|text\b)|json\.dump\(", text))


SCRIPTS = sorted(p for p in (REPO / "bench").glob("*.py") if p.name != "provenance.py")


def test_every_bench_script_that_writes_a_json_records_provenance():
    writers = [p.name for p in SCRIPTS if writes_json(p.read_text())]
    assert {"dedup.py", "generation_speed.py", "training_speed.py", "varlen_check.py"} <= set(writers)
    missing = [name for name in writers + ["schedule_replay.py"]
               if "**provenance()" not in (REPO / "bench" / name).read_text()]
    assert not missing, f"these write a JSON without provenance(): {missing}"
