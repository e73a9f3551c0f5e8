"""schemathesis, every check, against a real `cdm serve` of the tiny store, once per
role (no key, user, contributor, admin), with a small example budget
(benchmarks/fuzz.py runs the same with a large one)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

FUZZ = Path(__file__).parent.parent / "benchmarks" / "fuzz.py"


def test_schemathesis_finds_nothing(full_store, tmp_path):
    out = subprocess.run([sys.executable, str(FUZZ), "--store", str(full_store.root),
                          "--max-examples", "5", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=900)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert out.returncode == 0, (tmp_path / "output.txt").read_text()[-5000:]
    assert summary["server_log_tracebacks"] == 0
    assert sorted(summary["roles"]) == ["admin", "contributor", "none", "user"]
    assert all(r["exit_code"] == 0 for r in summary["roles"].values()), summary["roles"]
    spec = json.loads((tmp_path / "openapi.json").read_text())
    assert spec["paths"]["/forget"]["post"]["requestBody"]["required"] is True
