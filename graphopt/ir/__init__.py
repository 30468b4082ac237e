"""Small, composable helpers over the canonical IR (an ATen-level ``torch.fx.GraphModule``).

Passes are written against these helpers rather than against raw ``torch.fx`` so that matching,
weight editing and clean-up behave the same everywhere. Two rules the helpers keep:

* Tensors held by a graph are never modified in place. :func:`set_tensor` and :func:`add_constant`
  attach *new* tensors; the pass manager's rollback and the user's original model both depend on
  the old tensors staying as they were.
* ``node.meta["val"]`` (a fake tensor) describes every node. Nodes a pass creates get theirs when
  the pass manager calls :func:`propagate_shapes` after the pass; a pass that needs shapes of its
  own new nodes mid-rewrite may call it itself.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import logging
import operator
import warnings
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.fx
from torch.fx import GraphModule, Node

aten = torch.ops.aten

__all__ = [
    "NotApplicable",
    "aten",
    "add_constant",
    "clone_graph_module",
    "cleanup",
    "count_ops",
    "describe",
    "describe_value",
    "external_user",
    "follow_chain",
    "get_tensor",
    "in_place_writes",
    "is_op",
    "normalized_args",
    "op_name",
    "op_nodes",
    "only_user",
    "propagate_shapes",
    "quiet_meta_errors",
    "replace_node",
    "set_tensor",
    "shape_of",
    "val_of",
]

Target = Any  # an OpOverload, an OpOverloadPacket, or any other call_function target


class NotApplicable(Exception):
    """A rewrite cannot be made here; ``reason`` says why, in one clause that names the node.

    The one "why not" of graphopt: IR helpers raise it (a weight that is not a constant, a writer
    whose hidden dim cannot be followed), a pass's ``analyze`` raises it when it has nothing to do,
    and the pass manager records ``reason`` as the pass's reason. It lives in the lowest layer so
    that every helper can raise it; :mod:`graphopt.pipeline.pass_base` exports it with the Pass API.

    Args:
        reason: why not, as shown in reports (``str(e)`` is the same text).
        node: the node that stops the rewrite, when one does (for tools that point at it).
    """

    def __init__(self, reason: str, node: Node | None = None):
        super().__init__(reason)
        self.reason = reason
        self.node = node


def describe(node: Node) -> str:
    """``name (op)`` for messages: ``add_5 (aten.add.Tensor)``, ``x (a graph input)``, ``output (the graph output)``."""
    if node.op == "call_function":
        return f"{node.name} ({op_name(node.target)})"
    kind = {"placeholder": "a graph input", "output": "the graph output", "get_attr": "a constant"}.get(node.op, node.op)
    return f"{node.name} ({kind})"


def describe_value(val: Any) -> str:
    """A node's ``meta["val"]`` (or a tensor) as text: ``f32[s77, 16, 32, 32]``, ``(f32[2], i64[2])``, ``Sym(s77)``."""
    from torch.fx.graph import dtype_abbrs

    if isinstance(val, torch.Tensor):
        return f"{dtype_abbrs.get(val.dtype, str(val.dtype))}[{', '.join(str(s) for s in val.shape)}]"
    if isinstance(val, (tuple, list)):
        return "(" + ", ".join(describe_value(v) for v in val) + ")"
    if isinstance(val, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return f"Sym({val})"
    return "" if val is None else type(val).__name__


# ----------------------------------------------------------------------------- identifying ops


def op_name(target: Target) -> str:
    """A readable name for a call target: ``aten.linear.default``, ``graphopt.rms_norm.default``."""
    if isinstance(target, torch._ops.OpOverload):
        return f"{target.namespace}.{target._schema.name.split('::')[-1]}.{target._overloadname}"
    if isinstance(target, torch._ops.OpOverloadPacket):
        return f"{target._qualified_op_name.replace('::', '.')}"
    return getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or str(target)


def is_op(node: Node, *targets: Target) -> bool:
    """Whether ``node`` calls one of ``targets``.

    A target may be an overload (``aten.add.Tensor``) or a packet (``aten.add``, matching every
    overload of it).
    """
    if node.op != "call_function":
        return False
    packet = getattr(node.target, "overloadpacket", None)
    return any(node.target is t or (packet is not None and packet is t) for t in targets)


def op_nodes(gm: GraphModule, *targets: Target) -> list[Node]:
    """All nodes of ``gm`` calling one of ``targets`` (see :func:`is_op`), in graph order."""
    return [n for n in gm.graph.nodes if is_op(n, *targets)]


def count_ops(gm: GraphModule) -> collections.Counter:
    """How often each call target occurs, keyed by :func:`op_name` (``call_function`` nodes only)."""
    return collections.Counter(op_name(n.target) for n in gm.graph.nodes if n.op == "call_function")


def normalized_args(node: Node) -> dict[str, Any]:
    """The call's arguments by schema name, defaults filled in: ``{"input": x, "dim": -1, ...}``.

    Works for ATen and ``torch.library`` ops, whatever mix of positional and keyword arguments the
    graph used.
    """
    schema = node.target._schema
    out: dict[str, Any] = {}
    for i, arg in enumerate(schema.arguments):
        if i < len(node.args) and not arg.kwarg_only:
            out[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            out[arg.name] = node.kwargs[arg.name]
        elif arg.has_default_value():
            out[arg.name] = arg.default_value
        else:
            out[arg.name] = None
    return out


def _viewed(value: Any) -> Any:
    """The graph value whose storage ``value`` shares (a view, an in-place or ``out=`` result, an
    element of ``split``/``unbind``), or None when ``value`` is a tensor of its own.

    The schema's alias sets say which argument a result aliases: ``add.out``'s result is its
    ``out=`` argument, not its first.
    """
    if not isinstance(value, Node) or value.op != "call_function":
        return None
    if value.target is operator.getitem:  # one result of a multi-result op, or an element of a list result
        source, index = value.args
        returns = getattr(getattr(source, "target", None), "_schema", None) and source.target._schema.returns
        if not returns or not isinstance(index, int) or (len(returns) > 1 and index >= len(returns)):
            return None
        return _aliased_argument(source, returns[0] if len(returns) == 1 else returns[index])
    if not isinstance(value.target, torch._ops.OpOverload) or len(value.target._schema.returns) != 1:
        return None
    return _aliased_argument(value, value.target._schema.returns[0])


def _aliased_argument(node: Node, returned: Any) -> Any:
    """The argument of ``node`` that the schema return ``returned`` aliases, or None."""
    if returned.alias_info is None:
        return None
    sets = returned.alias_info.before_set  # empty for a list of views (``Tensor(a)[]``): the set is on its elements
    for arg in node.target._schema.arguments:
        if arg.alias_info is not None and (not sets or sets & arg.alias_info.before_set):
            return normalized_args(node).get(arg.name)
    return None


def _alias_root(value: Any) -> Any:
    """Follow views, in-place results and list elements back to the tensor that owns the storage."""
    while (base := _viewed(value)) is not None:
        value = base
    return value


# Ops that write arguments their schema does not mark as written: in training mode batch norm
# updates its running statistics inside the op, and so does instance norm given running statistics
# to use its input's (``track_running_stats`` in training mode). Op packet -> (flag, written arguments).
_UNDECLARED_WRITES = {
    aten.batch_norm: ("training", ("running_mean", "running_var")),
    aten.native_batch_norm: ("training", ("running_mean", "running_var")),
    aten._batch_norm_impl_index: ("training", ("running_mean", "running_var")),
    aten.cudnn_batch_norm: ("training", ("running_mean", "running_var")),
    aten.miopen_batch_norm: ("training", ("running_mean", "running_var")),
    aten.instance_norm: ("use_input_stats", ("running_mean", "running_var")),
}


def in_place_writes(gm: GraphModule) -> dict[str, list[str]]:
    """The constants (``get_attr`` targets) and graph inputs (placeholder names) that some op of
    ``gm`` writes in place: ``{"buffers": [...], "inputs": [...]}``, each sorted.

    A write counts when an argument the op's schema marks as written (``Tensor(a!)``, also inside
    a list such as ``_foreach_add_``'s) is, or is a view of, the constant or input: views are
    followed through every aliasing result, ``split``/``unbind`` elements included. Batch norm in
    training mode (and instance norm with running statistics and ``use_input_stats``) writes its
    running statistics without declaring it; those count too.

    Running such a graph twice is not running it once: verification, benchmarks and the
    ``torch.compile`` backend (which then leaves the graph to dynamo) must know.
    """
    written: dict[str, set[str]] = {"buffers": set(), "inputs": set()}
    for node in gm.graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        args = normalized_args(node)
        targets = [args.get(a.name) for a in node.target._schema.arguments if a.alias_info is not None and a.alias_info.is_write]
        flag, hidden = _UNDECLARED_WRITES.get(node.target.overloadpacket, (None, ()))
        if flag is not None and args.get(flag) is True:
            targets += [args.get(name) for name in hidden]
        for target in targets:
            for value in target if isinstance(target, (list, tuple)) else (target,):
                root = _alias_root(value)
                if isinstance(root, Node) and root.op == "get_attr":
                    written["buffers"].add(root.target)
                elif isinstance(root, Node) and root.op == "placeholder":
                    written["inputs"].add(root.target)
    return {k: sorted(v) for k, v in written.items()}


# ----------------------------------------------------------------------------- walking the graph


def only_user(node: Node) -> Node | None:
    """The single user of ``node``, or None when it has none or several."""
    return next(iter(node.users)) if len(node.users) == 1 else None


def follow_chain(start: Node, *steps: Target | Sequence[Target]) -> list[Node] | None:
    """Follow single-user edges from ``start`` through ops matching ``steps`` in order.

    Each step is a target or a sequence of alternative targets. Returns ``[start, n1, n2, ...]``
    when every intermediate node has exactly one user and each next node matches its step, else
    None. Only the last node of the chain may have several users.
    """
    chain = [start]
    for step in steps:
        alternatives = tuple(step) if isinstance(step, (list, tuple)) else (step,)
        nxt = only_user(chain[-1])
        if nxt is None or not is_op(nxt, *alternatives):
            return None
        chain.append(nxt)
    return chain


def external_user(nodes: Iterable[Node], keep: Iterable[Node] = ()) -> Node | None:
    """A node of ``nodes`` (other than those in ``keep``) used outside ``nodes``, or None.

    A matcher that wants to replace a subgraph by one new node must check this: replacing a
    subgraph whose intermediate value is also read elsewhere silently changes that reader.
    """
    ordered = list(nodes)
    inside, allowed = set(ordered), set(keep)
    for n in ordered:  # in the caller's order, so the node named in a reason is deterministic
        if n not in allowed and any(u not in inside for u in n.users):
            return n
    return None


def val_of(node: Any):
    """``node.meta["val"]`` (a fake tensor, SymInt, or tuple of them), or None."""
    return node.meta.get("val") if isinstance(node, Node) else None


def shape_of(node: Node) -> tuple | None:
    """The shape of a tensor-valued node from its ``meta["val"]``, or None when unknown."""
    val = val_of(node)
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


# ----------------------------------------------------------------------------- constants


def get_tensor(gm: GraphModule, node_or_target: Node | str) -> torch.Tensor:
    """The tensor behind a ``get_attr`` node (or attribute path) of ``gm``."""
    target = node_or_target.target if isinstance(node_or_target, Node) else node_or_target
    if isinstance(node_or_target, Node) and node_or_target.op != "get_attr":
        raise ValueError(f"{node_or_target.name} is a {node_or_target.op} node, not a get_attr constant")
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _set_attr(gm: GraphModule, target: str, value: torch.Tensor) -> None:
    *path, leaf = target.split(".")
    owner: torch.nn.Module = gm
    for part in path:
        if not hasattr(owner, part):
            owner.add_module(part, torch.nn.Module())
        owner = getattr(owner, part)
    if leaf in owner._parameters:
        del owner._parameters[leaf]
    if leaf in owner._buffers:
        del owner._buffers[leaf]
    owner.register_buffer(leaf, value.detach(), persistent=True)


def set_tensor(gm: GraphModule, node: Node, value: torch.Tensor) -> Node:
    """Make the ``get_attr`` ``node`` hold ``value``, without touching the tensor it held.

    If other ``get_attr`` nodes read the same attribute (tied weights), ``node`` is re-pointed to a
    new attribute so that only its readers see the new value. Returns ``node``.
    """
    if node.op != "get_attr":
        raise ValueError(f"{node.name} is not a get_attr node")
    shared = [n for n in node.graph.nodes if n.op == "get_attr" and n.target == node.target and n is not node]
    if shared:
        node.target = _unique_attr_name(gm, node.target.replace(".", "_"))
    _set_attr(gm, node.target, value)
    val = val_of(node)
    if isinstance(val, torch.Tensor) and hasattr(val, "fake_mode"):
        node.meta["val"] = val.fake_mode.from_tensor(value, static_shapes=True)
    return node


def _unique_attr_name(gm: GraphModule, hint: str) -> str:
    base = "".join(c if c.isalnum() or c == "_" else "_" for c in hint) or "const"
    name, i = base, 0
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    return name


def add_constant(gm: GraphModule, value: torch.Tensor, name_hint: str, *, before: Node | None = None) -> Node:
    """Register ``value`` as a new buffer of ``gm`` and return a ``get_attr`` node reading it.

    The node is inserted before ``before`` (default: before the first node of the graph).
    """
    name = _unique_attr_name(gm, name_hint)
    _set_attr(gm, name, value)
    anchor = before if before is not None else next(iter(gm.graph.nodes))
    with gm.graph.inserting_before(anchor):
        node = gm.graph.get_attr(name)
    for n in gm.graph.nodes:  # reuse the graph's fake mode so symbolic sizes stay consistent
        val = val_of(n)
        if isinstance(val, torch.Tensor) and hasattr(val, "fake_mode"):
            node.meta["val"] = val.fake_mode.from_tensor(value, static_shapes=True)
            break
    return node


# ----------------------------------------------------------------------------- rewriting


def replace_node(old: Node, new: Node, *, erase: bool = True) -> None:
    """Send every use of ``old`` except ``new``'s own to ``new``; then erase ``old`` if asked and
    nothing reads it any more (``new = f(old)`` wraps ``old``, which must stay).

    ``new`` inherits ``old``'s ``stack_trace`` and ``nn_module_stack`` so that generated code, dumps
    and passes that select layers by module path still point at the user's source.
    """
    for key in ("stack_trace", "nn_module_stack"):  # where in the user's model the node came from
        if key in old.meta and key not in new.meta:
            new.meta[key] = old.meta[key]
    old.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
    if erase and not old.users:
        old.graph.erase_node(old)


def delete_unused_attributes(gm: GraphModule) -> int:
    """Drop parameters and buffers that no ``get_attr`` node reads and no ``call_module`` node's
    module owns; returns how many."""
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    called = tuple(f"{n.target}." for n in gm.graph.nodes if n.op == "call_module")  # a called module keeps its state
    dropped = 0
    for name, _ in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False)):
        if name not in used and not name.startswith(called):
            *path, leaf = name.split(".")
            owner = gm.get_submodule(".".join(path)) if path else gm
            owner._parameters.pop(leaf, None)
            owner._buffers.pop(leaf, None)
            dropped += 1
    return dropped


def cleanup(gm: GraphModule) -> None:
    """Dead-code elimination, unused-constant removal, lint and recompile, in that order."""
    gm.graph.eliminate_dead_code()
    delete_unused_attributes(gm)
    gm.graph.lint()
    gm.recompile()


def clone_graph_module(gm: GraphModule) -> GraphModule:
    """A new ``GraphModule`` with a copy of ``gm``'s graph that *shares* its tensors.

    Cheap (no weight is copied) and safe because graph tensors are never modified in place: a
    rewrite on the clone leaves ``gm`` exactly as it was, which is how rollback works.
    """
    with warnings.catch_warnings():  # deep-copying export's pytree specs warns about a deprecated check
        warnings.simplefilter("ignore", FutureWarning)
        graph = copy.deepcopy(gm.graph)
    clone = GraphModule(gm, graph, class_name=type(gm).__name__.replace("GraphModuleImpl", "GraphModule"))
    clone.meta = dict(getattr(gm, "meta", {}))
    return clone


def propagate_shapes(gm: GraphModule, example_inputs: Sequence[Any] | None = None) -> None:
    """Recompute ``meta["val"]`` for every node by running ``gm`` on fake tensors.

    Placeholders keep their existing fake values (and so their symbolic sizes) when they have them;
    otherwise ``example_inputs`` (the flat list of the graph's inputs, or the model's positional
    inputs) are converted to fakes with static shapes.
    """
    from torch._guards import detect_fake_mode
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    vals = [val_of(n) for n in placeholders]
    fake_mode = detect_fake_mode([v for v in vals if v is not None])
    if fake_mode is None or any(v is None for v in vals):
        if example_inputs is None:
            raise ValueError("propagate_shapes needs example inputs for a graph whose placeholders have no meta['val']")
        flat, _ = torch.utils._pytree.tree_flatten(list(example_inputs))
        if len(flat) != len(placeholders):
            raise ValueError(f"graph has {len(placeholders)} inputs, got {len(flat)} example values")
        fake_mode = FakeTensorMode(allow_non_fake_inputs=True, shape_env=ShapeEnv())
        vals = [fake_mode.from_tensor(x, static_shapes=True) if isinstance(x, torch.Tensor) else x for x in flat]
    saved = fake_mode.allow_non_fake_inputs
    fake_mode.allow_non_fake_inputs = True  # get_attr constants are real tensors
    try:
        with quiet_meta_errors():
            FakeTensorProp(gm, mode=fake_mode).propagate_dont_convert_inputs(*vals)
    finally:
        fake_mode.allow_non_fake_inputs = saved


class _DropMetaFailures(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("failed while attempting to run meta for")


@contextlib.contextmanager
def quiet_meta_errors():
    """For the duration, drop the traceback torch's fake tensors log (about 40 lines, at ERROR)
    when an op's shape check fails ("failed while attempting to run meta for aten.mm"). The same
    error is raised right after, so the log only buries the one clean message the user should see."""
    logger = logging.getLogger("torch._subclasses.fake_tensor")
    drop = _DropMetaFailures()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def fresh_nodes(before: Iterable[str], gm: GraphModule) -> list[Node]:
    """Nodes of ``gm`` whose names are not in ``before`` (a pass's created nodes, by name)."""
    seen = set(before)
    return [n for n in gm.graph.nodes if n.name not in seen]


def map_outputs(fn: Callable[[torch.Tensor], Any], outputs: Any) -> Any:
    """Apply ``fn`` to every tensor leaf of a pytree of outputs."""
    return torch.utils._pytree.tree_map(lambda x: fn(x) if isinstance(x, torch.Tensor) else x, outputs)
