"""``python -m ftrans``: what is installed, and how much of aten vmap handles natively.

Bug reports need the versions and the device; users deciding whether ftrans fits their model
need to know which ops run as batched kernels and which fall back to a per-example loop.  The
coverage counts how :func:`ftrans.op_status` classifies a fixed, version-independent set of aten
ops: every op with a registered batching rule, every op torch tags ``pointwise``, and a list of
ops that common models and torch's OpInfo samples reach (conv, pooling, norms, losses,
reductions, indexing, linear algebra, and their backward ops).

    python -m ftrans                 # summary
    python -m ftrans --list fallback # also list the ops in one category (rule, decomposition,
                                     # fallback, error, missing)
    python -m ftrans --where mm      # where the rule for an op lives (file:line), and which
                                     # handler runs it; any aten op name or overload
                                     # (mm, aten.mm.default, rand, sum.dim_IntList)
"""
from __future__ import annotations

import argparse
import collections
import inspect
import os
import platform
import sys

import torch

import ftrans
from ftrans._C import dispatch as _dispatch, random as _random, tfrules as _tfrules
from ftrans._C.custom_vmap import registered_vmap_rule
from ftrans._C.fallback import loop_fallback
from ftrans._C.registry import RANDOM_RULES, RULES
from ftrans._C.rules.pointwise import pointwise_rule

# Aten ops (packet names) that common models and torch's OpInfo samples reach, forward and
# backward.  Names missing from the installed torch are reported as "missing", not errors.
COMMON_OPS = (
    # linear algebra
    "mm", "bmm", "addmm", "addmv", "addbmm", "baddbmm", "mv", "dot", "vdot", "matmul", "linear",
    "einsum", "outer", "cross", "linalg_vector_norm", "linalg_solve", "linalg_inv_ex",
    "linalg_cholesky_ex", "linalg_qr", "linalg_eigh", "linalg_svd", "linalg_det", "_linalg_det",
    "linalg_slogdet", "_linalg_slogdet", "triangular_solve", "linalg_solve_triangular",
    "cholesky_solve", "trace", "diag", "diagonal", "diag_embed", "tril", "triu",
    # convolution and pooling
    "convolution", "convolution_backward", "conv1d", "conv2d", "conv3d", "conv_transpose2d",
    "max_pool2d_with_indices", "max_pool2d_with_indices_backward", "avg_pool2d",
    "avg_pool2d_backward", "adaptive_avg_pool2d", "_adaptive_avg_pool2d",
    "_adaptive_avg_pool2d_backward", "max_pool1d", "max_pool3d_with_indices", "upsample_nearest2d",
    "upsample_bilinear2d", "im2col", "col2im", "pixel_shuffle",
    # normalization, softmax, dropout
    "native_layer_norm", "native_layer_norm_backward", "native_batch_norm",
    "native_batch_norm_backward", "_native_batch_norm_legit", "native_group_norm",
    "native_group_norm_backward", "_softmax", "_softmax_backward_data", "_log_softmax",
    "_log_softmax_backward_data", "logsumexp", "native_dropout", "native_dropout_backward",
    "rms_norm", "_fused_rms_norm",
    # losses
    "nll_loss_forward", "nll_loss_backward", "nll_loss2d_forward", "mse_loss",
    "mse_loss_backward", "binary_cross_entropy", "binary_cross_entropy_backward",
    "binary_cross_entropy_with_logits", "smooth_l1_loss", "huber_loss", "l1_loss", "kl_div",
    # reductions and scans
    "sum", "mean", "prod", "amax", "amin", "max", "min", "var", "std", "var_mean", "std_mean",
    "norm", "argmax", "argmin", "all", "any", "cumsum", "cumprod", "logcumsumexp", "cummax",
    "sort", "topk", "kthvalue", "median", "mode",
    # views and shapes
    "view", "_unsafe_view", "reshape", "expand", "permute", "transpose", "t", "squeeze",
    "unsqueeze", "select", "slice", "narrow", "unfold", "as_strided", "flip", "roll", "repeat",
    "cat", "stack", "split", "split_with_sizes", "chunk", "unbind", "movedim", "clone",
    "contiguous", "_to_copy", "alias", "view_as_real", "view_as_complex", "constant_pad_nd",
    "reflection_pad2d", "replication_pad2d",
    # indexing
    "index", "index_put", "index_select", "index_add", "index_copy", "index_fill", "gather",
    "scatter", "scatter_add", "scatter_reduce", "masked_fill", "masked_scatter", "take",
    "take_along_dim", "embedding", "embedding_dense_backward", "one_hot", "where",
    "select_backward", "slice_backward", "index_select_backward",
    # factories and misc
    "zeros_like", "ones_like", "empty_like", "full_like", "new_zeros", "new_ones", "new_empty",
    "new_full", "fill", "zero", "copy", "lerp", "clamp", "searchsorted", "bucketize",
    "histc", "_fft_r2c", "_fft_c2r", "_fft_c2c", "polar", "complex",
    "scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu",
    # data-dependent: these raise inside vmap (docs/limitations.md says what to write instead)
    "nonzero", "masked_select", "_unique2", "unique_consecutive", "_local_scalar_dense", "equal",
    "is_nonzero", "allclose",
)

CATEGORIES = ("rule", "decomposition", "fallback", "error")


def _is_out_variant(op) -> bool:
    """``out=`` overloads (``aten.sum.IntList_out``): rare inside vmap, so left out of the counts."""
    return any(a.kwarg_only and a.alias_info is not None and a.alias_info.is_write
               for a in op._schema.arguments)


def _takes_tensors(op) -> bool:
    """False for TorchScript's list/str/scalar overloads (``aten.sum.int``): no tensor to map."""
    return any("Tensor" in str(a.type) for a in op._schema.arguments)


def _overloads(packet_name):
    packet = getattr(torch.ops.aten, packet_name, None)
    if not isinstance(packet, torch._ops.OpOverloadPacket):
        return None
    return [getattr(packet, o) for o in packet.overloads()]


def _pointwise_overloads():
    out = []
    for name in dir(torch.ops.aten):
        try:
            packet = getattr(torch.ops.aten, name)
        except Exception:  # a few attributes of the namespace are not ops
            continue
        if not isinstance(packet, torch._ops.OpOverloadPacket):
            continue
        for o in packet.overloads():
            overload = getattr(packet, o)
            if torch.Tag.pointwise in overload.tags:
                out.append(overload)
    return out


def coverage() -> dict:
    """``{category: sorted overload names}`` over the op set the module docstring describes."""
    ops = {op for op in RULES if getattr(op, "namespace", None) == "aten"}
    ops.update(_pointwise_overloads())
    missing = []
    for name in COMMON_OPS:
        overloads = _overloads(name)
        if overloads is None:
            missing.append(name)
        else:
            ops.update(overloads)
    result = collections.defaultdict(list)
    for op in sorted(ops, key=str):
        if _is_out_variant(op) or not _takes_tensors(op):
            continue
        try:
            kind = ftrans.op_status(op)
        except RuntimeError:  # TorchScript-only overloads: not in the dispatcher, never reached
            continue
        result[kind].append(str(op))
    for k in result:
        result[k].sort()
    result["missing"] = sorted(missing)
    return dict(result)


def device_line() -> str:
    if torch.cuda.is_available():
        return f"cuda ({torch.cuda.get_device_name(0)}, {torch.cuda.device_count()} device(s))"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def report(list_category: str | None = None) -> str:
    cov = coverage()
    total = sum(len(v) for k, v in cov.items() if k != "missing")
    lines = [
        f"ftrans {ftrans.__version__}",
        f"torch {torch.__version__}, Python {platform.python_version()} ({sys.platform})",
        f"device: {device_line()}",
        f"vmap coverage of {total} aten overloads (registered rules + pointwise-tagged ops + "
        f"{len(COMMON_OPS)} common ops; out= and non-tensor overloads not counted):",
    ]
    explain = {
        "rule": "batching rule (native batched kernels)",
        "decomposition": "decomposed into ops with rules",
        "fallback": "per-example loop (correct, slow; FallbackWarning)",
        "error": "raise (data-dependent output or unsupported in-place view)",
    }
    for k in CATEGORIES:
        n = len(cov.get(k, []))
        pct = 100.0 * n / total if total else 0.0
        lines.append(f"  {k:<14}{n:5d}  {pct:5.1f}%  {explain[k]}")
    if cov["missing"]:
        lines.append(f"  (not in this torch: {', '.join(cov['missing'])})")
    if list_category:
        lines.append(f"{list_category}:")
        lines.extend(f"  {name}" for name in cov.get(list_category, []))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# --where OP
# ----------------------------------------------------------------------------------------------

def resolve(name: str) -> list:
    """The OpOverloads a user's op name means: ``mm`` / ``aten.mm`` / ``torch.ops.aten.mm`` (every
    overload), ``mm.default`` / ``aten.mm.default`` / ``aten::mm.default`` (one); another
    namespace as ``ns::name`` or ``ns.name.overload``.  Empty if there is no such op."""
    s = name.strip()
    if s.startswith("torch.ops."):
        s = s[len("torch.ops."):]
    parts = s.replace("::", ".").split(".")
    ns = "aten"
    if parts[0] == "aten":
        parts = parts[1:]
    elif "::" in s or (len(parts) == 3 and parts[0] != "aten"):
        ns, parts = parts[0], parts[1:]
    if not parts or len(parts) > 2 or not all(parts):
        return []
    try:
        packet = getattr(getattr(torch.ops, ns), parts[0])
    except (AttributeError, RuntimeError):
        return []
    if not isinstance(packet, torch._ops.OpOverloadPacket):
        return []
    names = [parts[1]] if len(parts) == 2 else list(packet.overloads())
    return [getattr(packet, o) for o in names if o in packet.overloads()]


def _location(fn) -> str:
    """``qualified name (path:line)``, the path relative to the checkout when it is in one."""
    fn = inspect.unwrap(fn)
    try:
        path = inspect.getsourcefile(fn)
        line = inspect.getsourcelines(fn)[1]
    except (TypeError, OSError):
        return getattr(fn, "__qualname__", repr(fn))
    root = os.path.dirname(os.path.dirname(os.path.abspath(ftrans.__file__)))
    if path and os.path.abspath(path).startswith(root + os.sep):
        path = os.path.relpath(path, root)
    return f"{fn.__module__}.{fn.__qualname__} ({path}:{line})"


def where(func) -> list:
    """Lines saying where the rule for OpOverload ``func`` lives and which handler runs it."""
    op = _dispatch.prepared(func)
    lines = [f"{func}: {op.status}"]
    above = _tfrules.FOR_OP.get(func)
    if above is not None:
        lines.append(f"  above     {_location(above)}: the torch function on batched values "
                     "as one physical call when autograd records nothing; otherwise:")
    if op.is_random:
        lines.append(f"  handler   {_location(_random.random_dispatch)}: the randomness policy "
                     "(vmap's randomness= per level)")
        if _is_out_variant(func):
            lines.append("  refused   out= forms of random ops (torch.func refuses them too)")
            return lines
        for mode in ("same", "different"):
            rule = RANDOM_RULES.get((func, mode))
            generic = (_random.same_by_forked_generator if mode == "same"
                       else _random.aligned_call)
            what = (_location(rule) if rule is not None
                    else f"no randomness rule; generic: {_location(generic)}")
            lines.append(f"  {mode:<9} {what}")
        return lines
    rule = getattr(op.handler, "rule", None)
    if op.status == "rule" and rule is not None:
        if func in RULES:
            how = "registered for this op (registry.RULES)"
        elif rule is registered_vmap_rule:
            how = "the custom op's own torch.library vmap rule"
        elif rule is pointwise_rule:
            how = "chosen by the op's tag: pointwise"
        else:
            how = "chosen by dispatch"
        lines.append(f"  rule      {_location(rule)}, {how}")
        lines.append(f"  handler   {_location(_dispatch._rule_handler)}: unwraps the level, "
                     "calls the rule, wraps its outputs")
    elif op.status == "fallback":
        lines.append(f"  rule      none: per-example loop (FallbackWarning), "
                     f"{_location(loop_fallback)}")
        lines.append("  handler   register a rule with ftrans.register_batch_rule "
                     "(docs/adding_rules.md)")
    elif op.status == "decomposition":
        decomp = getattr(op.handler, "decomposition", None)
        if decomp is not None:
            lines.append(f"  rule      none: torch's decomposition {_location(decomp)}, whose "
                         "ops are batched in turn")
        else:
            lines.append("  rule      none: the op's own CompositeImplicitAutograd "
                         "decomposition, whose ops are batched in turn")
        lines.append(f"  handler   {_location(op.handler)}")
    else:
        lines.append(f"  handler   {_location(op.handler)}")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ftrans", description=__doc__.splitlines()[0])
    parser.add_argument("--list", choices=CATEGORIES + ("missing",), default=None,
                        help="also list the op overloads in this category")
    parser.add_argument("--where", metavar="OP", default=None,
                        help="where the rule for an aten op (mm, aten.mm.default, rand) lives "
                             "and which handler runs it")
    args = parser.parse_args(argv)
    if args.where is not None:
        ops = resolve(args.where)
        if not ops:
            print(f"python -m ftrans --where: no op named {args.where!r} (try an aten name "
                  "such as mm, aten.mm.default or sum.dim_IntList)", file=sys.stderr)
            return 2
        for op in ops:
            try:
                print("\n".join(where(op)))
            except RuntimeError as e:  # TorchScript-only overloads are not in the dispatcher
                print(f"{op}: not reachable from Python ({e.__class__.__name__})")
        return 0
    print(report(args.list))
    return 0


if __name__ == "__main__":
    sys.exit(main())
