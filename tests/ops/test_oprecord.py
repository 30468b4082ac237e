"""Op records: every graphopt op has one, and a new op declared in one folder (``toy_op/``) is picked up
by FLOP counting, residual streams, remove_padding, the partitioner, the Triton row template and the
eager backend without an edit anywhere else."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tests_helpers import Fn
from torch import nn
from torch.export import Dim

import graphopt
from graphopt import ir
from graphopt.backends.partition import fuse_regions, op_kind, partition
from graphopt.backends.triton_rowwise import row_region_source
from graphopt.frontends.capture import capture
from graphopt.ir.flops import count_flops, node_flops
from graphopt.ir.oprecord import OpRecord, op_record, op_records, register_op
from graphopt.ir.streams import find_residual_streams, is_norm
from graphopt.passes.remove_padding import RemovePadding
from graphopt.testing import assert_close


def _import_toy_op():
    """``tests/ops/toy_op`` imported as a package (once per process: it registers a torch.library op)."""
    if "toy_op" not in sys.modules:
        folder = Path(__file__).with_name("toy_op")
        spec = importlib.util.spec_from_file_location("toy_op", folder / "__init__.py", submodule_search_locations=[str(folder)])
        module = importlib.util.module_from_spec(spec)
        sys.modules["toy_op"] = module
        spec.loader.exec_module(module)
    return sys.modules["toy_op"]


toy_op = _import_toy_op()
TOY = torch.ops.graphopt_test.absmax_norm


def _graphopt_ops() -> list[str]:
    return sorted(name for name in torch._C._dispatch_get_all_op_names() if name.startswith("graphopt::"))


# --- the registry -------------------------------------------------------------------------------


def test_every_graphopt_op_has_a_record_with_reference_and_fake():
    names = _graphopt_ops()
    assert {"graphopt::rms_norm", "graphopt::crms_norm", "graphopt::pack_tokens", "graphopt::unpack_tokens", "graphopt::varlen_attention"} <= set(names)
    for name in names:
        packet = getattr(torch.ops.graphopt, name.split("::")[1])
        record = op_record(packet)
        assert record is not None, f"{name} has no op record"
        assert record.reference is not None and record.fake is not None, name
        assert op_record(packet.default) is record


def test_every_graphopt_op_matches_its_reference_and_fake():
    x, w, b = torch.randn(2, 5, 8), torch.rand(8) + 0.5, torch.randn(8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    packed = torch.randn(8, 2, 4)
    cu = torch.tensor([0, 3, 8])
    weight = torch.randn(6, 8)
    q8 = torch.round(weight / (weight.abs().amax(1, keepdim=True) / 127)).to(torch.int8)
    w8_scale = weight.abs().amax(1) / 127
    q4 = torch.randint(0, 256, (6, 16), dtype=torch.uint8)  # K = 32: one group of 32
    heads = torch.randn(1, 2, 5, 4)  # [B, H, L, D] for the attention ops
    calls = {
        "rms_norm": (x, w, b, 1e-6),
        "crms_norm": (x, 1e-6),
        "pack_tokens": (x, mask),
        "unpack_tokens": (x[mask.bool()], mask),
        "varlen_attention": (packed, packed.flip(0), packed * 2, cu),
        "sum_tokens": (x[mask.bool()], mask),
        "select_token": (x[mask.bool()], mask, 4),  # a pad in row 0, a token in row 1
        "int8_linear": (x, q8, w8_scale, b[:6], None, None, None, "relu"),
        "weight_only_linear": (torch.randn(2, 5, 32), q4, torch.rand(6, 1), torch.full((6, 1), 8.0), 32, None),
        "linear_attention": (heads.abs(), heads.flip(2).abs(), heads * 2),
        "hybrid_attention": (heads, heads.flip(2), heads * 2, heads.abs(), heads.flip(2).abs(), torch.zeros(2), 2),
        "varlen_linear_attention": (packed.abs(), packed.flip(0).abs(), packed * 2, cu),
        "varlen_hybrid_attention": (packed, packed.flip(0), packed * 2, packed.abs(), packed.flip(0).abs(), torch.zeros(2), 2, cu),
        "window_attention": (heads, heads.flip(2), heads * 2, 2, 1),
        "block_sparse_attention": (heads, heads.flip(2), heads * 2, torch.tensor([[True, False], [True, True]]), 4),
        "varlen_window_attention": (packed, packed.flip(0), packed * 2, cu, 2, 1),
        # token reduction on the packed rows of `mask` (lengths 3 and 5)
        "token_importance": (packed, packed.flip(0), mask, 0.5, 5),
        "prune_tokens": (packed, torch.arange(8.0), packed[:, 0], torch.ones(8), mask, 0.6),
        "merge_tokens": (packed[:, 0], packed[:, 1], torch.ones(8), mask, 1),
        "varlen_attention_sized": (packed, packed.flip(0), packed * 2, mask, torch.arange(1.0, 9.0)),
    }
    assert sorted(f"graphopt::{name}" for name in calls) == _graphopt_ops(), "a new op needs a case here"
    for name, args in calls.items():
        record = op_record(getattr(torch.ops.graphopt, name))
        out = getattr(torch.ops.graphopt, name)(*args)
        # the CPU int8 kernels quantize on a grid a half step off the reference's (see graphopt.ops.quant.cpu)
        assert_close(out, record.reference(*args), **({"max_rel_err": 0.05} if record.quantizes else {}))
        with torch._subclasses.FakeTensorMode(shape_env=torch.fx.experimental.symbolic_shapes.ShapeEnv()) as mode:
            fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
            fake = getattr(torch.ops.graphopt, name)(*fake_args)
        for fake_out, real_out in zip(*((fake, out) if isinstance(out, tuple) else ((fake,), (out,)))):
            assert fake_out.dtype == real_out.dtype and fake_out.dim() == real_out.dim(), name


def test_lookup_of_other_targets_is_none():
    assert op_record(torch.ops.aten.add.Tensor) is None
    assert op_record(torch.ops.aten.add) is None
    assert op_record(len) is None and op_record("graphopt::rms_norm") is None
    assert [r for r in op_records() if r.op is TOY] == [toy_op.RECORD]


def test_a_record_takes_an_overload_as_its_packet_and_is_registered_once():
    record = op_record(torch.ops.graphopt.rms_norm)
    assert OpRecord(op=torch.ops.graphopt.rms_norm.default).op is torch.ops.graphopt.rms_norm
    with pytest.raises(ValueError, match="already has an op record"):
        register_op(OpRecord(op=torch.ops.graphopt.rms_norm))
    with pytest.raises(TypeError):
        OpRecord(op=len)
    assert op_record(torch.ops.graphopt.rms_norm) is record


# --- a toy op in one folder, picked up everywhere ------------------------------------------------


def _toy(x, w):
    return TOY(x, w, 1e-3)


def test_toy_op_runs_its_reference_and_exports():
    x, w = torch.randn(2, 3, 8), torch.rand(8)
    assert_close(_toy(x, w), toy_op.absmax_norm_reference(x, w, 1e-3))
    gm = capture(Fn(lambda x, w: _toy(x + 1, w)), (x, w))
    assert len(ir.op_nodes(gm, TOY)) == 1


def test_flops_of_the_toy_op_come_from_its_record():
    gm = capture(Fn(lambda x, w: _toy(x, w)), (torch.randn(2, 3, 8), torch.rand(8)))
    (node,) = ir.op_nodes(gm, TOY)
    assert node_flops(node) == 3 * 2 * 3 * 8
    assert count_flops(gm) == 3 * 2 * 3 * 8


def test_the_partitioner_and_the_row_template_take_the_toy_op_as_a_norm():
    x, w, r = torch.randn(4, 16), torch.rand(16), torch.randn(4, 16)
    gm = capture(Fn(lambda x, r, w: F.gelu(_toy(x + r, w))), (x, r, w))
    (node,) = ir.op_nodes(gm, TOY)
    assert op_kind(node) == "norm"
    (region,) = partition(gm)
    assert region.kind == "norm" and node in region.nodes and len(region.nodes) == 3  # add -> toy -> gelu
    fused = fuse_regions(gm)
    (call,) = [n for n in fused.graph.nodes if n.op == "call_module"]
    source = row_region_source(getattr(fused, call.target))
    assert "_absmax = tl.max(tl.where(mask, tl.abs(" in source


class _PostNorm(nn.Module):
    """Post-norm residual blocks with the toy norm: ``h = toy(h + fc(h))``."""

    def __init__(self, d=16):
        super().__init__()
        self.emb = nn.Embedding(50, d)
        self.fc = nn.ModuleList(nn.Linear(d, d) for _ in range(2))
        self.gain = nn.Parameter(torch.rand(d) + 0.5)

    def forward(self, ids):
        h = self.emb(ids)
        for fc in self.fc:
            h = _toy(h + fc(h), self.gain)
        return h


def test_residual_streams_pass_through_the_toy_norm():
    gm = capture(_PostNorm().eval(), (torch.randint(0, 50, (2, 5)),))
    (stream,) = find_residual_streams(gm)
    assert len(stream.adds) == 2
    assert stream.norms and all(ir.is_op(n, TOY) for n in stream.norms)
    assert all(is_norm(n) for n in ir.op_nodes(gm, TOY))


class _Encoder(nn.Module):
    """One two-head SDPA layer, then the toy norm over the hidden dim."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(100, 16)
        self.qkv = nn.ModuleList(nn.Linear(16, 16) for _ in range(3))
        self.gain = nn.Parameter(torch.rand(16) + 0.5)

    def forward(self, ids, mask):
        x = self.embed(ids)
        b, s, _ = x.shape
        q, k, v = (linear(x).view(b, s, 2, 8).transpose(1, 2) for linear in self.qkv)
        x = x + F.scaled_dot_product_attention(q, k, v, attn_mask=mask.bool()[:, None, None, :]).transpose(1, 2).reshape(b, s, 16)
        return _toy(x, self.gain)


def _batch(lengths, seq, seed):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (len(lengths), seq), generator=generator)
    mask = (torch.arange(seq)[None, :] < torch.tensor(lengths)[:, None]).long()
    return ids * mask, mask


def test_remove_padding_runs_the_token_wise_toy_op_on_packed_tokens():
    model, (ids, mask) = _Encoder().eval(), _batch([6, 3, 4], 6, seed=1)
    dims = ({0: Dim.AUTO, 1: Dim.AUTO},) * 2
    optimized = graphopt.optimize(model, [RemovePadding()], (ids, mask), dynamic_shapes=dims, strict=True)
    gm = optimized.graph_module
    (toy,) = ir.op_nodes(gm, TOY)
    (unpack,) = ir.op_nodes(gm, torch.ops.graphopt.unpack_tokens)
    assert unpack.args[0] is toy, "the toy norm runs on the packed tokens, before the unpack"
    other_ids, other_mask = _batch([2, 7, 1, 5], 7, seed=2)
    with torch.no_grad():
        out, ref = optimized(other_ids, other_mask), model(other_ids, other_mask)
    valid = other_mask.bool()
    assert_close(out[valid], ref[valid])


def test_the_eager_backend_calls_the_toy_op_fast_path():
    x, w = torch.randn(2, 3, 8), torch.rand(8)
    optimized = graphopt.optimize(Fn(lambda x, w: _toy(x * 2, w)), [], (x, w))
    toy_op.EAGER_CALLS.clear()
    with torch.no_grad():
        assert_close(optimized(x, w), toy_op.absmax_norm_reference(x * 2, w, 1e-3))
    assert toy_op.EAGER_CALLS == [(2, 3, 8)]
    assert ir.op_nodes(optimized.graph_module, TOY), "the canonical graph keeps the op"
