"""Every tutorial runs, in its fast mode, and the numbers it reports are right.

The tutorials are user-facing documentation that executes: if an API changes or a rule regresses,
the tutorial that shows it must fail here, not in a user's terminal.  Each tutorial's
``main(fast=True)`` asserts its own claims and returns the numbers; the tests re-check the ones
that carry the claim (agreement with a loop or autograd, training progress), so a tutorial that
silently stopped asserting would still be caught.
"""
from __future__ import annotations

import importlib
import os
import sys
import warnings

import pytest
import torch

TUTORIALS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tutorials")


def load(name: str):
    # Imported by module name from the tutorials folder (not by path), so that
    # torch.multiprocessing's spawned children can import the same module.
    if TUTORIALS not in sys.path:
        sys.path.insert(0, TUTORIALS)
    return importlib.import_module(name)


@pytest.fixture(autouse=True)
def _strict_warnings(monkeypatch):
    # An unexpected FallbackWarning / CompileWarning fails a tutorial, in the processes it
    # spawns too (tutorials/_common.py reads this; pytest's filters cover this process).
    monkeypatch.setenv("FTRANS_STRICT_WARNINGS", "1")


@pytest.fixture(autouse=True)
def _one_thread():
    # The fast sizes are calibrated for one core (< 20 s each).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_per_sample_grads_dpsgd():
    out = load("01_per_sample_grads_dpsgd").main(fast=True)
    assert out["max_err"] < 1e-5
    assert out["acc_before"] < 0.75 < 0.8 < out["acc_after"]
    assert out["n_steps"] == 24 and out["t_vmap"] > 0 and out["t_loop"] > 0
    assert out["err_clipped"] < 1e-4 and out["t_clipped"] > 0 and 1 <= out["traces"] <= 3
    assert out["epsilon"] is None or 0 < out["epsilon"] < 20


def test_ensembles():
    out = load("02_ensembles").main(fast=True)
    assert out["err_same"] < 1e-5 and out["err_diff"] < 1e-5
    assert out["refused"]
    assert out["spread_same"] == 0.0 and out["spread_diff"] > 0.1
    assert out["loss_last"] < 0.5 * out["loss_first"]
    assert out["ensemble_acc"] > 0.8 and out["member_acc_min"] > 0.7


def test_jacobians_hessians_ntk():
    out = load("03_jacobians_hessians_ntk").main(fast=True)
    for key in ("err_jac", "err_chunk", "err_hess", "err_vhess", "err_ntk"):
        assert out[key] < 1e-4, key
    assert out["err_ntk_chunk"] < 1e-5
    assert out["ntk_min_eig"] > -1e-3


def test_control_flow():
    out = load("07_control_flow").main(fast=True)
    assert out["err_value"] < 1e-8 and out["err_grad"] < 1e-6 and out["err_mean"] < 1e-6
    assert out["err_split"] == 0
    assert out["body_lanes"] == out["sum_trips"]  # finished examples retired
    assert out["after"] < out["before"]


def test_maml():
    out = load("04_maml").main(fast=True)
    assert out["meta_grad_err"] < 1e-4
    assert out["after_trained"] < 0.8 * out["after_untrained"]
    assert out["after_trained"] < out["before_trained"]


def test_distributed_dpsgd():
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available in this build")
    out = load("05_distributed_dpsgd").main(fast=True)
    assert out["count"] == 64
    assert out["err_sum"] < 1e-4 and out["err_params"] < 1e-5 and out["err_loop"] < 1e-4
    assert out["err_vmap"] < 1e-4 and out["steps"] == 3
    try:
        import opacus  # noqa: F401  (the accountant)
    except ImportError:
        assert out["epsilon"] is None
    else:
        assert 0 < out["epsilon"] < 100


def test_how_ftrans_works():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = load("06_how_ftrans_works").main(fast=True)
    assert out["status_after"] == "rule"
    # The tutorial's module registers the rule on first run; a first run must have shown the
    # fallback (a second run in the same process starts with the rule already there).
    assert out["status_before"] in ("fallback", "rule")
    if out["status_before"] == "fallback":
        assert out["fallback_warned"]
    assert out["custom_op_err"] < 1e-5
    assert out["inside"]["physical_shape"] == (4, 3)


def test_readme_demo():
    # The README's first command runs tutorials/demo.py: per-sample gradients, eager and
    # compiled, checked against a loop of torch.autograd.grad.
    err, speedup = load("demo").main(batch=16, reps=1)
    assert err < 1e-5 and speedup > 0


def test_every_tutorial_is_tested():
    names = sorted(f[:-3] for f in os.listdir(TUTORIALS)
                   if f[0].isdigit() and f.endswith(".py"))
    tested = {"01_per_sample_grads_dpsgd", "02_ensembles", "03_jacobians_hessians_ntk", "04_maml",
              "05_distributed_dpsgd", "06_how_ftrans_works", "07_control_flow"}
    assert set(names) == tested, f"untested tutorials: {set(names) - tested}"
