"""Plumbing shared by the OpInfo/ModuleInfo sweeps and their pytest front ends.

The three sweeps (opinfo_harness.py, opinfo_vjp_harness.py, moduleinfo_harness.py) differ in
what they check, but not in how they survive a run: a per-op time limit so one hanging kernel
cannot stall a sweep, one-line error messages that group well in a report, a worst-status merge,
and the same sample-taking preamble.  Their tests differ in which harness they drive, but not in
how a listed gap is xfailed: only :class:`KnownGap` is accepted, so a wrong answer or a status
worse than the listed one still fails.  Keeping one copy means a fix to that contract (say, a
stricter xfail) reaches every sweep at once.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import time
import traceback
import zlib

import pytest
import torch

# ----------------------------------------------------------------------------------------------
# Harness side
# ----------------------------------------------------------------------------------------------


def message_line(e: BaseException) -> str:
    """The first line of an exception's message, at most 300 characters."""
    msg = str(e).strip().splitlines()
    return msg[0][:300] if msg else ""


def mismatch(got, expected):
    """None if ``torch.testing.assert_close`` accepts ``got``, else (message lines, the
    "Greatest"/"Mismatched" lines joined) for a one-line report."""
    try:
        torch.testing.assert_close(got, expected, equal_nan=True)
    except AssertionError as err:
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
        return lines, "; ".join(ln for ln in lines if "Greatest" in ln or "Mismatched" in ln)
    return None


def first_line(e: BaseException) -> str:
    """``Type: first line``: what a report groups errors by."""
    return f"{type(e).__name__}: {message_line(e)}"


@contextlib.contextmanager
def time_limit(seconds, exc_type=TimeoutError, message="timed out after {}s"):
    """Raise ``exc_type(message.format(seconds))`` in the body after ``seconds`` (SIGALRM)."""
    if not seconds or not hasattr(signal, "SIGALRM"):
        yield
        return

    def handler(signum, frame):
        raise exc_type(message.format(seconds))

    old = signal.signal(signal.SIGALRM, handler)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def note(result, text):
    if text not in result.notes:
        result.notes.append(text)


def merge(result, rank, status, reason, fell=()):
    """Keep the worse of ``result.status`` and ``status`` (by ``rank``); collect fallbacks."""
    if rank[status] > rank[result.status]:
        result.status, result.reason = status, reason
    for f in fell:
        if f not in result.fallback_ops:
            result.fallback_ops.append(f)


def merge_tf(result, rank, status, reason):
    if rank[status] > rank[result.tf_status]:
        result.tf_status, result.tf_reason = status, reason


class Timeout(Exception):
    """One op ran past the sweep's per-op limit."""


def take_samples(op, dtype, n_samples, requires_grad):
    """The first ``n_samples`` of an OpInfo's samples, seeded like torch's own tests."""
    torch.manual_seed(0)
    samples = []
    for s in op.sample_inputs("cpu", dtype, requires_grad=requires_grad):
        samples.append(s)
        if len(samples) >= n_samples:
            break
    return samples


def harness_error(e: BaseException) -> str:
    """The reason recorded when the harness itself raised: a bug there must not stop a sweep."""
    return "harness: " + first_line(e) + " " + traceback.format_exc().splitlines()[-2].strip()


def choose_dtype(result, op, dtype, supported, pick, none_reason):
    """``dtype`` if ``supported(op)`` has it, else ``pick(op)``; None (reason set) if neither."""
    if dtype is not None and dtype not in supported(op):
        result.reason = f"{dtype} not supported"
        return None
    dtype = dtype or pick(op)
    if dtype is None:
        result.reason = none_reason
    return dtype


def run_samples(result, rank, op, dtype, n_samples, requires_grad, timeout, body) -> bool:
    """Run ``body(samples, gen)`` on an OpInfo's samples in ``dtype``, failures as statuses.

    ``gen`` seeds the per-example values from the op's name, so a sweep is reproducible op by
    op.  False when the samples themselves could not be generated (``result.reason`` says why).
    """
    result.dtype = str(dtype).replace("torch.", "")
    gen = torch.Generator().manual_seed(zlib.crc32(result.name.encode()))
    try:
        with time_limit(timeout, Timeout, "op took more than {}s"):
            try:
                samples = take_samples(op, dtype, n_samples, requires_grad)
            except Exception as e:  # noqa: BLE001
                result.reason = "sample generation failed: " + first_line(e)
                return False
            body(samples, gen)
    except Timeout as e:
        merge(result, rank, "error", f"Timeout: {e}")
    except Exception as e:  # noqa: BLE001 - a harness bug must not stop a sweep
        merge(result, rank, "error", harness_error(e))
    return True


def finish(result, ran: int, start: float):
    """Give a result on which nothing ran a reason, and stamp its duration."""
    if ran == 0 and result.status == "skip" and not result.reason:
        result.reason = result.notes[0] if result.notes else "no samples"
    result.seconds = time.perf_counter() - start
    return result


# ----------------------------------------------------------------------------------------------
# pytest side
# ----------------------------------------------------------------------------------------------


class KnownGap(Exception):
    """An error/fallback listed in a sweep's expected file (the only failure its xfail accepts)."""


def load_expected(path, missing_ok=False) -> dict:
    """The ``ops`` table of an expected file written by a report's ``--write-expected``."""
    if missing_ok and not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)["ops"]


def full_names(load_db, enabled: bool):
    return list(load_db()) if enabled else ["<set FTRANS_FULL=1>"]


class OpSweep:
    """One harness's pytest plumbing: xfail marks from the expected file, cached results, verdicts.

    ``ok`` are the statuses that pass outright; ``wrong_text`` says what disagreed with the loop.
    """

    def __init__(self, harness, expected: dict, ok=("pass",), wrong_text="wrong"):
        self.h = harness
        self.expected = expected
        self.ok = ok
        self.wrong_text = wrong_text
        self.results: dict = {}

    def params(self, names):
        out = []
        for name in names:
            known = self.expected.get(name)
            if known is None:
                out.append(name)
                continue
            reason = (f"{known['status']}: {known['reason'][:200]} "
                      f"(torch.func: {known['torch_func']})")
            out.append(pytest.param(name, marks=pytest.mark.xfail(strict=False, raises=KnownGap,
                                                                  reason=reason)))
        return out

    def result(self, name, samples=3):
        if name not in self.results:
            db = self.h.load_op_db()
            if name not in db:
                pytest.skip(f"no OpInfo {name!r} in this torch")
            self.results[name] = self.h.run_op(db[name], samples, timeout=300)
        return self.results[name]

    def wrong_results(self, names, samples=3) -> dict:
        """``{name: reason}`` for the ops among ``names`` whose answer disagreed with the loop."""
        db = self.h.load_op_db()
        return {n: self.result(n, samples).reason for n in names if n in db
                and self.result(n, samples).status == "wrong"}

    def check(self, name, samples=3):
        """Fail on 'wrong' or on a status worse than listed; raise KnownGap on a listed gap."""
        r = self.result(name, samples)
        if r.status == "wrong":
            raise AssertionError(f"{name}: {self.wrong_text}: {r.reason}")
        if r.status == "skip":
            pytest.skip(r.reason[:200])
        if r.status in self.ok:
            return
        known = self.expected.get(name)
        detail = (f"{name} [{r.status}]: {r.reason} "
                  f"(torch.func: {r.tf_status} {r.tf_reason[:150]})")
        if known is not None and self.h.RANK[r.status] <= self.h.RANK[known["status"]]:
            raise KnownGap(detail)
        raise AssertionError(detail)
