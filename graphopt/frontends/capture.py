"""Capture a model into graphopt's one canonical IR.

The canonical IR is the ATen-level graph that ``torch.export.export(..., strict=False)`` produces
(the training IR: ``aten.linear``, ``aten.layer_norm``, ``aten.scaled_dot_product_attention`` are
kept whole, not decomposed), un-lifted so that parameters and buffers are ``get_attr`` constants of
the returned ``torch.fx.GraphModule``. Every node carries ``meta["val"]`` (a fake tensor with the
node's shape and dtype); :func:`graphopt.ir.propagate_shapes` keeps it valid after rewrites.

Three things differ from a plain ``ep.module()``:

* the model is exported in eval mode with its KV cache switched off (transformers decoders return a
  ``DynamicCache`` when ``use_cache=True``, which ``torch.export`` cannot output), and both are
  restored afterwards: the caller's model is never changed;
* parameters and buffers are *copies*, so a pass that edits weights cannot reach the user's model;
* export's runtime guard call and tensor-metadata asserts are dropped: they pin the input layout the
  example had and would only get in the way of passes that change shapes;
* regions that only switch grad mode (``torch.no_grad()`` blocks, e.g. Llama's rotary embedding) or
  disabled autocast are inlined: for inference they are plain ops, and passes should see them.

Dynamic shapes: pass ``dynamic_shapes`` exactly as ``torch.export`` takes it (e.g.
``({0: Dim.AUTO, 1: Dim.AUTO},)`` for batch and sequence). The graph then holds symbolic sizes and
keeps working when a pass shortens the sequence. A model that writes a size into a view as a Python
constant (``x.view(2, 16, 4, 32)`` rather than ``x.view(b, t, h, d)``) specializes that dimension:
export reports it, and the captured graph only runs at that size. :func:`auto_dynamic_shapes` is
the spec :func:`graphopt.optimize` uses by default, :func:`captured_inputs` says, per input,
which dims the captured graph really left dynamic, and :func:`graph_dynamic_shapes` turns those
back into a spec for exporting the graph again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import warnings
from typing import Any

import torch
import torch.fx

from graphopt.ir import _unique_attr_name, cleanup, clone_graph_module, in_place_writes, propagate_shapes, quiet_meta_errors
from graphopt.pipeline.report import one_line  # defined with the report, whose reasons it writes

__all__ = [
    "CaptureError",
    "CapturedInput",
    "auto_dynamic_shapes",
    "capture",
    "captured_inputs",
    "flat_inputs",
    "graph_dynamic_shapes",
    "inference_view",
    "normalize_args",
    "normalize_batches",
    "one_line",
]


class CaptureError(RuntimeError):
    """Neither ``torch.export`` nor ``torch.fx.symbolic_trace`` could capture the model."""


@contextlib.contextmanager
def inference_view(model: torch.nn.Module):
    """Eval mode and no KV cache for the duration, restoring the caller's settings afterwards.

    This is the function :func:`capture` captures; run the original model inside it to get the
    outputs a captured graph must reproduce.

    The mode is set with the ``train`` method of the model's class, not of the instance: the module
    ``ExportedProgram.module()`` returns (e.g. of an archive from ``torch.export.load``) has
    instance ``train``/``eval`` methods that raise, since its ops were fixed at export; for such a
    graph the mode is only flags, so it can be captured like any model.
    """
    set_mode = type(model).train
    was_training = model.training
    configs = [m.config for m in model.modules() if hasattr(getattr(m, "config", None), "use_cache")]
    saved = [(c, c.use_cache) for c in {id(c): c for c in configs}.values()]
    try:
        set_mode(model, False)
        for config, _ in saved:
            config.use_cache = False
        yield
    finally:
        for config, value in saved:
            config.use_cache = value
        set_mode(model, was_training)


def normalize_args(example_inputs: Any) -> tuple:
    """Positional example inputs as a tuple: ``None`` -> ``()``, a tuple or list -> a tuple of its
    items, anything else (one tensor) -> a 1-tuple. What every entry point accepts as ``example_inputs``."""
    if example_inputs is None:
        return ()
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    return (example_inputs,)


def normalize_batches(batches: Any) -> list[tuple[tuple, dict]]:
    """Input batches as ``(args, kwargs)`` pairs: each batch is already such a pair (a 2-tuple whose
    second item is a dict), or positional inputs as :func:`normalize_args` takes them. What
    ``optimize``'s ``calibration`` and the auto search's inputs accept."""
    return [batch if isinstance(batch, tuple) and len(batch) == 2 and isinstance(batch[1], dict) else (normalize_args(batch), {}) for batch in batches]


def capture(
    model: torch.nn.Module,
    example_inputs=(),
    example_kwargs: dict | None = None,
    dynamic_shapes=None,
    *,
    fallback: bool = True,
) -> torch.fx.GraphModule:
    """Capture ``model`` on ``example_inputs`` into the canonical ATen IR.

    Args:
        model: any ``nn.Module``; it is neither mutated nor left in another mode.
        example_inputs: positional arguments (a tuple, or a single tensor).
        example_kwargs: keyword arguments, if the model takes any.
        dynamic_shapes: a ``torch.export`` dynamic-shapes spec for the inputs, or None (static).
        fallback: when export fails, try ``torch.fx.symbolic_trace`` and lower that graph to ATen.

    Returns:
        A ``GraphModule`` that takes and returns what ``model`` does (pytree in, pytree out), whose
        parameters are private copies. ``gm.meta["graphopt_capture"]`` says which road was taken;
        ``gm.meta["graphopt_mutations"]`` names the buffers and inputs the model writes in place,
        which running the graph repeatedly would write again.

    Raises:
        CaptureError: both roads failed; the message gives both reasons in one line each.
    """
    if not isinstance(model, torch.nn.Module):
        raise CaptureError(f"expected a torch.nn.Module, got {type(model).__name__}")
    args = normalize_args(example_inputs)
    kwargs = dict(example_kwargs or {})
    with inference_view(model), quiet_meta_errors():  # a shape error is raised once, not logged as a traceback first
        try:
            ep = torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False)
            gm = ep.module()
            road = "torch.export"
        except Exception as export_error:  # noqa: BLE001 - any failure means: try the other road
            reason = one_line(export_error)
            if not fallback:
                raise CaptureError(f"torch.export failed: {reason}") from export_error
            warnings.warn(f"graphopt: torch.export failed ({reason}); trying torch.fx.symbolic_trace", stacklevel=2)
            try:
                gm = _symbolic_trace_to_aten(model, args, kwargs)
                road = "torch.fx.symbolic_trace"
            except Exception as trace_error:  # noqa: BLE001
                raise CaptureError(
                    f"cannot capture {type(model).__name__}: torch.export failed ({reason}); torch.fx.symbolic_trace failed ({one_line(trace_error)})"
                ) from trace_error
    _inline_mode_regions(gm)
    _strip_runtime_checks(gm)
    _drop_identity_slices(gm)
    gm = clone_graph_module(gm)  # a plain GraphModule, without export's input-checking hooks
    cleanup(gm)  # constants the outputs never read (e.g. an unused pooler) are not part of the function
    _privatize_constants(gm)
    gm.eval()
    gm.meta["graphopt_capture"] = road
    gm.meta["graphopt_mutations"] = in_place_writes(gm)
    if road != "torch.export":
        for node in gm.graph.nodes:  # make_fx's values come from several fake modes: start afresh
            node.meta.pop("val", None)
        propagate_shapes(gm, args)
    return gm


def _symbolic_trace_to_aten(model, args, kwargs) -> torch.fx.GraphModule:
    """The fallback road: a torch-level trace, lowered to ATen by re-tracing it with make_fx."""
    if kwargs:
        raise CaptureError("the symbolic_trace fallback takes positional inputs only")
    from torch.fx.experimental.proxy_tensor import make_fx

    traced = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        return make_fx(traced, pre_dispatch=True)(*args)


def _strip_runtime_checks(gm: torch.fx.GraphModule) -> None:
    graph = gm.graph
    for node in list(graph.nodes):
        is_guard_call = node.op == "call_module" and node.target == "_guards_fn"
        is_meta_assert = node.op == "call_function" and node.target is torch.ops.aten._assert_tensor_metadata.default
        if (is_guard_call or is_meta_assert) and not node.users:
            graph.erase_node(node)
    gm.delete_all_unused_submodules()
    gm.recompile()


def _drop_identity_slices(gm: torch.fx.GraphModule) -> None:
    """Replace ``x[..., 0:MAX:1]`` slices by ``x``.

    With static shapes export never records them (``x[:, :]`` is seen to be ``x``); with symbolic
    ones it does, e.g. Hugging Face heads' ``hidden_states[:, slice(-0, None), :]``. Dropped here,
    so that passes see the same graph whether the model was captured static or dynamic."""
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not torch.ops.aten.slice.Tensor or node.kwargs:
            continue
        start, end, step = (list(node.args[2:]) + [None, None, None])[:3]
        if start in (None, 0) and (end is None or (isinstance(end, int) and end >= 2**63 - 1)) and step in (None, 1):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            changed = True
    if changed:
        gm.recompile()


def _inline_mode_regions(gm: torch.fx.GraphModule) -> None:
    """Inline ``wrap_with_set_grad_enabled`` and disabled ``wrap_with_autocast`` sub-graphs."""
    hop = torch.ops.higher_order
    changed = True
    while changed:
        changed = False
        for node in list(gm.graph.nodes):
            if node.op != "call_function":
                continue
            if node.target is hop.wrap_with_set_grad_enabled:
                submod_node, operands = node.args[1], node.args[2:]
            elif node.target is getattr(hop, "wrap_with_autocast", None) and node.args[2] is False:
                submod_node, operands = node.args[4], node.args[5:]
            else:
                continue
            _inline_call(gm, node, getattr(gm, submod_node.target), operands)
            if not submod_node.users:
                gm.graph.erase_node(submod_node)
            changed = True
    gm.delete_all_unused_submodules()
    gm.recompile()


def _inline_call(gm: torch.fx.GraphModule, call: torch.fx.Node, sub: torch.fx.GraphModule, operands) -> None:
    """Replace ``call`` (whose result is a tuple read through getitem) by a copy of ``sub``'s graph."""
    import operator

    env: dict[torch.fx.Node, object] = {}
    placeholders = iter(operands)
    outputs = None
    with gm.graph.inserting_before(call):
        for sn in sub.graph.nodes:
            if sn.op == "placeholder":
                env[sn] = next(placeholders)
            elif sn.op == "output":
                outputs = torch.fx.map_arg(sn.args[0], lambda n: env[n])
            elif sn.op == "get_attr":
                name = _unique_attr_name(gm, sn.target.replace(".", "_"))
                setattr(gm, name, getattr(sub, sn.target))
                env[sn] = gm.graph.get_attr(name)
                env[sn].meta = dict(sn.meta)
            else:
                env[sn] = gm.graph.node_copy(sn, lambda n: env[n])
    for user in list(call.users):
        if user.op == "call_function" and user.target is operator.getitem:
            user.replace_all_uses_with(outputs[user.args[1]])
            gm.graph.erase_node(user)
    if call.users:
        raise CaptureError(f"cannot inline {call.name}: its result is used other than through getitem")
    gm.graph.erase_node(call)


def _privatize_constants(gm: torch.fx.GraphModule) -> None:
    """Replace every parameter and buffer by a detached copy (tied tensors stay tied)."""
    copies: dict[int, torch.Tensor] = {}

    def private(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in copies:
            copies[id(t)] = t.detach().clone()
        return copies[id(t)]

    params: dict[int, torch.nn.Parameter] = {}
    for module in gm.modules():
        for name, p in list(module._parameters.items()):
            if p is not None:
                if id(p) not in params:
                    params[id(p)] = torch.nn.Parameter(private(p), requires_grad=False)
                module._parameters[name] = params[id(p)]
        for name, b in list(module._buffers.items()):
            if b is not None:
                module._buffers[name] = private(b)
        for name, value in list(vars(module).items()):
            if isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter):
                setattr(module, name, private(value))


# ----------------------------------------------------------------------------- shapes


def _auto_dims(value: Any):
    """``Dim.AUTO`` for the batch and sequence dims of one input: dim 0, and dim 1 of a tensor of
    rank 2 or 3 (``[B, T]`` ids, ``[B, T, D]`` features). Dim 1 of an image (``[B, C, H, W]``) is
    channels and its spatial dims feed pooling geometry, so only its batch is left free."""
    Dim = torch.export.Dim
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            return None
        return {i: Dim.AUTO for i in range(min(value.dim(), 2 if value.dim() <= 3 else 1))}
    if isinstance(value, list):
        return [_auto_dims(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_auto_dims(v) for v in value)
    if isinstance(value, dict):
        return {k: _auto_dims(v) for k, v in value.items()}
    return None


def auto_dynamic_shapes(model: torch.nn.Module, args: tuple, kwargs: dict) -> dict | tuple:
    """A ``torch.export`` dynamic-shapes spec with ``Dim.AUTO`` on every input's batch and sequence dims.

    ``Dim.AUTO`` lets export keep a dim static where the model pins it (a size written into a
    view, a position table of one length, a size-1 example dim, which export always specializes)
    instead of failing; :func:`captured_inputs` then says what stayed dynamic. The spec is keyed by
    ``model.forward``'s parameter names (which the captured graph's ``forward`` keeps), or a tuple
    over the positional inputs when the signature cannot be bound.
    """
    try:
        bound = inspect.signature(model.forward).bind(*args, **kwargs)
    except (TypeError, ValueError):
        if kwargs:
            raise
        return tuple(_auto_dims(a) for a in args)
    return {name: _auto_dims(value) for name, value in bound.arguments.items()}


@dataclasses.dataclass(frozen=True)
class CapturedInput:
    """One tensor input of a captured graph: its placeholder's name, the example's shape, and the
    dims the graph holds as constants (it only runs with those sizes)."""

    name: str
    shape: tuple[int, ...]
    static_dims: tuple[int, ...]

    @property
    def dynamic_dims(self) -> tuple[int, ...]:
        return tuple(i for i in range(len(self.shape)) if i not in self.static_dims)


def captured_inputs(gm: torch.fx.GraphModule) -> tuple[CapturedInput | None, ...]:
    """Per placeholder of ``gm`` (in order; ``None`` for a non-tensor one): its example shape and
    which dims are static (an ``int`` in ``meta["val"]``) rather than symbolic."""
    out: list[CapturedInput | None] = []
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            out.append(None)
            continue
        shape, static = [], []
        for i, size in enumerate(val.shape):
            if isinstance(size, int):
                shape.append(size)
                static.append(i)
            else:
                shape.append(int(size.node.hint) if size.node.has_hint() else -1)
        out.append(CapturedInput(node.name, tuple(shape), tuple(static)))
    return tuple(out)


def graph_dynamic_shapes(gm: torch.fx.GraphModule) -> dict | tuple | None:
    """The ``torch.export`` dynamic-shapes spec that keeps dynamic what ``gm`` already holds symbolic.

    Each tensor input gets ``{dim: Dim.AUTO}`` for the dims that are symbolic in its placeholder's
    ``meta["val"]`` (:func:`captured_inputs`), or None when it has none; non-tensor inputs get None.
    When ``gm`` has a pytree input structure (graphs from :func:`capture` or a pass, and
    ``ExportedProgram.module()``, e.g. of an archive from ``torch.export.load``) the spec is a dict
    keyed by ``gm.forward``'s parameter names, nested as the inputs are; otherwise a tuple with one
    entry per placeholder.

    Returns None when no input dim is symbolic (a static capture, or a graph without shape metadata
    such as a plain ``torch.fx.symbolic_trace``), or when ``gm.forward``'s signature does not take
    the structure its inputs are flattened from; ``torch.export`` then captures static shapes.

    Exporting or capturing ``gm`` again with this spec (``graphopt.save``, ONNX export, a ``.pt2``
    archive given to the CLI) keeps it working at the batch and sequence lengths it took before,
    where the example's shapes alone would fix them.
    """
    inputs = captured_inputs(gm)
    if not any(i is not None and i.dynamic_dims for i in inputs):
        return None
    leaves = [None if i is None or not i.dynamic_dims else {d: torch.export.Dim.AUTO for d in i.dynamic_dims} for i in inputs]
    info = getattr(gm.graph._codegen, "pytree_info", None)
    if info is None or info.in_spec is None:
        return tuple(leaves)
    args_spec, kwargs_spec = torch.utils._pytree.tree_unflatten(leaves, info.in_spec)
    try:
        return dict(inspect.signature(gm.forward).bind(*args_spec, **kwargs_spec).arguments)
    except TypeError:
        return None


def flat_inputs(gm: torch.fx.GraphModule, args: tuple, kwargs: dict) -> list | None:
    """``(args, kwargs)`` flattened the way ``gm`` flattens them into its placeholders, or None when
    they do not fit its input structure (the graph's own call then says so)."""
    info = getattr(gm.graph._codegen, "pytree_info", None)
    if info is None or info.in_spec is None:
        return None if kwargs else list(args)
    from torch.fx._pytree import tree_flatten_spec

    try:
        return list(tree_flatten_spec((list(args), kwargs), info.in_spec))
    except Exception:  # noqa: BLE001 - a structure mismatch: not this check's to report
        return None
