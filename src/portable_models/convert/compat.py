"""Compatibility passes: small, exact rewrites of a *copy* of the captured program that let a
converter through where it lacks an op, the fixes users apply by hand today. Each pass is
pure (a program in, the same program with some nodes rewritten out), named, tagged with the
converter errors it addresses, and unit-tested to give the same outputs as the original.

A route that fails to convert with an error a pass addresses is tried once more with that
pass (:mod:`portable_models.convert.build`), and again with the union if that try fails with
an error another pass addresses (a model may need two); the artifact's route then reads
``coremltools-export+bool-logical`` and its steps list each pass with the nodes it rewrote.
A pass rewrites only what it can prove the same (static shapes where it needs them, the
dtypes it knows) and leaves the rest to the converter.
Parity judges the result like any route's: a rewrite that changed the numbers would fail.
The user's model and the saved ``source/model.pt2`` are never touched: the rewrite happens
in the worker, on the program loaded from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    from torch.fx import Graph, Node

__all__ = ["PASSES", "CompatPass", "apply", "passes_for"]


@dataclass(frozen=True, kw_only=True)
class CompatPass:
    """A row of the pass table. ``impl``: ``module:function`` taking an ExportedProgram,
    rewriting it in place and returning how many nodes it rewrote."""

    name: str
    #: route names it helps (a failed attempt of another route is not retried with it)
    helps: tuple[str, ...]
    #: words of a converter's error message that say this pass applies
    addresses: tuple[str, ...]
    impl: str
    description: str = ""


PASSES: tuple[CompatPass, ...] = (
    CompatPass(name="bool-logical", helps=("coremltools-export", "coremltools-trace"),
               addresses=("kind __and__", "kind __or__", "kind __xor__", "kind __invert__"),
               impl="portable_models.convert.compat:bool_ops_to_logical",
               description="`&`, `|`, `^`, `~` on boolean tensors (attention masks) as logical_and/or/xor/not, "
                           "which coremltools' torch.export frontend converts"),
    CompatPass(name="view-to-reshape", helps=("torch-onnx", "executorch-xnnpack", "executorch-portable"),
               addresses=("Cannot view a tensor with shape",),
               impl="portable_models.convert.compat:views_to_reshapes",
               description="views as reshapes and the copies before them explicit: the ONNX exporter and "
                           "ExecuTorch's lowering re-derive strides (attention with a mask comes out in one layout "
                           "when they decompose the program, another when they re-run it), and a view that held "
                           "for one fails for the other"),
    CompatPass(name="where-scalars", helps=("coremltools-export",),
               addresses=("kind where.scalar",),
               impl="portable_models.convert.compat:where_scalars_to_tensors",
               description="`torch.where(mask, x, 0.0)` (a scalar branch) with the scalar as a 0-d tensor of "
                           "the result's dtype"),
    CompatPass(name="merge-permuted-dims", helps=("coremltools-export", "coremltools-trace"),
               addresses=("only supports tensors with rank <= 5",),
               impl="portable_models.convert.compat:merge_permuted_dims",
               description="a reshape to rank 6+ and a permute that keeps neighbouring dims together (window "
                           "partition and reverse in shifted-window attention) with those dims merged: rank 4, "
                           "the same elements in the same order; Core ML has no tensor above rank 5"),
    CompatPass(name="bicubic-as-matmul", helps=("coremltools-export", "coremltools-trace"),
               addresses=("kind upsample_bicubic2d", "op 'upsample_bicubic2d' not implemented"),
               impl="portable_models.convert.compat:bicubic_to_matmul",
               description="bicubic resizing with static sizes (a ViT's position-embedding grid) as two "
                           "products with constant matrices of the cubic kernel's weights"),
)


def passes_for(route: str, message: str) -> list[str]:
    """The passes that address a failed conversion of ``route`` with ``message``."""
    return [p.name for p in PASSES if route in p.helps and any(word in message for word in p.addresses)]


def apply(program: Any, names: list[str]) -> dict[str, int]:
    """Run the passes ``names`` on ``program`` in place; the nodes each rewrote."""
    from portable_models.core.imports import load_impl

    by_name = {p.name: p for p in PASSES}
    return {name: int(load_impl(by_name[name].impl)(program)) for name in names}


def bool_ops_to_logical(program: Any) -> int:
    """``aten.__and__``/``bitwise_and`` (and or, xor, not) on boolean tensors become
    ``logical_and`` (…): the same values for booleans, ops every converter knows."""
    import torch

    aten = torch.ops.aten
    swap = {aten.__and__.Tensor: aten.logical_and.default, aten.bitwise_and.Tensor: aten.logical_and.default,
            aten.__or__.Tensor: aten.logical_or.default, aten.bitwise_or.Tensor: aten.logical_or.default,
            aten.__xor__.Tensor: aten.logical_xor.default, aten.bitwise_xor.Tensor: aten.logical_xor.default,
            aten.bitwise_not.default: aten.logical_not.default}
    rewritten = 0
    for node in program.graph_module.graph.nodes:
        if node.op != "call_function" or node.target not in swap:
            continue
        args = [a for a in node.args if isinstance(a, torch.fx.Node)]
        if args and all(getattr(a.meta.get("val"), "dtype", None) == torch.bool for a in args):
            node.target = swap[node.target]
            rewritten += 1
    if rewritten:
        program.graph_module.recompile()
    return rewritten


# -- graph glue shared by the passes -----------------------------------------------
def _calls(program: Any, *targets: Any) -> list[Node]:
    """The program's nodes calling one of ``targets``, in graph order (a list: the passes
    edit the graph while they walk it)."""
    return [n for n in program.graph_module.graph.nodes if n.op == "call_function" and n.target in targets]


def _val(arg: Any) -> Any:
    """The fake value a node argument stands for (``meta["val"]``), other arguments as they are."""
    import torch

    return arg.meta.get("val") if isinstance(arg, torch.fx.Node) else arg


def _insert(graph: Graph, before: Node, target: Any, args: tuple[Any, ...],
            kwargs: dict[str, Any] | None = None) -> Node:
    """A call of ``target`` inserted before ``before``, with its provenance (module stack,
    source line) and a fake value computed from its arguments', which the converters read."""
    from torch._guards import detect_fake_mode
    from torch.utils._pytree import tree_map

    kwargs = dict(kwargs or {})
    with graph.inserting_before(before):
        node = graph.call_function(target, args, kwargs)
    node.meta.update({k: v for k, v in before.meta.items() if k not in ("val", "tensor_meta", "unbacked_bindings")})
    fake_args, fake_kwargs = tree_map(_val, (args, kwargs))
    mode = detect_fake_mode((fake_args, fake_kwargs)) or detect_fake_mode(
        [n.meta.get("val") for n in graph.nodes if n.op == "placeholder"])
    if mode is not None:
        with mode:
            node.meta["val"] = target(*fake_args, **fake_kwargs)
    else:  # a program without fake values (not one torch.export made): none to keep in step
        node.meta.pop("val", None)
    return node


def _replace(program: Any, old: Node, new: Node) -> None:
    """``new`` in place of ``old`` everywhere, the signature's outputs included (they name
    the node that gives each)."""
    old.replace_all_uses_with(new)
    for spec in program.graph_signature.output_specs:
        if getattr(spec.arg, "name", None) == old.name:
            spec.arg = type(spec.arg)(name=new.name)
    program.graph_module.graph.erase_node(old)


def _finish(program: Any, rewritten: int) -> int:
    """Check the edited graph and regenerate its code (``module()`` runs the code, not the graph)."""
    if rewritten:
        program.graph_module.graph.lint()
        program.graph_module.recompile()
    return rewritten


def _add_constant(program: Any, name: str, value: Any) -> Node:
    """``value`` as a lifted tensor constant of ``program``: a placeholder before the user
    inputs, a ``CONSTANT_TENSOR`` input spec at the same position, the tensor in
    ``program.constants`` (so ``module()``, ``run_decompositions`` and ``torch.export.save``
    all see it, as they see a constant torch.export lifted itself)."""
    from torch._guards import detect_fake_mode
    from torch.export.graph_signature import InputKind, InputSpec, TensorArgument

    graph = program.graph_module.graph
    specs = program.graph_signature.input_specs
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    at = next((i for i, s in enumerate(specs) if s.kind == InputKind.USER_INPUT), len(specs))
    if at < len(placeholders):
        with graph.inserting_before(placeholders[at]):
            node = graph.placeholder(name)
    else:
        with graph.inserting_after(placeholders[-1]) if placeholders else graph.inserting_before(None):
            node = graph.placeholder(name)
    mode = detect_fake_mode([n.meta.get("val") for n in placeholders])
    node.meta["val"] = mode.from_tensor(value, static_shapes=True) if mode is not None else value
    program.constants[name] = value
    specs.insert(at, InputSpec(kind=InputKind.CONSTANT_TENSOR, arg=TensorArgument(name=node.name),
                               target=name, persistent=None))
    return node


def _refake(node: Node) -> None:
    """Recompute ``node.meta["val"]`` from its (rewritten) arguments' fake values."""
    from torch._guards import detect_fake_mode
    from torch.utils._pytree import tree_map

    fake_args, fake_kwargs = tree_map(_val, (node.args, node.kwargs))
    mode = detect_fake_mode((fake_args, fake_kwargs))
    if mode is not None:
        with mode:
            node.meta["val"] = node.target(*fake_args, **fake_kwargs)  # type: ignore[operator]


def _static_shape(arg: Any) -> tuple[int, ...] | None:
    """The shape of a node's value when every dim is a plain int, else ``None``."""
    val = _val(arg)
    shape = getattr(val, "shape", None)
    if shape is None or not all(type(d) is int for d in shape):
        return None
    return tuple(shape)


# -- the passes ----------------------------------------------------------------------
def views_to_reshapes(program: Any) -> int:
    """``view``/``_unsafe_view`` become ``reshape``; ``contiguous`` becomes ``clone`` (a copy
    that a later pass cannot drop); a ``reshape`` of a tensor that is not contiguous copies it
    first. Same values. Why: ``torch.onnx.export`` decomposes the program with one fake layout
    for some ops (``scaled_dot_product_attention`` with a mask comes out in flash layout, so
    ``transpose(...).contiguous()`` is a no-op and the reshape after it a view) and then re-runs
    the graph with another (the math layout), where the view is illegal."""
    import torch

    aten = torch.ops.aten
    graph = program.graph_module.graph
    rewritten = 0
    for node in _calls(program, aten.view.default, aten._unsafe_view.default):
        node.target = aten.reshape.default
        rewritten += 1
    for node in _calls(program, aten.contiguous.default):
        if node.kwargs.get("memory_format", torch.contiguous_format) == torch.contiguous_format:
            node.target = aten.clone.default
            node.kwargs = {"memory_format": torch.contiguous_format}
            rewritten += 1
    for node in _calls(program, aten.reshape.default):
        source = node.args[0]
        val = _val(source)
        if isinstance(source, torch.fx.Node) and isinstance(val, torch.Tensor) and not _contiguous(val):
            copy = _insert(graph, node, aten.clone.default, (source,), {"memory_format": torch.contiguous_format})
            node.replace_input_with(source, copy)
            rewritten += 1
    return _finish(program, rewritten)


def _contiguous(val: Any) -> bool:
    """Whether a fake value is contiguous; a symbolic layout that cannot say counts as not."""
    try:
        return bool(val.is_contiguous())
    except Exception:  # a data-dependent stride: copying is the safe answer
        return False


def where_scalars_to_tensors(program: Any) -> int:
    """``where(c, x, 0.0)`` (``where.ScalarOther``; ``ScalarSelf`` and ``Scalar`` alike)
    becomes ``where(c, x, full_like(x, 0.0))`` with the scalar made a tensor of the result's
    dtype shaped like the result (like an argument of the result's shape, else the tensor
    branch): type promotion then gives that dtype, the one the scalar form gave, and
    broadcasting the same shape. Not a 0-d tensor: coremltools infers ``select``'s shape
    from its two branches only and declares a scalar."""
    import torch

    aten = torch.ops.aten
    graph = program.graph_module.graph
    rewritten = 0
    for node in _calls(program, aten.where.ScalarOther, aten.where.ScalarSelf, aten.where.Scalar):
        out = node.meta.get("val")
        if not isinstance(out, torch.Tensor):
            continue
        cond, *branches = node.args
        like = _shaped_like(out, [b for b in [*branches, cond] if isinstance(b, torch.fx.Node)])
        tensors = []
        for branch in branches:
            if isinstance(branch, torch.fx.Node):
                tensors.append(branch)
                continue
            tensors.append(_insert(graph, node, aten.full_like.default, (like, branch), {"dtype": out.dtype}))
        where = _insert(graph, node, aten.where.self, (cond, *tensors))
        _replace(program, node, where)
        rewritten += 1
    return _finish(program, rewritten)


def _shaped_like(out: Any, nodes: list[Node]) -> Node:
    """The first of ``nodes`` whose value has ``out``'s shape (symbols compared by name), else
    the first."""
    want = str(list(out.shape))
    return next((n for n in nodes if str(list(getattr(_val(n), "shape", ()))) == want), nodes[0])


def bicubic_to_matmul(program: Any) -> int:
    """``upsample_bicubic2d`` with static input and output sizes becomes
    ``Wh @ (x @ Ww.T)``: the weights of PyTorch's cubic convolution (``A = -0.75``, taps
    clamped at the borders, its source-index and scale rules) laid out as two constant
    matrices. Float32 or float64 input; anything else, or a dynamic height or width, is left
    alone."""
    import torch

    aten = torch.ops.aten
    graph = program.graph_module.graph
    rewritten = 0
    for node in _calls(program, aten.upsample_bicubic2d.vec, aten.upsample_bicubic2d.default):
        x = node.args[0]
        shape_in, shape_out, val = _static_shape(x), _static_shape(node), _val(x)
        if shape_in is None or shape_out is None or len(shape_in) != 4 or val.dtype not in (torch.float32, torch.float64):
            continue
        align, (scale_h, scale_w) = _bicubic_args(node)
        dtype = "float32" if val.dtype == torch.float32 else "float64"
        rows = _cubic_matrix(shape_in[2], shape_out[2], align, scale_h, dtype)
        cols = _cubic_matrix(shape_in[3], shape_out[3], align, scale_w, dtype).T.copy()
        base = f"compat_bicubic_{node.name}"
        wh = _add_constant(program, f"{base}_rows", torch.from_numpy(rows))
        ww = _add_constant(program, f"{base}_cols", torch.from_numpy(cols))
        inner = _insert(graph, node, aten.matmul.default, (x, ww))
        _replace(program, node, _insert(graph, node, aten.matmul.default, (wh, inner)))
        rewritten += 1
    return _finish(program, rewritten)


def _bicubic_args(node: Node) -> tuple[bool, tuple[float | None, float | None]]:
    """``align_corners`` and the (height, width) scales the op was given, for both overloads."""
    import torch

    vec = node.target == torch.ops.aten.upsample_bicubic2d.vec
    names = ("input", "output_size", "align_corners", *(("scale_factors",) if vec else ("scales_h", "scales_w")))
    args: dict[str, Any] = {**dict(zip(names, node.args, strict=False)), **node.kwargs}
    if vec:
        factors = args.get("scale_factors")
        return bool(args["align_corners"]), (factors[0], factors[1]) if factors else (None, None)
    return bool(args["align_corners"]), (args.get("scales_h"), args.get("scales_w"))


def _cubic_matrix(size_in: int, size_out: int, align_corners: bool, scale: float | None,
                  dtype: str) -> np.ndarray:
    """``[size_out, size_in]``: row ``i`` holds the weights output ``i`` gives each input,
    computed in ``dtype`` step by step as ATen's CPU kernel does (``area_pixel_compute_scale``,
    ``area_pixel_compute_source_index`` with ``cubic=True``, ``guard_index_and_lambda``,
    ``get_cubic_upsample_coefficients``); taps past a border add to the border's weight."""
    import numpy as np

    f = np.dtype(dtype).type
    if align_corners:
        ratio = f(size_in - 1) / f(size_out - 1) if size_out > 1 else f(0)
    else:
        ratio = f(1.0 / scale) if scale is not None and scale > 0 else f(size_in) / f(size_out)
    out = np.zeros((size_out, size_in), dtype=dtype)
    for i in range(size_out):
        real = ratio * f(i) if align_corners else ratio * (f(i) + f(0.5)) - f(0.5)
        index = min(int(np.floor(real)), size_in - 1)
        t = min(max(real - f(index), f(0)), f(1))
        for k, weight in enumerate(_cubic_coefficients(t, f)):
            out[i, min(max(index - 1 + k, 0), size_in - 1)] += weight
    return out


def _cubic_coefficients(t: Any, f: Any) -> tuple[Any, Any, Any, Any]:
    """The four taps' weights at fraction ``t`` (Keys' kernel, ``A = -0.75`` as in ATen)."""
    a = f(-0.75)

    def near(x: Any) -> Any:  # |x| <= 1
        return ((a + f(2)) * x - (a + f(3))) * x * x + f(1)

    def far(x: Any) -> Any:  # 1 < |x| < 2
        return ((a * x - f(5) * a) * x + f(8) * a) * x - f(4) * a

    return far(t + f(1)), near(t), near(f(1) - t), far(f(1) - t + f(1))


def merge_permuted_dims(program: Any) -> int:
    """A reshape to more than five dims whose only use is a permute (or transpose) that keeps runs of
    neighbouring dims together and in order (shifted-window attention's window partition,
    ``(B, H/w, w, W/w, w, C)`` permuted ``(0, 1, 3, 2, 4, 5)``, and its reverse) is rewritten
    with each run merged into one dim: ``(B*H/w, w, W/w, w*C)`` permuted ``(0, 2, 1, 3)``.
    The same elements in the same order, so only when every use of the permute (through a
    copy) is a reshape, which reads nothing but that order. At most one merged size may be
    unknown (it becomes ``-1``)."""
    import torch

    aten = torch.ops.aten
    reshapes = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
    copies = {aten.clone.default, aten.contiguous.default}
    rewritten = 0
    for perm in _calls(program, aten.permute.default, aten.transpose.int):
        source: Any = perm.args[0]
        if not isinstance(source, torch.fx.Node) or source.target not in reshapes:
            continue
        shape: Any = source.args[1]
        if len(shape) <= 5:
            continue
        order: Any = perm.args[1] if perm.target is aten.permute.default else _swapped(len(shape), *perm.args[1:])
        uses = list(perm.users)
        through = [u for u in uses if u.target in copies]
        if len(source.users) != 1 or not all(u.target in reshapes or (u in through and u.users and all(
                v.target in reshapes for v in u.users)) for u in uses):
            continue
        plan = _merged(list(shape), [int(d) for d in order])
        if plan is None:
            continue
        source.args = (source.args[0], plan[0])
        perm.target, perm.args = aten.permute.default, (source, plan[1])
        for node in (source, perm, *through):
            _refake(node)
        rewritten += 1
    return _finish(program, rewritten)


def _swapped(rank: int, a: Any, b: Any) -> list[int]:
    """``transpose(a, b)`` as a permutation."""
    dims = list(range(rank))
    dims[int(a) % rank], dims[int(b) % rank] = dims[int(b) % rank], dims[int(a) % rank]
    return dims


def _merged(shape: list[Any], dims: list[int]) -> tuple[list[Any], list[int]] | None:
    """The shape and permutation with every run of dims that the permutation keeps together
    merged; None when nothing merges or more than one merged size is unknown."""
    import math

    runs: list[list[int]] = []
    for d in dims:
        if runs and d == runs[-1][-1] + 1:
            runs[-1].append(d)
        else:
            runs.append([d])
    if len(runs) == len(dims):
        return None
    ordered = sorted(runs, key=lambda run: run[0])
    sizes: list[Any] = []
    for run in ordered:
        parts = [shape[d] for d in run]
        known = all(type(p) is int and p >= 0 for p in parts)
        sizes.append(math.prod(parts) if known else parts[0] if len(parts) == 1 else -1)
    if sum(1 for size in sizes if not (type(size) is int and size >= 0)) > 1:
        return None
    return sizes, [ordered.index(run) for run in runs]
