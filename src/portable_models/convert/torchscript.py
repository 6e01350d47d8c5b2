"""The ``torchscript`` target from a captured torch program.

requires: torch.
convert:  the program's module (``ep.module()``) is flattened into a plain
          ``GraphModule`` (flat positional inputs, a flat tuple of outputs in pytree
          order, the input guards dropped, ATen overloads replaced by their packets so
          TorchScript can resolve them), then compiled with ``torch.jit.trace`` — or
          ``torch.jit.script`` when the graph computes with symbolic sizes
          (``view(x.size(0), -1)``), which tracing would bake in as constants — frozen
          with ``torch.jit.freeze`` and saved as ``model.torchscript.pt``.
ensures:  the saved file loads, returns one tensor per logical output, and, run on
          inputs of another size along every dynamic dim, answers the same output
          shapes as the captured program.

TorchScript has no input names: the artifact is called positionally, in the order
recorded in ``meta["positional_inputs"]``; its outputs are a flat tuple in the order
of ``meta["positional_outputs"]``.
"""

from __future__ import annotations

import copy
import operator
from typing import TYPE_CHECKING, Any

from portable_models.convert.base import ConvertJob, ConvertResult, Step
from portable_models.convert.torch_program import load_eager_trace, load_program, resized_inputs
from portable_models.core.imports import package_version
from portable_models.core.iomap import IoMap
from portable_models.core.torch_io import flatten_outputs, import_torch, sample_args
from portable_models.errors import ConversionError, PortableModelsError

if TYPE_CHECKING:
    from torch.export import ExportedProgram
    from torch.fx import GraphModule

__all__ = ["convert_eager_trace", "convert_trace"]

ARTIFACT = "model.torchscript.pt"
_METHODS = ("auto", "trace", "script")
_SYM_OPS = {operator.add, operator.sub, operator.mul, operator.floordiv, operator.truediv,
            operator.mod, operator.pow, operator.neg}


def convert_trace(job: ConvertJob) -> ConvertResult:
    """ExportedProgram (``job.source_file``) -> ``job.out_dir / model.torchscript.pt``."""
    import_torch(f"convert:{job.route}")
    method = str(job.options.get("torchscript_method", "auto"))
    if method not in _METHODS:
        raise ConversionError(f"torchscript_method {method!r} is not one of {_METHODS}",
                              stage=f"convert:{job.route}")
    ep = load_program(job)
    gm = _flat_module(ep)
    symbolic = _has_symbolic_sizes(gm)
    order = _order(method, symbolic)
    args = sample_args(job.inputs, job.sample_inputs)
    module, used, failures = _compile(gm, args, order, job)
    detail: dict[str, Any] = {"method": used, "symbolic_sizes": symbolic}
    if failures:
        detail["fallback_from"] = failures
    return _save_checked(job, module, ep, args, used, detail)


def convert_eager_trace(job: ConvertJob) -> ConvertResult:
    """The eager model's ``torch.jit.trace``, made at capture, frozen and saved: where the
    captured program does not compile to TorchScript, or compiles with a size baked in,
    the trace of the model itself may not (Python-level size arithmetic stays traced
    ``aten::size`` calls). Checked at other sizes of the dynamic dims like the other route's."""
    ep = load_program(job)
    args = sample_args(job.inputs, job.sample_inputs)
    return _save_checked(job, load_eager_trace(job), ep, args, "trace",
                         {"method": "trace", "source": "the eager model, at capture"})


def _save_checked(job: ConvertJob, module: Any, ep: ExportedProgram, args: tuple[Any, ...], used: str,
                  detail: dict[str, Any]) -> ConvertResult:
    """Freeze, save and reload ``module``; check its outputs on the sample and its shapes at
    other sizes of the dynamic dims against the program's."""
    torch = import_torch(f"convert:{job.route}")
    frozen, freeze_note = _freeze(module, job)
    path = job.out_dir / ARTIFACT
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.save(frozen, str(path))
    loaded = torch.jit.load(str(path), map_location="cpu")
    _check_outputs(loaded, args, job)
    dynamic = _check_dynamic(loaded, ep, job)
    detail = {**detail, "frozen": frozen is not module}
    meta: dict[str, Any] = {
        "positional_inputs": job.input_names,
        "positional_outputs": job.output_names,
        "method": used,
        "frozen": frozen is not module,
        "dynamic_check": dynamic,
    }
    if freeze_note:
        meta["freeze_error"] = freeze_note
    step = Step(step=f"torch.jit.{used}", version=package_version("torch"), detail=detail)
    return ConvertResult(file=ARTIFACT, io=IoMap.identity(job.input_names, job.output_names),
                         steps=[step], precision="float32", meta=meta)


def _flat_module(ep: ExportedProgram) -> GraphModule:
    """``ep.module()`` as a plain GraphModule: flat inputs, flat tuple output, no guard
    call, ATen overloads (``aten.view.default``) replaced by packets (``aten.view``)."""
    import torch

    unlifted = ep.module()
    graph = copy.deepcopy(unlifted.graph)
    graph.set_codegen(torch.fx.graph.CodeGen())
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn" and not node.users:
            graph.erase_node(node)
        elif node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
            node.target = node.target.overloadpacket
    graph.lint()
    gm = torch.fx.GraphModule(unlifted, graph)
    return gm.eval()


def _has_symbolic_sizes(gm: GraphModule) -> bool:
    """True when a node computes a size (a SymInt), which tracing would freeze."""
    import torch

    sym_types = (torch.SymInt, torch.SymFloat, torch.SymBool)
    for node in gm.graph.nodes:
        if isinstance(node.meta.get("val"), sym_types):
            return True
        target = node.target
        if node.op == "call_function" and (
            target in _SYM_OPS or "sym_" in getattr(target, "__name__", "")
        ):
            return True
    return False


def _order(method: str, symbolic: bool) -> list[str]:
    if method == "trace":
        return ["trace"]
    if method == "script":
        return ["script"]
    return ["script", "trace"] if symbolic else ["trace", "script"]


def _compile(gm: GraphModule, args: tuple[Any, ...], order: list[str],
             job: ConvertJob) -> tuple[Any, str, dict[str, str]]:
    """Try the methods in ``order``; the first that compiles wins."""
    import torch

    failures: dict[str, str] = {}
    for method in order:
        try:
            with torch.no_grad():
                if method == "trace":
                    module = torch.jit.trace(gm, args, check_trace=False, strict=False)
                else:
                    module = torch.jit.script(gm)
            return module, method, failures
        except PortableModelsError:
            raise
        except Exception as exc:  # a compile failure: try the next method
            failures[method] = f"{type(exc).__name__}: {str(exc)[:500]}"
    raise ConversionError(
        f"TorchScript could not compile the program: {failures}",
        file=str(job.source_file), stage=f"convert:{job.route}",
        fix="see logs/torchscript.log; the program uses an op TorchScript lacks",
    )


def _freeze(module: Any, job: ConvertJob) -> tuple[Any, str]:
    """``torch.jit.freeze`` (weights become constants) unless asked not to or it fails;
    a failed freeze keeps the unfrozen module and says why."""
    import torch

    if not job.options.get("torchscript_freeze", True):
        return module, ""
    try:
        return torch.jit.freeze(module.eval()), ""
    except RuntimeError as exc:
        return module, f"{type(exc).__name__}: {str(exc)[:300]}"


def _call(module: Any, args: tuple[Any, ...]) -> list[Any]:
    import torch

    with torch.no_grad():
        return flatten_outputs(module(*args))


def _check_outputs(loaded: Any, args: tuple[Any, ...], job: ConvertJob) -> None:
    try:
        outs = _call(loaded, args)
    except RuntimeError as exc:
        raise ConversionError(f"the saved TorchScript module fails on the sample: {exc}",
                              stage=f"convert:{job.route}") from exc
    if len(outs) != len(job.outputs):
        raise ConversionError(
            f"the TorchScript module returns {len(outs)} outputs, the program "
            f"{len(job.outputs)} {job.output_names}", stage=f"convert:{job.route}")


def _check_dynamic(loaded: Any, ep: ExportedProgram, job: ConvertJob) -> dict[str, Any]:
    """Run the artifact with every dynamic dim at another size: it must answer the
    output shapes the captured program answers (a baked-in size fails here)."""
    arrays, sizes = resized_inputs(job)
    if not sizes:
        return {"status": "not needed"}
    args = sample_args(job.inputs, arrays)
    try:
        expected = [tuple(t.shape) for t in _call(ep.module(), args)]
    except (RuntimeError, AssertionError, ValueError) as exc:
        return {"status": "skipped", "sizes": sizes,
                "reason": f"the program itself rejects these sizes: {str(exc)[:200]}"}
    try:
        got = [tuple(t.shape) for t in _call(loaded, args)]
    except RuntimeError as exc:
        raise ConversionError(
            f"the TorchScript module fails when dims change to {sizes}: {str(exc)[:500]}",
            stage=f"convert:{job.route}",
            fix="a size was baked in; try options torchscript_method='script'",
        ) from exc
    if got != expected:
        raise ConversionError(
            f"the TorchScript module answers shapes {got} at {sizes}, the program {expected}",
            stage=f"convert:{job.route}", fix="try options torchscript_method='script'")
    return {"status": "pass", "sizes": sizes}

