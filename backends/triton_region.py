"""A fused region prepared for a kernel template: views moved out of the kernel, inputs as operands.

A region cut out by the partitioner mixes computing ops with views (``view``, ``unsqueeze``,
``permute``, ``expand``, ...). A kernel computes on flat, row-major element indices, so views are
taken out of it the way a fusing compiler folds them into index arithmetic:

* **Reshapes of computed values** (``view``, ``reshape``, ``unsqueeze``, ``squeeze``, ``flatten``,
  ``alias``, ``clone``, ``contiguous``) keep every element at its row-major index, so in the kernel
  they are the identity: the reshaped value *is* the computed one.
* **Views of region inputs** (any view, ``permute`` and ``expand`` included) run before the kernel,
  in torch, on the real tensors: they cost no copy and leave strides the kernel reads through.
* An ``expand`` of a computed value is the identity too, in a region with no reshape of a computed
  value: pointwise ops commute with broadcasting, so the value is computed at every element of
  the broadcast shape instead (see :meth:`KernelRegion.operand_tensor`).
* Any other view of a computed value (a ``permute`` or ``slice`` between two pointwise ops) has no
  flat-index form: :class:`NotLowerable`, and the region stays ATen.

What is left is :attr:`KernelRegion.kernel_graph`: the computing ops only, reading one placeholder
per *operand*, i.e. per (input value, op reading it) pair. Each operand is handed to the kernel
broadcast to the shape of the op reading it and reshaped to the template's iteration space
(:meth:`KernelRegion.operand_tensor`), so its strides say everything: 0 along broadcast dims, permuted
strides for a permuted input.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch.fx import Graph, GraphModule, Node
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.node import map_arg

from graphopt.backends.partition import op_kind
from graphopt.ir import aten
from graphopt.ops.triton_runtime import NotLowerable  # one class for templates and kernels: the backend leaves the region to ATen

__all__ = ["KernelRegion", "NotLowerable", "Operand", "RESHAPES"]


RESHAPES = {
    aten.view,
    aten.reshape,
    aten._unsafe_view,
    aten.unsqueeze,
    aten.squeeze,
    aten.flatten,
    aten.alias,
    aten.clone,
    aten.contiguous,
}
"""Views that keep each element at its row-major index (identities on the flat index)."""


@dataclasses.dataclass(frozen=True)
class Operand:
    """One kernel input: the region value ``source`` (a placeholder or a view of inputs, computed
    by torch before the launch) as read by the region's computing node ``consumer``."""

    source: Node
    consumer: Node


def _is_view(node: Node) -> bool:
    return node.op == "call_function" and op_kind(node) == "view"


class KernelRegion:
    """A region ``GraphModule`` split into torch-side views and the kernel's computing ops.

    Attributes:
        region: the region as the partitioner cut it (its placeholders are the region's inputs).
        kernel_graph: the computing ops of ``region``, same node names, each tensor argument that is
            not computed inside replaced by an operand placeholder ``operand<k>``; its output is the
            tuple of distinct computed values the region returns.
        operands: the :class:`Operand` of each ``kernel_graph`` placeholder, in order.
        outputs: for each region output, the ``kernel_graph`` output index holding its elements
            (a reshape of a computed value is that value), or None for an input (or a view of
            one) that the region returns as it is.
        has_reshapes: whether a computed value is reshaped inside the region (then no value may
            be broadcast by a later op: see :meth:`operand_tensor`).
        original: each computing ``kernel_graph`` node -> the ``region`` node it computes (the key
            to :meth:`bind`'s values).
        result_nodes, single: the region's output nodes, and whether it returns one tensor (not a tuple).
    """

    def __init__(self, region: GraphModule):
        self.region = region
        self.has_reshapes = False
        broadcasts = False
        self._fakes: dict[tuple, dict[Node, Any]] = {}
        computed: dict[Node, Node] = {}  # region node -> the region node holding its elements
        for node in region.graph.nodes:
            if node.op in ("placeholder", "output"):
                continue
            if node.op != "call_function":
                raise NotLowerable(f"{node.op} node {node.name}")
            if _is_view(node):
                source = node.all_input_nodes[0] if node.all_input_nodes else None
                if source in computed:
                    if node.target.overloadpacket is aten.expand:
                        broadcasts = True  # pointwise ops commute with broadcasting: see operand_tensor
                    elif node.target.overloadpacket in RESHAPES:
                        self.has_reshapes = True
                    else:
                        raise NotLowerable(f"{node.target} of a computed value has no flat-index form")
                    if broadcasts and self.has_reshapes:
                        raise NotLowerable(f"{node.name}: a region both reshaping and expanding computed values")
                    computed[node] = computed[source]
                continue
            computed[node] = node

        graph, self.operands, env = Graph(), [], {}
        operand_of: dict[tuple[Node, Node], Node] = {}
        for node in region.graph.nodes:
            if computed.get(node) is not node:
                continue

            def arg(value: Any, consumer: Node = node) -> Any:
                if not isinstance(value, Node):
                    return value
                if value in computed:
                    return env[computed[value]]
                if not _is_tensor(value):
                    raise NotLowerable(f"{consumer.name} reads the non-tensor {value.name}")
                key = (value, consumer)
                if key not in operand_of:
                    operand_of[key] = graph.placeholder(f"operand{len(self.operands)}")
                    if "val" in value.meta:  # the source's dtype (its shape is the source's, not the operand's)
                        operand_of[key].meta["val"] = value.meta["val"]
                    self.operands.append(Operand(value, consumer))
                return operand_of[key]

            env[node] = graph.call_function(node.target, map_arg(node.args, arg), map_arg(node.kwargs, arg))
            env[node].name = node.name
            env[node].meta = dict(node.meta)

        results = region.graph.output_node().args[0]
        self.single = isinstance(results, Node)
        results = [results] if self.single else list(results)
        if not all(isinstance(r, Node) for r in results):
            raise NotLowerable("the region returns something other than tensors")
        distinct = list(dict.fromkeys(computed[r] for r in results if r in computed))
        if not distinct:
            raise NotLowerable("the region computes nothing it returns")
        self.outputs = [distinct.index(computed[r]) if r in computed else None for r in results]
        self.result_nodes = results
        graph.output(tuple(env[n] for n in distinct))
        first_op = next(n for n in graph.nodes if n.op != "placeholder")
        for placeholder in graph.find_nodes(op="placeholder"):  # created as first read: move to the top
            first_op.prepend(placeholder)
        self.kernel_graph = GraphModule(torch.nn.Module(), graph)
        self.original = {kernel_node: node for node, kernel_node in env.items()}
        self._computed = computed

    # ----------------------------------------------------------------------------- call time

    def bind(self, inputs: Sequence[Any]) -> dict[Node, Any]:
        """Every region value for these inputs: the inputs themselves and the views of them as real
        tensors (torch computes those without copying), every computed value as a fake tensor (its
        shape, strides, dtype and device, from ATen's own rules, touching no data). The fake values
        are cached per input signature, so a call with known shapes costs only the input views."""
        placeholders = self.region.graph.find_nodes(op="placeholder")
        if len(inputs) != len(placeholders):
            raise TypeError(f"the region takes {len(placeholders)} inputs, got {len(inputs)}")
        values: dict[Node, Any] = dict(zip(placeholders, inputs))
        for node in self.region.graph.nodes:
            if node.op == "call_function" and node not in self._computed:
                values[node] = node.target(*map_arg(node.args, values.__getitem__), **map_arg(node.kwargs, values.__getitem__))
        signature = tuple((t.shape, t.stride(), t.dtype, t.device) if isinstance(t, torch.Tensor) else t for t in inputs)
        if signature not in self._fakes:
            self._fakes[signature] = self._fake_values(inputs)
        values.update(self._fakes[signature])
        return values

    def _fake_values(self, inputs: Sequence[Any]) -> dict[Node, Any]:
        placeholders = self.region.graph.find_nodes(op="placeholder")
        with FakeTensorMode() as mode:
            fakes = {p: mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for p, t in zip(placeholders, inputs)}
            for node in self.region.graph.nodes:
                if node.op == "call_function":
                    fakes[node] = node.target(*map_arg(node.args, fakes.__getitem__), **map_arg(node.kwargs, fakes.__getitem__))
        return {node: fake for node, fake in fakes.items() if node in self._computed}

    def operand_tensor(self, values: dict[Node, Any], operand: Operand, shape: Sequence[int]) -> torch.Tensor:
        """The operand as the kernel reads it over the iteration space ``shape``: broadcast to its
        consumer's shape, then reshaped to ``shape`` (a view whenever strides allow, else a copy).

        A consumer with fewer elements than ``shape`` (``a * 2`` in ``(a * 2) + x`` for a row
        ``a`` of ``x``) is computed once per element of the broadcast of all computed values, as
        pointwise ops commute with broadcasting; that needs a region with no reshape of a computed
        value, whose broadcasts are then all right-aligned against one shape.
        """
        tensor = values[operand.source]
        consumer_shape = values[operand.consumer].shape
        target = consumer_shape
        if math.prod(consumer_shape) != math.prod(shape):
            if not self.has_reshapes:
                target = torch.broadcast_shapes(*(values[node].shape for node in self.original.values()))
            if math.prod(target) != math.prod(shape):
                raise NotLowerable(f"{operand.consumer.name} has {math.prod(consumer_shape)} elements, the iteration space {math.prod(shape)}")
        return tensor.expand(consumer_shape).expand(target).reshape(shape)

    def results(self, values: dict[Node, Any], kernel_outputs: Sequence[torch.Tensor]) -> Any:
        """The region's outputs from the kernel's (contiguous) ones, each reshaped to its own shape
        (or expanded to it, for an output that is an expand of a computed value); an input the
        region returns as it is comes back as it is."""
        outs = []
        for k, node in zip(self.outputs, self.result_nodes):
            if k is None:
                outs.append(values[node])
                continue
            shape, out = values[node].shape, kernel_outputs[k]
            try:
                outs.append(out.view(shape) if out.numel() == math.prod(shape) else out.expand(shape))
            except RuntimeError as exc:
                raise NotLowerable(f"the output {node.name} {tuple(shape)} is no view of the kernel's {tuple(out.shape)}") from exc
        return outs[0] if self.single else tuple(outs)


def _is_tensor(node: Node) -> bool:
    val = node.meta.get("val")
    return val is None or isinstance(val, torch.Tensor)
