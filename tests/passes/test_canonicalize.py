"""canonicalize: explicit attention -> SDPA, explicit LayerNorm / RMSNorm -> ATen norm ops."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphopt
from graphopt.tools import zoo
from graphopt.ir import count_ops
from graphopt.pipeline.manager import run_graph
from graphopt.pipeline.report import APPLIED, NOT_APPLICABLE, UNCHANGED
from graphopt.testing import assert_applies, assert_close, run_pass
from tests_helpers import Fn

SDPA = "aten.scaled_dot_product_attention.default"
SOFTMAXES = ("aten.softmax.int", "aten._softmax.default")
B, H, L, D = 2, 3, 5, 8


def _qkv(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, L, D, generator=gen) for _ in range(3))


def _blocked(seed: int) -> torch.Tensor:
    """A [B, 1, 1, L] boolean mask, True = blocked key; every row keeps at least its first key."""
    gen = torch.Generator().manual_seed(seed)
    blocked = torch.rand(B, 1, 1, L, generator=gen) > 0.5
    blocked[..., 0] = False
    return blocked


def _additive(seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(B, 1, L, L, generator=gen) + torch.where(_blocked(seed), -1e9, 0.0)


def _assert_attention(model, inputs, other_inputs, n=1, **kwargs):
    opt = assert_applies("canonicalize", model, inputs, gone=SOFTMAXES, present=[SDPA], other_inputs=[other_inputs], strict=True, **kwargs)
    assert count_ops(opt.graph_module)[SDPA] == n
    assert opt.report.record("canonicalize").stats["attention"] == n
    return opt


def _rejected(model, inputs, reason):
    """Assert the pass leaves the captured graph exactly as it was and reports ``reason``."""
    before = count_ops(graphopt.capture(model, inputs))
    opt, record = run_pass("canonicalize", model, inputs, strict=True)
    assert record.status == UNCHANGED, record
    assert reason in record.reason, record.reason
    assert count_ops(opt.graph_module) == before
    assert SDPA not in before
    return record


# ----------------------------------------------------------------------------- attention forms

SCALE = 1 / math.sqrt(D)


def _attend(scores, v):
    return scores.softmax(dim=-1) @ v


FORMS_NO_MASK = {
    "matmul_div_scores": lambda q, k, v: _attend(q @ k.transpose(-2, -1) / math.sqrt(D), v),
    "mul_scores": lambda q, k, v: _attend(torch.matmul(q, k.transpose(-2, -1)) * SCALE, v),
    "scale_left_of_scores": lambda q, k, v: _attend(SCALE * (q @ k.transpose(-2, -1)), v),
    "scale_on_query": lambda q, k, v: _attend((q * SCALE) @ k.transpose(-2, -1), v),
    "query_divided": lambda q, k, v: _attend((q / math.sqrt(D)) @ k.transpose(-2, -1), v),
    "query_and_key": lambda q, k, v: _attend((q * D**-0.25) @ (k * D**-0.25).transpose(-2, -1), v),
    "key_scaled_after_transpose": lambda q, k, v: _attend((q * D**-0.25) @ (k.transpose(-2, -1) * D**-0.25), v),
    "two_scales_on_scores": lambda q, k, v: _attend(q @ k.transpose(-2, -1) / math.sqrt(D) * 0.5, v),
    "no_scale": lambda q, k, v: _attend(q @ k.transpose(-2, -1), v),
    "transpose_2_3": lambda q, k, v: _attend(q @ k.transpose(2, 3) * SCALE, v),
    "permute_last_two": lambda q, k, v: _attend(q @ k.permute(0, 1, 3, 2) * SCALE, v),
    "tensor_constant_scale": lambda q, k, v: _attend(q @ k.transpose(-2, -1) / torch.tensor(math.sqrt(D)), v),
    "functional_softmax_eval_dropout": lambda q, k, v: F.dropout(F.softmax(q @ k.transpose(-2, -1) * SCALE, dim=-1), p=0.1, training=False) @ v,
    "noop_casts": lambda q, k, v: torch.softmax((q @ k.transpose(-2, -1) * SCALE).float(), -1, dtype=torch.float32).to(v.dtype) @ v,
    "einsum": lambda q, k, v: torch.einsum("bhqk,bhkd->bhqd", torch.einsum("bhqd,bhkd->bhqk", q, k).mul(SCALE).softmax(-1), v),
    "einsum_key_first": lambda q, k, v: torch.einsum("bhqk,bhkd->bhqd", (torch.einsum("bhkd,bhqd->bhqk", k, q) * SCALE).softmax(-1), v),
    "einsum_ellipsis": lambda q, k, v: torch.einsum("...qk,...kd->...qd", (torch.einsum("...qd,...kd->...qk", q, k) * SCALE).softmax(-1), v),
}


@pytest.mark.parametrize("form", sorted(FORMS_NO_MASK))
def test_unmasked_forms_become_sdpa(form):
    _assert_attention(Fn(FORMS_NO_MASK[form]), _qkv(0), _qkv(1))


def test_the_scale_reaches_sdpa_as_a_float():
    opt = _assert_attention(Fn(FORMS_NO_MASK["query_and_key"]), _qkv(0), _qkv(1))
    (sdpa,) = [n for n in opt.graph_module.graph.nodes if n.target is torch.ops.aten.scaled_dot_product_attention.default]
    assert sdpa.kwargs["scale"] == pytest.approx(SCALE, rel=1e-12)
    assert not any(n.target is torch.ops.aten.mul.Tensor for n in opt.graph_module.graph.nodes)


FORMS_MASKED = {
    "additive": (lambda q, k, v, m: _attend(q @ k.transpose(-2, -1) / math.sqrt(D) + m, v), _additive),
    "additive_mask_first": (lambda q, k, v, m: _attend(m + q @ k.transpose(-2, -1) * SCALE, v), _additive),
    "additive_key_positions_only": (
        lambda q, k, v, m: _attend(q @ k.transpose(-2, -1) * SCALE + m[:, :, :1], v),
        _additive,
    ),
    "masked_fill_blocked": (
        lambda q, k, v, m: _attend((q @ k.transpose(-2, -1) * SCALE).masked_fill(m, float("-inf")), v),
        _blocked,
    ),
    "where_keep": (
        lambda q, k, v, m: _attend(torch.where(~m, q @ k.transpose(-2, -1) * SCALE, float("-inf")), v),
        _blocked,
    ),
    "where_blocked_first": (
        lambda q, k, v, m: _attend(torch.where(m, float("-inf"), q @ k.transpose(-2, -1) * SCALE), v),
        _blocked,
    ),
    "einsum_masked_fill": (
        lambda q, k, v, m: torch.einsum("bhqk,bhkd->bhqd", (torch.einsum("bhqd,bhkd->bhqk", q, k) * SCALE).masked_fill(m, float("-inf")).softmax(-1), v),
        _blocked,
    ),
}


@pytest.mark.parametrize("form", sorted(FORMS_MASKED))
def test_masked_forms_become_sdpa(form):
    fn, make_mask = FORMS_MASKED[form]
    _assert_attention(Fn(fn), (*_qkv(0), make_mask(0)), (*_qkv(1), make_mask(1)))


def _sdpa_mask(opt):
    (sdpa,) = [n for n in opt.graph_module.graph.nodes if n.target is torch.ops.aten.scaled_dot_product_attention.default]
    return sdpa.args[3]


def test_mask_polarity_reaches_sdpa_as_attend_true():
    fn, _ = FORMS_MASKED["masked_fill_blocked"]  # True = blocked: SDPA gets the negation
    mask = _sdpa_mask(_assert_attention(Fn(fn), (*_qkv(0), _blocked(0)), (*_qkv(1), _blocked(1))))
    assert mask.target is torch.ops.aten.logical_not.default and mask.args[0].op == "placeholder"
    fn, _ = FORMS_MASKED["where_keep"]  # True = attend: SDPA gets the model's own ~m as it is
    mask = _sdpa_mask(_assert_attention(Fn(fn), (*_qkv(0), _blocked(0)), (*_qkv(1), _blocked(1))))
    assert mask.target is torch.ops.aten.bitwise_not.default and mask.args[0].op == "placeholder"


KEY_D_BY_L_FORMS = {
    "matmul": lambda q, kt, v: _attend(q @ kt * SCALE, v),
    "einsum": lambda q, kt, v: torch.einsum("bhqk,bhkd->bhqd", (torch.einsum("bhqd,bhdk->bhqk", q, kt) * SCALE).softmax(-1), v),
}


@pytest.mark.parametrize("form", sorted(KEY_D_BY_L_FORMS))
def test_key_already_laid_out_d_by_l(form):
    def inputs(seed):
        q, k, v = _qkv(seed)
        return q, k.transpose(-2, -1).contiguous(), v

    opt = _assert_attention(Fn(KEY_D_BY_L_FORMS[form]), inputs(0), inputs(1))
    assert count_ops(opt.graph_module)["aten.transpose.int"] == 1  # the key SDPA needs, [..., L, d]


class HeadsAttention(nn.Module):
    """Projections, heads split by view/transpose, an nn.Dropout (eval) and an additive mask."""

    def __init__(self, width=24, heads=3):
        super().__init__()
        self.heads, self.head_dim = heads, width // heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.dropout = nn.Dropout(0.1)

    def forward(self, x, mask):
        b, t, w = x.shape
        q, k, v = (y.view(b, t, self.heads, self.head_dim).transpose(1, 2) for y in self.qkv(x).chunk(3, dim=-1))
        probs = self.dropout((q @ k.transpose(-1, -2) / math.sqrt(self.head_dim) + mask).softmax(-1))
        return self.out((probs @ v).transpose(1, 2).reshape(b, t, w))


def test_projected_heads_with_dropout_module():
    torch.manual_seed(0)
    model = HeadsAttention().eval()
    x0, x1 = torch.randn(2, 6, 24), torch.randn(2, 6, 24)
    mask0, mask1 = torch.randn(2, 1, 1, 6), torch.randn(2, 1, 1, 6)
    _assert_attention(model, (x0, mask0), (x1, mask1))


def _bmm_with_4d_mask(q, k, v, m):
    """HF-eager style 3-D attention: [B*H, L, d] bmm, the mask added on a [B, H, L, L] view."""
    b, h, t, d = q.shape
    q3, k3, v3 = (y.reshape(b * h, t, d) for y in (q, k, v))
    scores = torch.bmm(q3 / math.sqrt(d), k3.transpose(1, 2))
    scores = (scores.view(b, h, t, t) + m).view(b * h, t, t)
    probs = F.dropout(F.softmax(scores, dim=-1), p=0.1, training=False)
    return torch.bmm(probs, v3).view(b, h, t, d)


def _bmm_3d(q, k, v, m):
    """Attention on [B*H, L, d] tensors throughout, with a 3-D additive mask."""
    return torch.bmm(F.softmax(torch.bmm(q, k.transpose(1, 2)) * SCALE + m, dim=-1), v)


def test_bmm_with_the_views_around_a_4d_mask():
    opt = _assert_attention(Fn(_bmm_with_4d_mask), (*_qkv(0), _additive(0)), (*_qkv(1), _additive(1)))
    assert count_ops(opt.graph_module)["aten.bmm.default"] == 0


def test_bmm_3d():
    def inputs(seed):
        return (*(t.reshape(B * H, L, D) for t in _qkv(seed)), _additive(seed).expand(B, H, L, L).reshape(B * H, L, L))

    _assert_attention(Fn(_bmm_3d), inputs(0), inputs(1))


def test_two_attentions_in_a_row():
    def fn(q, k, v):
        first = _attend(q @ k.transpose(-2, -1) * SCALE, v)
        return _attend(first @ k.transpose(-2, -1) * SCALE, v)

    _assert_attention(Fn(fn), _qkv(0), _qkv(1), n=2)


class MaskedAttention(nn.Module):
    def forward(self, q, k, v, m):
        return _attend(q @ k.transpose(-2, -1) * SCALE + m, v)


def test_dynamic_shapes_are_kept():
    model = MaskedAttention()
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    dims = ({0: batch, 2: seq}, {0: batch, 2: seq}, {0: batch, 2: seq}, {0: batch, 3: seq})
    key_mask = _additive(0)[:, :, :1].contiguous()  # [B, 1, 1, L]
    opt = graphopt.optimize(model, ["canonicalize"], (*_qkv(0), key_mask), dynamic_shapes=dims, strict=True)
    assert opt.graph_module.meta["graphopt_capture"] == "torch.export"
    assert count_ops(opt.graph_module)[SDPA] == 1
    q, k, v = (torch.randn(3, H, 7, D) for _ in range(3))
    m = torch.randn(3, 1, 1, 7)
    with torch.no_grad():
        assert_close(opt(q, k, v, m), model(q, k, v, m), max_rel_err=1e-5)


# ----------------------------------------------------------------------------- near misses


def _key_input(seed):
    """q, a key stored [B, d, H, L], v: ``key.permute(0, 2, 1, 3)`` is [B, H, d, L] but not a key transpose."""
    q, k, v = _qkv(seed)
    return q, k.permute(0, 3, 1, 2).contiguous(), v


NEAR_MISSES = {
    "key_permuted_0213": (
        lambda q, kr, v: _attend(q @ kr.permute(0, 2, 1, 3) * SCALE, v),
        _key_input,
        "permuted (0, 2, 1, 3)",
    ),
    "key_transposed_1_2": (
        lambda q, kr, v: _attend(q @ kr.transpose(1, 2) * SCALE, v),
        _key_input,
        "permuted (0, 2, 1, 3)",
    ),
    "softmax_over_dim_minus_2": (
        lambda q, k, v: (q @ k.transpose(-2, -1) * SCALE).softmax(-2) @ v,
        _qkv,
        "softmax over dim -2",
    ),
    "softmax_over_dim_1": (lambda q, k, v: (q @ k.transpose(-2, -1) * SCALE).softmax(1) @ v, _qkv, "softmax over dim 1"),
    "scores_returned": (
        lambda q, k, v: (lambda s: (_attend(s, v), s))(q @ k.transpose(-2, -1) * SCALE),
        _qkv,
        "scores (mul) have 2 users: softmax, output",
    ),
    "raw_scores_returned": (
        lambda q, k, v: (lambda s: (_attend(s * SCALE, v), s))(q @ k.transpose(-2, -1)),
        _qkv,
        "scores (matmul) have 2 users: mul, output",
    ),
    "masked_scores_returned": (
        lambda q, k, v, m: (lambda s: (_attend(s, v), s))(q @ k.transpose(-2, -1) * SCALE + m),
        lambda s: (*_qkv(s), _additive(s)),
        "scores (add) have 2 users: softmax, output",
    ),
    "probabilities_returned": (
        lambda q, k, v: (lambda p: (p @ v, p))((q @ k.transpose(-2, -1) * SCALE).softmax(-1)),
        _qkv,
        "probabilities (softmax) have 2 users: matmul_1, output",
    ),
    "scaled_after_mask": (
        lambda q, k, v, m: _attend((q @ k.transpose(-2, -1) + m) * SCALE, v),
        lambda s: (*_qkv(s), _additive(s)),
        "scaled after the mask",
    ),
    "masked_fill_finite": (
        lambda q, k, v, m: _attend((q @ k.transpose(-2, -1) * SCALE).masked_fill(m, -1e4), v),
        lambda s: (*_qkv(s), _blocked(s)),
        "fills with -10000.0, not -inf",
    ),
    "mask_grows_the_scores": (
        lambda q, k, v, m: _attend(q @ k.transpose(-2, -1) * SCALE + m, v),
        lambda s: (*_qkv(s), torch.randn(2, B, H, L, L)),
        "does not broadcast to the scores",
    ),
    "training_dropout": (
        lambda q, k, v: F.dropout((q @ k.transpose(-2, -1) * SCALE).softmax(-1), p=0.5, training=True) @ v,
        _qkv,
        "training mode",
    ),
    "rank_2": (
        lambda q, k, v: _attend(q @ k.transpose(-2, -1) * SCALE, v),
        lambda s: tuple(t[0, 0] for t in _qkv(s)),
        "2-D",
    ),
    "classifier_softmax": (
        lambda x: torch.softmax(x * 2.0, dim=-1),
        lambda s: (_qkv(s)[0],),
        "not a product with the values",
    ),
}


@pytest.mark.parametrize("case", sorted(NEAR_MISSES))
def test_near_misses_are_left_alone_with_a_reason(case):
    fn, make_inputs, reason = NEAR_MISSES[case]
    _rejected(Fn(fn), make_inputs(0), reason)


class TensorScale(nn.Module):
    def __init__(self, scale: torch.Tensor):
        super().__init__()
        self.scale = nn.Parameter(scale)

    def forward(self, q, k, v):
        return _attend(q @ k.transpose(-2, -1) * self.scale, v)


def test_a_per_head_scale_tensor_is_not_a_scale():
    _rejected(TensorScale(torch.rand(H, 1, 1) + 0.5), _qkv(0), "of shape (3, 1, 1), not a scalar")


def test_a_scale_computed_at_run_time_is_not_matched():
    def fn(q, k, v, temperature):
        return _attend(q @ k.transpose(-2, -1) / temperature, v)

    _rejected(Fn(fn), (*_qkv(0), torch.tensor(2.0)), "not a compile-time constant")


def test_a_non_positive_scale_is_not_matched():
    _rejected(Fn(lambda q, k, v: _attend(q @ k.transpose(-2, -1) * -SCALE, v)), _qkv(0), "not a positive finite number")


def test_rewrites_what_it_can_and_reports_the_rest():
    def fn(q, k, v):
        kept = (q @ k.transpose(-2, -1) * SCALE).softmax(-1)
        return _attend(q @ k.transpose(-2, -1) * SCALE, v), kept @ v, kept

    opt, record = run_pass("canonicalize", Fn(fn), _qkv(0), strict=True)
    assert record.status == APPLIED and record.stats == {"attention": 1, "layer_norm": 0, "rms_norm": 0, "identity_views": 0, "view_chains": 0, "causal_masks": 0, "true_masks": 0}
    assert record.reason == "left alone: softmax: the attention probabilities (softmax) have 2 users: matmul_3, output"
    assert count_ops(opt.graph_module)[SDPA] == 1 and count_ops(opt.graph_module)["aten.softmax.int"] == 1


def test_not_applicable_without_attention_or_norm():
    mlp = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8)).eval()
    _, record = run_pass("canonicalize", mlp, (torch.randn(2, 8),))
    assert record.status == NOT_APPLICABLE
    assert record.reason == "no explicit attention or normalization formula, no identity view and no chain of views to rewrite in the graph"


# ----------------------------------------------------------------------------- norms


class LayerNormFormula(nn.Module):
    def __init__(self, form: str, eps: float, weight: bool, bias: bool, d: int = 16):
        super().__init__()
        gen = torch.Generator().manual_seed(3)
        self.weight = nn.Parameter(torch.rand(d, generator=gen) + 0.5) if weight else None
        self.bias = nn.Parameter(torch.randn(d, generator=gen)) if bias else None
        self.form, self.eps = form, eps

    def forward(self, x):
        mean = x.mean(dim=-1, keepdim=True)
        if self.form == "mean_of_squares_rsqrt":
            y = (x - mean) * torch.rsqrt(((x - mean) ** 2).mean(dim=-1, keepdim=True) + self.eps)
        elif self.form == "centred_once_times_itself":
            c = x - mean
            y = c * torch.rsqrt((c * c).mean(-1, keepdim=True) + self.eps)
        elif self.form == "var_sqrt_div":
            y = (x - mean) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + self.eps)
        else:  # var with correction=0, eps added on the left
            y = (x - mean) * (self.eps + x.var(dim=-1, correction=0, keepdim=True)).rsqrt()
        if self.weight is not None:
            y = self.weight * y
        if self.bias is not None:
            y = y + self.bias
        return y


NORM_FORMULA_OPS = ("aten.rsqrt.default", "aten.sqrt.default", "aten.mean.dim", "aten.var.dim", "aten.var.correction")


def _assert_norm(model, x0, x1, target, gone=NORM_FORMULA_OPS):
    """Assert the formula became one ``target`` node (returned) and the outputs stay equal on x0 and x1."""
    opt = assert_applies("canonicalize", model, (x0,), gone=gone, present=[target], other_inputs=[(x1,)], strict=True)
    (node,) = [n for n in opt.graph_module.graph.nodes if n.target is target]
    return opt, node


LN_FORMS = ["mean_of_squares_rsqrt", "centred_once_times_itself", "var_sqrt_div", "var_correction_rsqrt"]
LN_AFFINE = [(1e-5, True, True), (1e-6, False, False), (1e-12, True, False), (1e-3, False, True)]


@pytest.mark.parametrize("form", LN_FORMS)
@pytest.mark.parametrize(("eps", "weight", "bias"), LN_AFFINE)
def test_layer_norm_formulas(form, eps, weight, bias):
    model = LayerNormFormula(form, eps, weight, bias).eval()
    x0, x1 = torch.randn(2, 5, 16) * 3 + 1, torch.randn(2, 5, 16)
    opt, ln = _assert_norm(model, x0, x1, torch.ops.aten.layer_norm.default)
    assert ln.args[4] == eps and (ln.args[2] is not None) == weight and (ln.args[3] is not None) == bias
    assert opt.report.record("canonicalize").stats == {"attention": 0, "layer_norm": 1, "rms_norm": 0, "identity_views": 0, "view_chains": 0, "causal_masks": 0, "true_masks": 0}


class RMSNormFormula(nn.Module):
    def __init__(self, eps: float, weight: bool, llama_casts: bool, d: int = 16):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(d) + 0.5) if weight else None
        self.eps, self.llama_casts = eps, llama_casts

    def forward(self, x):
        if self.llama_casts:  # as transformers' LlamaRMSNorm writes it
            dtype = x.dtype
            h = x.to(torch.float32)
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
            y = h.to(dtype)
        else:
            y = x * torch.rsqrt((x * x).mean(dim=-1, keepdim=True) + self.eps)
        return self.weight * y if self.weight is not None else y


RMS_CASES = [(1e-6, True, True), (1e-5, False, True), (1e-6, True, False), (1e-8, False, False)]


@pytest.mark.parametrize(("eps", "weight", "llama_casts"), RMS_CASES)
def test_rms_norm_formulas(eps, weight, llama_casts):
    torch.manual_seed(0)
    model = RMSNormFormula(eps, weight, llama_casts).eval()
    x0, x1 = torch.randn(2, 5, 16) * 2, torch.randn(2, 5, 16)
    gone = (*NORM_FORMULA_OPS, "aten.pow.Tensor_Scalar", "aten.mul.Tensor")
    _, rms = _assert_norm(model, x0, x1, torch.ops.aten.rms_norm.default, gone)
    assert rms.args[3] == eps and (rms.args[2] is not None) == weight


def test_a_real_cast_stays_outside_the_rms_norm():
    """A float64 input: the casts to float32 and back are real, so they stay around the replaced formula."""
    model = RMSNormFormula(1e-6, True, llama_casts=True).eval()
    x0, x1 = torch.randn(2, 5, 16, dtype=torch.float64), torch.randn(2, 5, 16, dtype=torch.float64)
    opt, rms = _assert_norm(model, x0, x1, torch.ops.aten.rms_norm.default)
    assert rms.args[2] is None  # the weight multiplies the cast-back value, outside
    assert count_ops(opt.graph_module)["aten.to.dtype"] == 2


def _mean_square(x, dim=-1):
    return x.pow(2).mean(dim, keepdim=True)


NORM_NEAR_MISSES = {
    "unbiased_variance": (
        lambda x: (x - x.mean(-1, keepdim=True)) * torch.rsqrt(x.var(-1, keepdim=True) + 1e-5),
        "not a biased variance",
    ),
    "mean_over_dim_1": (lambda x: x * torch.rsqrt(_mean_square(x, dim=1) + 1e-5), "not a mean over the last dimension"),
    "normalizes_another_tensor": (lambda x: x.flip(-1) * torch.rsqrt(_mean_square(x) + 1e-5), "normalizes flip"),
    "statistic_returned": (
        lambda x: (lambda ms: (x * torch.rsqrt(ms + 1e-5), ms))(_mean_square(x)),
        "mean is also used by output",
    ),
}


@pytest.mark.parametrize("case", sorted(NORM_NEAR_MISSES))
def test_norm_near_misses_are_left_alone_with_a_reason(case):
    fn, reason = NORM_NEAR_MISSES[case]
    _rejected(Fn(fn), (torch.randn(2, 5, 16),), reason)


# ----------------------------------------------------------------------------- zoo models


def _zoo_equivalence(entry, other_inputs, attention, layer_norm=0, rms_norm=0, identity_views=0, view_chains=0, true_masks=0):
    opt = _assert_attention(entry.model, entry.example_inputs, other_inputs, n=attention)
    stats = {"attention": attention, "layer_norm": layer_norm, "rms_norm": rms_norm, "identity_views": identity_views, "view_chains": view_chains}
    stats |= {"causal_masks": 0, "true_masks": true_masks}
    assert opt.report.record("canonicalize").stats == stats
    return opt


def _other_tokens(entry, vocab):
    ids = entry.example_inputs[0]
    return torch.randint(0, vocab, ids.shape, generator=torch.Generator().manual_seed(7))


def test_preln_tiny_attention_and_layer_norm_formula():
    entry = zoo.load("preln-tiny")
    ids = _other_tokens(entry, 1000)
    mask = torch.ones_like(ids)
    mask[0, -6:] = 0
    opt = _zoo_equivalence(entry, (ids, mask), attention=2, layer_norm=1)
    assert not any(count_ops(opt.graph_module)[op] for op in NORM_FORMULA_OPS)


@pytest.fixture(scope="module")
def minilm_eager():
    """``(entry, other, opt)``: the real MiniLM with its attention written out, canonicalized once for the
    two tests below (batch and length dynamic, strict), by ``assert_applies``: softmax gone, 6 SDPA, and
    the function kept on the example and on 8 other real sentences ``other``. The IR is checked after
    every pass, as the conftest does for each test (a module fixture runs before that one)."""
    entry = zoo.load("minilm-eager")
    width = entry.example_inputs[0].shape[1]
    other = zoo.tokenize(entry.tokenizer, zoo.real_sentences(16)[8:], pad_to=width)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GRAPHOPT_CHECK_IR", "1")
        opt = _assert_attention(entry.model, entry.example_inputs, other, n=6, dynamic_shapes=entry.dynamic_shapes)
    return entry, other, opt


def test_minilm_eager_real_sentences(minilm_eager):
    entry, other, opt = minilm_eager
    assert opt.report.record("canonicalize").stats == {"attention": 6, "layer_norm": 0, "rms_norm": 0, "identity_views": 8, "view_chains": 0, "causal_masks": 0, "true_masks": 0}
    with torch.no_grad():
        embeddings, reference = opt(*other), entry.model(*other)
    assert_close(embeddings, reference, max_rel_err=1e-5)
    assert zoo.cosine_similarity_rows(embeddings, reference).min() > 1 - 1e-6


def test_minilm_sdpa_and_eager_canonicalize_to_the_same_graph(minilm_eager):
    """The model as users load it (SDPA) has only identity reshapes of SDPA's output to clean up;
    after that, it and the written-out form differ only in how the mask is spelled."""
    sdpa, (eager, _, eager_opt) = zoo.load("minilm"), minilm_eager
    sdpa_opt = graphopt.optimize(sdpa.model, ["canonicalize"], sdpa.example_inputs, dynamic_shapes=sdpa.dynamic_shapes, strict=True)
    graphs = {}
    for entry, attention, opt in ((sdpa, 0, sdpa_opt), (eager, 6, eager_opt)):
        record = opt.report.record("canonicalize")
        assert record.status == APPLIED and record.stats == {"attention": attention, "layer_norm": 0, "rms_norm": 0, "identity_views": 8, "view_chains": 0, "causal_masks": 0, "true_masks": 0}
        graphs[entry.name] = count_ops(opt.graph_module)
        with torch.no_grad():
            assert_close(opt(*entry.example_inputs), entry.model(*entry.example_inputs), max_rel_err=1e-5)
        again, report = graphopt.PassManager(["canonicalize"], strict=True).run(opt.graph_module, entry.example_inputs)
        assert report.record("canonicalize").status == NOT_APPLICABLE  # a fixed point
    ops, eager_ops = graphs["minilm"], graphs["minilm-eager"]
    assert ops[SDPA] == eager_ops[SDPA] == 6
    assert ops["aten.contiguous.default"] == eager_ops["aten.contiguous.default"] == 0
    # the eager path spells its mask as an additive float (zeros + where); every other op is the same
    differ = {op for op in set(ops) | set(eager_ops) if ops[op] != eager_ops[op]}
    assert differ == {"aten.where.ScalarOther", "aten.zeros.default"}


def test_identity_views_go_and_reshapes_read_through_contiguous():
    def merge_heads(q, k, v):
        b, h, s, d = q.shape
        out = F.scaled_dot_product_attention(q, k, v).reshape(b, -1, s, d).view(b, h, s * d).view(b, h, s, d)
        return out.transpose(1, 2).contiguous().view(b, s, h * d)

    dims = (({0: torch.export.Dim.AUTO, 2: torch.export.Dim.AUTO},) * 3,)  # Fn takes *args
    opt, record = run_pass("canonicalize", Fn(merge_heads), _qkv(0), dynamic_shapes=dims, strict=True)
    assert record.status == APPLIED and record.stats["identity_views"] == 3  # two identities, one contiguous
    ops = count_ops(opt.graph_module)
    assert ops["aten.contiguous.default"] == 0 and ops["aten.view.default"] == 0
    assert ops["aten.reshape.default"] == 1 and ops["aten.transpose.int"] == 1
    other = tuple(torch.randn(3, H, 7, D) for _ in range(3))
    with torch.no_grad():
        assert_close(opt(*other), merge_heads(*other))


def _mha_heads(x):
    """nn.MultiheadAttention's sequence-first head split: the in-projection [S, B, 3E] unflattened,
    reshuffled by unsqueeze / transpose / squeeze, and each of q, k, v moved to [B, H, S, D]."""
    s, b, _ = x.shape
    qkv = x.unflatten(-1, (3, H * D)).unsqueeze(0).transpose(0, -2).squeeze(-2).contiguous()
    return tuple(t.view(s, b * H, D).transpose(0, 1).view(b, H, s, D) for t in qkv)


def test_view_chains_become_split_permute_merge():
    dims = (({0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO},),)  # Fn takes *args
    x = torch.randn(L, B, 3 * H * D)
    opt, record = run_pass("canonicalize", Fn(_mha_heads), (x,), dynamic_shapes=dims, strict=True)
    assert record.status == APPLIED and record.stats["view_chains"] == 4  # the shuffle, then q, k and v
    ops = count_ops(opt.graph_module)
    assert ops["aten.unsqueeze.default"] == ops["aten.squeeze.dim"] == ops["aten.transpose.int"] == ops["aten.view.default"] == 0
    # [S, B, 3E] -> unflatten -> permute -> contiguous (the selects read it), each head split one unflatten and permute
    assert ops["aten.unflatten.int"] == 4 and ops["aten.permute.default"] == 4 and ops["aten.contiguous.default"] == 1
    perms = sorted(tuple(n.args[1]) for n in opt.graph_module.graph.nodes if n.target is torch.ops.aten.permute.default)
    assert perms == [(1, 2, 0, 3)] * 3 + [(2, 0, 1, 3)]
    other = torch.randn(7, 3, 3 * H * D)
    with torch.no_grad():
        for got, want in zip(opt(other), _mha_heads(other)):
            assert_close(got, want, max_rel_err=0)
    again, report = graphopt.PassManager(["canonicalize"], strict=True).run(opt.graph_module, (x,))
    assert report.record("canonicalize").status == NOT_APPLICABLE  # a fixed point


def test_view_chains_left_alone_when_not_split_permute_merge():
    """``[6, 4] -> transpose -> view [3, 8]`` regroups the elements across the permuted
    dimensions (3 does not divide 4): no split, permute, merge computes it, so it stays;
    and a head split already in the form (view, then transpose) is not respelled."""

    def regroup(x):
        return x.transpose(0, 1).reshape(3, 8) * 2, x.view(6, 2, 2).transpose(0, 1) + 1

    x = torch.randn(6, 4)
    before = count_ops(graphopt.capture(Fn(regroup), (x,)))
    opt, record = run_pass("canonicalize", Fn(regroup), (x,), strict=True)
    assert record.status == NOT_APPLICABLE, record
    assert count_ops(opt.graph_module) == before


@pytest.mark.parametrize(("name", "rms_norm", "identity_views", "view_chains"), [("gpt2-tiny", 0, 3, 2), ("llama-tiny", 5, 3, 0)])
def test_causal_decoders_eager(name, rms_norm, identity_views, view_chains):
    entry = zoo.load(name, attn_implementation="eager")
    entry.model.config.use_cache = False  # the captured graph has no KV cache; compare like with like
    _zoo_equivalence(entry, (_other_tokens(entry, 1000),), attention=2, rms_norm=rms_norm, identity_views=identity_views, view_chains=view_chains)


def test_vit_small_eager():
    entry = zoo.load("vit-s", attn_implementation="eager", image_size=32, num_hidden_layers=2)
    other = torch.randn(entry.example_inputs[0].shape, generator=torch.Generator().manual_seed(7))
    _zoo_equivalence(entry, (other,), attention=2, identity_views=3, true_masks=2)  # ViT's all-zero additive mask goes


def test_running_twice_finds_nothing_left():
    entry = zoo.load("preln-tiny")
    once = graphopt.optimize(entry.model, ["canonicalize"], entry.example_inputs, strict=True)
    graph_module, report = graphopt.PassManager(["canonicalize"], strict=True).run(once.graph_module, entry.example_inputs)
    assert report.record("canonicalize").status == NOT_APPLICABLE
    with torch.no_grad():
        assert_close(run_graph(graph_module, entry.example_inputs), entry.model(*entry.example_inputs), max_rel_err=1e-5)


# ----------------------------------------------------------------------------- attention masks


def _sdpa_nodes(gm):
    return [n for n in gm.graph.nodes if n.target is torch.ops.aten.scaled_dot_product_attention.default]


def _sdpa_args(node):
    from graphopt.ir import normalized_args

    return normalized_args(node)


@pytest.mark.parametrize(("name", "n"), [("gpt2-tiny", 2), ("llama-tiny", 2), ("llama-long", 4)])
def test_hugging_face_causal_masks_become_is_causal(name, n):
    """transformers' SDPA path, exported from input_ids alone, builds an explicit [B, 1, L, L]
    boolean mask (causal and its packed-sequence check on arange position ids); it is SDPA's own."""
    entry = zoo.load(name)
    ids = entry.example_inputs[0]
    longer = (torch.randint(0, 1000, (ids.shape[0] + 1, ids.shape[1] * 2 + 3), generator=torch.Generator().manual_seed(7)),)
    opt = assert_applies("canonicalize", entry.model, entry.example_inputs, present=[SDPA], other_inputs=[longer], strict=True, dynamic_shapes=entry.dynamic_shapes)
    assert opt.report.record("canonicalize").stats["causal_masks"] == n
    sdpas = _sdpa_nodes(opt.graph_module)
    assert len(sdpas) == n
    for node in sdpas:
        args = _sdpa_args(node)
        assert args["is_causal"] is True and args["attn_mask"] is None
    assert not [node for node in opt.graph_module.graph.nodes if node.target is torch.ops.aten.diff.default]  # the mask's derivation is gone
    with torch.no_grad():
        assert_close(opt(*longer).logits, entry.model(*longer).logits, rtol=0, atol=0)


def _positions_attention(mask_of):
    def attend(q, k, v, *extra):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask_of(q, k, *extra))

    return Fn(attend)


def _causal(q, k):
    return torch.arange(k.shape[-2])[None, :] <= torch.arange(q.shape[-2])[:, None]


def _mask_left_alone(model, inputs):
    opt, record = run_pass("canonicalize", model, inputs, strict=True)
    assert record.status == NOT_APPLICABLE, record
    (node,) = _sdpa_nodes(opt.graph_module)
    args = _sdpa_args(node)
    assert args["attn_mask"] is not None and not args["is_causal"]


def test_a_causal_mask_of_aranges_becomes_is_causal_and_a_true_mask_goes():
    q, k, v = _qkv(0)
    opt = assert_applies("canonicalize", _positions_attention(_causal), (q, k, v), present=[SDPA], other_inputs=[_qkv(1)], strict=True)
    assert opt.report.record("canonicalize").stats["causal_masks"] == 1
    assert _sdpa_args(_sdpa_nodes(opt.graph_module)[0])["is_causal"] is True
    everything = _positions_attention(lambda q, k: torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool))
    opt = assert_applies("canonicalize", everything, (q, k, v), present=[SDPA], other_inputs=[_qkv(1)], strict=True)
    assert opt.report.record("canonicalize").stats["true_masks"] == 1
    args = _sdpa_args(_sdpa_nodes(opt.graph_module)[0])
    assert args["attn_mask"] is None and not args["is_causal"]


def test_a_windowed_mask_stays():
    def window(q, k):
        return (torch.arange(q.shape[-2])[:, None] - torch.arange(k.shape[-2])[None, :]).abs() <= 1

    _mask_left_alone(_positions_attention(window), _qkv(0))


def test_a_causal_mask_with_a_padding_mask_input_stays():
    def padded(q, k, attention_mask):
        return _causal(q, k)[None, None] & attention_mask.bool()[:, None, None, :]

    q, k, v = _qkv(0)
    attention_mask = torch.ones(B, L, dtype=torch.long)
    attention_mask[0, -2:] = 0
    _mask_left_alone(_positions_attention(padded), (q, k, v, attention_mask))


def test_keys_longer_than_queries_keep_their_mask():
    """A KV cache: S keys, L < S queries; the mask is no square causal triangle, left to SDPA."""
    q, _, _ = _qkv(0)
    gen = torch.Generator().manual_seed(1)
    k, v = torch.randn(B, H, L + 3, D, generator=gen), torch.randn(B, H, L + 3, D, generator=gen)
    _mask_left_alone(_positions_attention(_causal), (q, k, v))
