"""benchmarks/tables.py: the tables of README.md, docs/benchmarks.md, the transformer guide and
docs/distributed.md are those the committed CSVs give, and a table that differs from them
is caught."""

from __future__ import annotations

import importlib.util
import re
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "tables.py"
DOCS = [ROOT / "README.md", ROOT / "docs" / "benchmarks.md"]
GUIDE = ROOT / "docs" / "guides" / "transformers.md"
DISTRIBUTED = ROOT / "docs" / "distributed.md"


@pytest.fixture(scope="module")
def tables():
    spec = importlib.util.spec_from_file_location("benchmark_tables", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def copies(tmp_path):
    """Copies of README.md and docs/benchmarks.md (the CSVs stay those of the repository)."""
    out = []
    for i, path in enumerate(DOCS):
        copy = tmp_path / f"{i}_{path.name}"
        shutil.copyfile(path, copy)
        out.append(copy)
    return out


def test_committed_tables_match_the_committed_csvs(tables, capsys):
    assert tables.main(["--check"]) == 0, capsys.readouterr().out
    files = [*DOCS, GUIDE, DISTRIBUTED]
    names = [re.findall(r"<!-- tables:([\w-]+):begin", p.read_text()) for p in files]
    assert [len(n) for n in names] == [7, 13, 25, 1], names
    assert {n for per_file in names for n in per_file} == set(tables.TABLES)


def test_a_tampered_table_fails_the_check_and_is_rewritten(tables, copies, capsys):
    readme, docs = copies
    original = docs.read_text()
    row = "| **0.5** | **0.00177 ± 0.00004** |"  # the radius table's chosen row
    assert original.count(row) == 1
    docs.write_text(original.replace(row, "| **0.5** | **0.00175 ± 0.00004** |"))
    assert tables.main(["--check", str(readme), str(docs)]) == 1
    out = capsys.readouterr().out
    assert "-| **0.5** | **0.00175 ± 0.00004** |" in out
    assert "+| **0.5** | **0.00177 ± 0.00004** |" in out
    assert str(docs) in out and f"stale tables in: {docs}" in out
    assert tables.main([str(readme), str(docs)]) == 0  # rewrites the block
    assert docs.read_text() == original
    assert tables.main(["--check", str(readme), str(docs)]) == 0


def test_a_removed_row_and_text_outside_the_blocks(tables, copies, capsys):
    readme, _ = copies
    original = readme.read_text()
    row = next(line for line in original.splitlines() if line.startswith("| SGD (momentum 0.9)"))
    prose = "## Two commands"
    readme.write_text(original.replace(row + "\n", "").replace(prose, "## Two commands!"))
    assert tables.main(["--check", str(readme)]) == 1
    assert "+" + row in capsys.readouterr().out
    tables.main([str(readme)])
    # The row is back; the prose outside the markers is left as it was.
    assert readme.read_text() == original.replace(prose, "## Two commands!")


def test_markers_and_runs_are_checked(tables, copies):
    readme, _ = copies
    text = readme.read_text()
    readme.write_text(text.replace("<!-- tables:demo:end -->", "", 1))
    with pytest.raises(SystemExit, match="no matching end"):
        tables.main(["--check", str(readme)])
    readme.write_text(text.replace("tables:demo:begin date=2026", "tables:demo:begin date=1999"))
    with pytest.raises(SystemExit, match="no rows of run '1999"):
        tables.main(["--check", str(readme)])
    readme.write_text(text.replace("tables:demo:", "tables:nope:"))
    with pytest.raises(SystemExit, match="unknown table 'nope'"):
        tables.main(["--check", str(readme)])


def test_rounding(tables):
    pm = tables.pm
    # The deviation with two significant digits, at most the mean's decimals.
    assert pm([0.0025, 0.0026, 0.0028], 5) == "0.00263 ± 0.00015"
    assert pm([19.2, 19.9, 20.0], 2) == "19.70 ± 0.44"
    assert pm([9.0, 10.0, 11.4], 2) == "10.13 ± 1.2"
    assert pm([12530.0, 14000.0, 15990.0], 0, group=True) == "14 173 ± 1 700"
    # One significant digit where the mean's decimals would show 0.
    assert pm([0.00436, 0.00440], 4) == "0.0044 ± 0.00003"
    assert pm([0.0076, 0.0077, 0.0075], sig=3) == "0.00760 ± 0.00010"
    assert pm([5.0], 2) == "5.00" and pm([], 2) == "–"
    assert tables.pm_sci([1.07e-6, 1.37e-6, 0.78e-6]) == "1.1e-6 ± 0.3e-6"
    assert tables.short(1e-7) == "1e-7" and tables.eps(1e-4) == "1e-4" and tables.eps(10) == "10"
