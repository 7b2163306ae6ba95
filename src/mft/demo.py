"""`mft demo`: the whole pipeline offline on a CPU (placeholder until the demo lands)."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("demo", help="run the whole pipeline on a tiny model, offline, on a CPU")
    p.set_defaults(func=run)


def run(args) -> int:
    print("mft demo: not yet — the demo lands with its own issue.")
    return 0
