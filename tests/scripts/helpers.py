"""Helpers of the scripts' smoke tests: reading the Markdown tables scripts print, and
running a script in its own process."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def markdown_tables(text: str) -> list[list[dict[str, str]]]:
    """Every Markdown table in ``text``, as rows ``{header: cell}`` (cells stripped,
    the ``|---|`` rule skipped)."""
    tables, lines = [], text.splitlines()
    for i, line in enumerate(lines):
        if (
            i + 1 < len(lines)
            and _is_row(line)
            and re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", lines[i + 1].strip())
        ):
            header = _cells(line)
            rows = []
            for row in lines[i + 2 :]:
                if not _is_row(row):
                    break
                rows.append(dict(zip(header, _cells(row), strict=True)))
            tables.append(rows)
    return tables


def _is_row(line: str) -> bool:
    line = line.strip()
    return line.startswith("|") and line.endswith("|")


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip()[1:-1].split("|")]


def number(cell: str) -> float:
    """The first number in a table cell (``"0.42 s"``, ``"**12×**"``, ``"1,024"``, ``"38%"``)."""
    found = re.search(r"[-+]?(\d[\d,]*\.?\d*(e[-+]?\d+)?|nan|inf)", cell)
    assert found, f"no number in {cell!r}"
    return float(found.group(0).replace(",", ""))


def finite(cell: str) -> bool:
    """Whether the first number in ``cell`` is finite."""
    return math.isfinite(number(cell))


def run_script(*args: str, timeout: float) -> str:
    """Run ``python scripts/<args>`` from the repository root in its own process; its
    standard output (a failing exit status raises, with the output in the message)."""
    done = subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, (
        f"{args[0]} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    )
    return done.stdout
