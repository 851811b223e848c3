"""Shared by the benchmark scripts: each one owns a ``## `` section of ``docs/benchmarks.md``."""

from __future__ import annotations

import os
from pathlib import Path

BENCHMARKS_INTRO = ("# Benchmarks\n\n"
                    "Results of the scripts in `benchmarks/`. Each benchmark owns one `##` section below, which its "
                    "script rewrites (with the exact command, date and machine) when run with "
                    "`--out docs/benchmarks.md`; other sections are left untouched.\n")
"""The start of ``docs/benchmarks.md`` when a benchmark creates it."""


def replace_section(document: str, title: str, section: str) -> str:
    """``document`` with its ``title`` section (up to the next ``## `` heading) replaced by ``section``, or with
    ``section`` appended when there is none yet. Other benchmarks' sections are kept as they are."""
    lines = document.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip("\n") == title), None)
    if start is None:
        return document.rstrip("\n") + "\n\n" + section
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    tail = "".join(lines[end:])
    return "".join(lines[:start]) + section + ("\n" + tail if tail else "")


def write_section(path: Path, title: str, section: str, intro: str = BENCHMARKS_INTRO) -> None:
    """Re-read ``path`` just before writing (other benchmarks may have changed their sections), replace or append
    the ``title`` section, and rename the result over ``path`` (a crash leaves the old document). A missing
    document starts as ``intro``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    document = path.read_text() if path.exists() else intro
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    staging.write_text(replace_section(document, title, section))
    os.replace(staging, path)
