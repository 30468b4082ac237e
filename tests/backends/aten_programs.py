"""Regions for kernel tests, written as small *programs* of ATen ops, and their fp64 reference.

A program is ``{"inputs": n, "steps": [(op, args, kwargs), ...], "outputs": [...]}``: ``op`` is
``"<packet>.<overload>"`` of ``torch.ops.aten``, ``"%k"`` names value ``k`` (the inputs first,
then one value per step) and ``"torch.<dtype>"`` a dtype. Programs are plain data, so a test can
send them to the interpreted subprocess that runs the kernels and rebuild the graph there.
"""

import torch
from torch.fx import Graph, GraphModule

from graphopt.ir import aten


def build(program: dict) -> GraphModule:
    """The region a program describes."""
    graph = Graph()
    values = [graph.placeholder(f"x{k}") for k in range(program["inputs"])]

    def resolve(arg):
        if isinstance(arg, str) and arg.startswith("%"):
            return values[int(arg[1:])]
        if isinstance(arg, str) and arg.startswith("torch."):
            return getattr(torch, arg[len("torch.") :])
        return arg

    for op, args, kwargs in program["steps"]:
        packet, overload = op.split(".")
        target = getattr(getattr(aten, packet), overload)
        values.append(graph.call_function(target, tuple(map(resolve, args)), {k: resolve(v) for k, v in kwargs.items()}))
    outputs = [values[k] for k in program["outputs"]]
    graph.output(outputs[0] if len(outputs) == 1 else tuple(outputs))
    return GraphModule(torch.nn.Module(), graph)


def reference(region: GraphModule, inputs: list) -> list:
    """ATen's result computed in fp64 and rounded to each output's dtype (kernels compute in fp32)."""
    expected = region(*inputs)
    wide = region(*[x.double() if x.is_floating_point() else x for x in inputs])
    expected, wide = ([expected], [wide]) if isinstance(expected, torch.Tensor) else (expected, wide)
    return [w.to(e.dtype) for e, w in zip(expected, wide)]
