"""Plumbing the numbered tutorials share, kept out of them so that each reads as its lesson.

Every tutorial is both a script (``python tutorials/NN_name.py [--fast] [--plot-dir DIR]``) and a
module the tests import to call ``main(fast=True)``; both put this folder on ``sys.path`` (the
script's own folder, or the tests' loader), which is how ``from _common import ...`` resolves.
Plots are optional: matplotlib is not a dependency of ftrans, so a tutorial without it still
runs and checks its numbers, and only skips the figure.
"""
from __future__ import annotations

import argparse
import os
import time
import warnings

if os.environ.get("FTRANS_STRICT_WARNINGS"):
    # Set by the test suite: a loop fallback or an eager compile in a tutorial is a failure,
    # in processes the tutorial spawns too (pytest's warning filters do not reach them).
    import ftrans

    warnings.simplefilter("error", ftrans.FallbackWarning)
    warnings.simplefilter("error", ftrans.CompileWarning)


def mean_time(fn, *, reps: int) -> float:
    """Seconds per call of ``fn()``, averaged over ``reps`` calls after one untimed call: the
    first call at a new shape pays one-off costs (tracing, caches) that are not the steady state."""
    fn()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps


def pyplot_or_none():
    """``matplotlib.pyplot`` with a file-only backend, or None (saying so) if it is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")              # figures go to files: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no plots)")
        return None
    return plt


def save_figure(fig, plot_dir: str, name: str) -> str:
    """Lay out ``fig``, write it to ``plot_dir/name`` (creating the folder) and say where."""
    os.makedirs(plot_dir, exist_ok=True)
    path = os.path.join(plot_dir, name)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"saved {path}")
    return path


def cli(main, doc: str, *, plots: bool = True,
        fast_help: str = "the small size the tests run") -> None:
    """Run ``main`` from the command line: ``--fast`` for the tested size and, for tutorials
    that draw, ``--plot-dir`` for where the figures go."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help=fast_help)
    if plots:
        parser.add_argument("--plot-dir", default="tutorials/figures")
    args = parser.parse_args()
    if plots:
        main(fast=args.fast, plot_dir=args.plot_dir)
    else:
        main(fast=args.fast)
