"""A process pool with a progress bar, for scoring that is CPU-bound (sympy) or needs a main thread."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def _star(args):
    fn, item = args
    return fn(*item)


def pool_map(fn: Callable, items: Sequence[tuple], workers: int | None = None, desc: str = "scoring") -> list:
    """`[fn(*item) for item in items]` over `workers` forked processes, in order, with a tqdm bar.

    Forked workers inherit what the parent imported (call a warm-up first); each runs `fn` on its main
    thread, so `fn` may use SIGALRM time limits. One worker, or few items, runs in this process.
    """
    from mft.progress import progress as tqdm

    workers = workers or default_workers()
    if workers <= 1 or len(items) <= 1:
        return [fn(*item) for item in tqdm(items, desc=desc, unit="doc")]
    chunk = max(1, min(16, len(items) // (workers * 8)))
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        results = pool.map(_star, [(fn, item) for item in items], chunksize=chunk)
        return list(tqdm(results, total=len(items), desc=desc, unit="doc"))
