"""torch.nn modules (torch's ModuleInfo database) under vmap, per-sample grad and ensembling.

One test per module so a failure names it; the machinery is in moduleinfo_harness.py.  Each
test runs three checks against a per-example loop (forward under vmap; per-sample gradients
through functional_call; stack_module_state ensembles) and fails on a wrong answer, an error,
or an op that fell back to the loop.  Default run: the first sample of every module (training
mode).  ``FTRANS_FULL=1`` also runs every sample, and eval mode where it differs (slow).

Known gaps live in KNOWN below, with the reason and the listed status per check, and are
xfailed non-strictly: they stay visible as xfail/xpass.  The xfail only accepts
:class:`KnownGap`, raised when a check is no worse than its listed status; anything worse, or
unlisted, is an AssertionError and fails.  'expected-error' (a clear ftrans error where
torch.func errors too, e.g. ``.item()`` on a per-example value) passes: that is the right answer.
"""
from __future__ import annotations

import pytest

import moduleinfo_harness as h

# module -> {check: (worst status allowed, reason)}.  From benchmarks/moduleinfo_report.py's
# full sweep.  Empty: every module passes every check (LinearCrossEntropyLoss's custom ops run
# their own torch.library vmap rules, see ftrans/_C/custom_vmap.py).
KNOWN: dict = {}

_RESULTS: dict = {}


class KnownGap(Exception):
    """A check no worse than its KNOWN status (the only failure the xfail accepts)."""


def _names():
    return list(h.load_module_db())


def _params(names):
    out = []
    for name in names:
        known = KNOWN.get(name)
        if not known:
            out.append(name)
            continue
        reason = "; ".join(f"{c}: {s}: {r}" for c, (s, r) in known.items())
        out.append(pytest.param(name, marks=pytest.mark.xfail(strict=False, raises=KnownGap,
                                                              reason=reason)))
    return out


def _check(name, max_samples):
    key = (name, max_samples)
    if key not in _RESULTS:
        # torch.func runs only where ftrans errors: it decides 'expected-error'.
        _RESULTS[key] = h.run_module(h.load_module_db()[name], max_samples=max_samples,
                                     oracle="on-error")
    r = _RESULTS[key]
    known = KNOWN.get(name, {})
    gaps, failures = [], []
    for c in h.CHECKS:
        res = r.ftrans[c]
        if res.status in ("pass", "expected-error", "skip"):
            continue
        line = f"{c}: {res.status} [{res.sample}]: {res.reason}"
        allowed = known.get(c)
        if allowed and h.RANK[res.status] <= h.RANK[allowed[0]]:
            gaps.append(line)
        else:
            failures.append(line)
    if failures:
        raise AssertionError(f"{name}: " + "\n".join(failures + gaps))
    if gaps:
        raise KnownGap(f"{name}: " + "\n".join(gaps))
    if all(r.ftrans[c].status == "skip" for c in h.CHECKS):
        pytest.skip(f"{name}: no usable sample: {r.ftrans['forward'].reason}")


@pytest.mark.parametrize("name", _params(_names()))
def test_module_first_sample(name):
    _check(name, 1)


@pytest.mark.slow
@pytest.mark.parametrize("name", _params(_names()))
def test_module_all_samples(name):
    _check(name, None)


def test_rnn_family_runs_where_torch_func_fails():
    """The swapped out-of-place RNN kernels (ftrans/_C/rnn.py): torch.func errors on these."""
    db = h.load_module_db()
    for name in ("nn.LSTM", "nn.GRUCell"):
        r = h.run_module(db[name], max_samples=1, oracle="on-error")
        assert all(r.ftrans[c].status == "pass" for c in h.CHECKS), (name, r.ftrans)


def test_stateful_plain_vmap_raises_clearly():
    """BatchNorm in training with its own, unbatched running stats cannot take B updates."""
    db = h.load_module_db()
    info = db["nn.BatchNorm2d"]
    s = h.samples(info, True)[0]
    inputs = h.Inputs(s)
    assert h._is_stateful(info, s, True, inputs)
    with pytest.raises(Exception, match="running"):
        h.plain_stateful(h.BACKENDS["ftrans"], info, s, True, inputs)
