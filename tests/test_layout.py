"""The data flow is one way: shards/ imports neither service/ nor valuation/."""

import ast
from pathlib import Path

import pytest

SHARDS = sorted((Path(__file__).parent.parent / "shards").glob("*.py"))


@pytest.mark.parametrize("path", SHARDS, ids=lambda p: p.name)
def test_shards_never_import_service_or_valuation(path):
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        for name in names:
            assert name.split(".")[0] not in ("service", "valuation"), f"{path.name} imports {name}"
