#!/usr/bin/env python
"""Regenerate the README's demo figure and numbers from a demo run: `python scripts/demo_figures.py RUN_DIR`.

Reads RUN_DIR/results.json (written by `ftjax demo --out RUN_DIR`), writes docs/demo_grid.png (the transfer grid,
mean and range over seeds) and docs/demo_results.json (the numbers the README quotes), and prints the README's
markdown table. `--docs DIR` writes elsewhere.
"""

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from ftjax.demo import figures, report  # noqa: E402
from ftjax.errors import FtjaxError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, metavar="RUN_DIR", help="an `ftjax demo --out` directory")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs", help="where to write the figure and numbers")
    args = parser.parse_args(argv)
    path = args.run / "results.json"
    if not path.is_file():
        raise FtjaxError(f"{path} not found; pass the --out directory of a finished `ftjax demo` run")
    summary = json.loads(path.read_text())
    if summary.get("format") != "ftjax-demo":
        raise FtjaxError(f"{path} is not an ftjax demo results file (no \"format\": \"ftjax-demo\")")
    numbers = report.readme_numbers(summary)
    args.docs.mkdir(parents=True, exist_ok=True)
    figures.grid(summary["results"]).savefig(args.docs / "demo_grid.png", dpi=130, bbox_inches="tight")
    (args.docs / "demo_results.json").write_text(json.dumps(numbers, indent=1, ensure_ascii=False) + "\n")
    print(report.readme_table(numbers))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except FtjaxError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
