#!/usr/bin/env python
"""Average the seven MATH subjects' exact_match_flex, as the authors' get_math_score.py did.

    python scripts/get_math_score.py RESULTS_DIR

Reads RESULTS_DIR/math/*/metrics.json (written by `mft eval` or by olmes) and writes
RESULTS_DIR/math/task_scores_flex.jsonl: one {"task", "score"} line per subject, then {"task": "average"}.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mft.errors import MftError
from mft.eval.outputs import read_jsonl, write_math_scores


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input_path", help="results folder holding math/<subject>/metrics.json")
    args = parser.parse_args(argv)
    try:
        path = write_math_scores(Path(args.input_path))
    except MftError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    rows = read_jsonl(path)
    for row in rows:
        print(f"{row['task']}: {row['score']:.6f}")
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
