"""Print the support table of GossipLocalStrategy's option combinations, or rewrite it in a Markdown document.

    python scripts/combinations_table.py                          # print it
    python scripts/combinations_table.py --write docs/strategy.md # replace the table between the markers

The table comes from ``lightning_dopt.combinations`` (the rules the strategy checks); a unit test fails when the
copy in ``docs/strategy.md`` differs from what this prints.
"""

from __future__ import annotations

import argparse
import os
import tempfile

from lightning_dopt.combinations import markdown_table, with_table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Print or rewrite the option-combination support table.")
    parser.add_argument("--write", metavar="PATH", help="rewrite the table between the markers of this document")
    args = parser.parse_args(argv)
    if args.write is None:
        print(markdown_table())
        return
    with open(args.write, encoding="utf-8") as handle:
        updated = with_table(handle.read())
    descriptor, temporary = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(args.write)), suffix=".tmp")
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        handle.write(updated)
    os.replace(temporary, args.write)  # never a half-written document


if __name__ == "__main__":
    main()
