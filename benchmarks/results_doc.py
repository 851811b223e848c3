"""Shared by the benchmark scripts: each one owns a ``## `` section of ``docs/benchmarks.md``."""

from __future__ import annotations


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
