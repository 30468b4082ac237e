"""Randomized equivalence: tiny random models through every exact pass combination, checked against the original.

A :class:`ModelConfig` describes one tiny model with random weights: a Hugging Face model (BERT,
RoBERTa, DistilBERT, GPT-2 LM, Llama LM) built from a config, a hand-written encoder
(:class:`FuzzEncoder`: Pre-/Post-LN, explicit or SDPA attention, GQA, causal or not, pooling) or a
BatchNorm conv net (:class:`FuzzConvNet`), together with its example inputs (a padding mask with
random lengths, a single-token row included) and a second batch of another batch size and length.

:func:`run_config` optimizes one model with several pass combinations (one *case* each) and, for
every case, checks that

* ``graphopt.optimize`` does not raise,
* no pass was rolled back (the manager rolls back a pass that raised or changed the function on the
  example) and the report carries no end-to-end budget warning,
* the optimized module equals the original model (eval mode, no KV cache) on the example inputs and
  on the second batch, at the output positions the applied passes declare meaningful (their
  ``output_masks``: ``remove_padding`` leaves pad positions zero), within
  :class:`graphopt.Exact`'s budget.

A pass that is "not applicable" (or "unchanged") is a legitimate outcome, counted as such.

The space of configurations is defined once, by :func:`draw_config` over a ``pick(options)``
function, so the hypothesis strategies (:func:`model_configs`, :func:`fuzz_cases`) used by the tests
and the seeded sampler (:func:`random_config`) used by ``bench/fuzz.py`` draw from the same space.
``hypothesis`` is imported only by the strategy functions.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.export import Dim

from graphopt.backends import get_backend
from graphopt.frontends.api import OptimizedModule, optimize
from graphopt.frontends.capture import CaptureError, auto_dynamic_shapes, capture, captured_inputs, inference_view
from graphopt.pipeline.manager import PassManager, run_graph
from graphopt.pipeline.pass_base import Pass, available_passes, default_pass_names
from graphopt.pipeline.report import APPLIED, NOT_APPLICABLE, ROLLED_BACK, UNCHANGED, Report, one_line
from graphopt.pipeline.verify import Exact, flat_outputs
from graphopt.testing import assert_close, declared_masks
from graphopt.tools.zoo import ExplicitLayerNorm

__all__ = [
    "EXACT_PASSES",
    "COMBINATIONS",
    "CaseOutcome",
    "FuzzConvNet",
    "FuzzEncoder",
    "ModelConfig",
    "build",
    "draw_config",
    "fuzz_cases",
    "model_configs",
    "random_config",
    "run_case",
    "run_config",
]

T = TypeVar("T")

# fold_repbn is exact but not registered: it only applies to layernorm_to_repbn graphs trained to
# γ = 0, which graphopt.finalize checks; tests/passes/test_fold_repbn.py covers it.
# graphopt's own exact passes: a pass a user or a test registers later is not part of the claim
EXACT_PASSES: tuple[str, ...] = tuple(sorted(name for name in default_pass_names() if available_passes()[name].__module__.startswith("graphopt.passes.")))
"""The exact passes of the default pipeline (``smooth_quant`` only prepares quantization and is
tested on its own in ``tests/passes/test_smooth_quant.py``)."""

# Every non-empty subset of the exact passes, in registry order (the manager orders them itself).
COMBINATIONS: tuple[tuple[str, ...], ...] = tuple(c for n in range(1, len(EXACT_PASSES) + 1) for c in itertools.combinations(EXACT_PASSES, n))

HF_FAMILIES = ("bert", "roberta", "distilbert", "gpt2", "llama")
FAMILIES = (*HF_FAMILIES, "encoder", "convnet")
_DECODERS = ("gpt2", "llama")
_ROPE = ("llama",)  # rotary embeddings rotate pairs of features: the head dim must be even
_PAD_ID = 1  # RoBERTa's padding_idx; real tokens are drawn from ids >= 5, never a special token
MAX_POSITIONS = 32


@dataclass(frozen=True)
class ModelConfig:
    """One tiny random model and its two input batches.

    Token models take ``(input_ids, attention_mask)``; ``lengths`` are the valid tokens of each row
    of the example (right padding up to ``seq = max(lengths)``, or a longer ``seq`` when
    ``extra_pad``), ``other_lengths`` those of the second batch. Conv nets take one image/signal
    batch; their lengths tuples only give the batch size and ``seq`` / ``other_seq`` the spatial size.
    """

    family: str
    seed: int
    hidden: int = 32  # FuzzConvNet: its channels
    heads: int = 2
    kv_heads: int = 2  # < heads: grouped-query attention (Llama and the hand-written encoder)
    layers: int = 1
    intermediate: int = 37
    vocab: int = 64
    attn_implementation: str = "sdpa"  # "eager": matmul/softmax written out (HF eager, or FuzzEncoder's explicit form)
    pre_ln: bool = True  # FuzzEncoder only; the HF families are what they are (GPT-2/Llama Pre-, BERT-likes Post-)
    causal: bool = False  # FuzzEncoder only; GPT-2 and Llama are always causal
    explicit_norm: bool = False  # FuzzEncoder: LayerNorm written as a formula (canonicalize's job)
    pooling: str = "none"  # FuzzEncoder: "none" | "mean" (masked mean) | "cls"
    norm_affine: str = "affine"  # FuzzEncoder's LayerNorms: "affine" | "no bias" | "none" (no weight, no bias)
    mask_style: str = "additive"  # FuzzEncoder's explicit attention: "additive" (+min at pads) | "masked_fill"
    fused_qkv: bool = False  # FuzzEncoder: one linear for Q, K and V, split along features
    tie_word_embeddings: bool = False  # BERT (as BertForMaskedLM), GPT-2, Llama; FuzzEncoder: logits from the token embedding
    conv_dims: int = 2  # FuzzConvNet: Conv1d or Conv2d
    conv_bias: bool = False
    depthwise: bool = False  # FuzzConvNet: the second conv is depthwise (groups = channels)
    linear_bn: bool = False  # FuzzConvNet: Linear + BatchNorm1d head
    transposed: bool = False  # FuzzConvNet: the last stage is a ConvTranspose (+ BatchNorm)
    bn_first: bool = False  # FuzzConvNet: a BatchNorm on the input, before any conv (nothing to fold it into)
    branch: bool = False  # FuzzConvNet: the first conv feeds two BatchNorms, summed
    stride: int = 1  # FuzzConvNet: the first conv's stride
    dilation: int = 1  # FuzzConvNet: the first conv's dilation (padding keeps the size)
    lengths: tuple[int, ...] = (5, 3)
    seq: int = 5
    other_lengths: tuple[int, ...] = (7, 1, 4)
    other_seq: int = 7

    @property
    def gqa(self) -> bool:
        return self.kv_heads < self.heads

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def is_conv(self) -> bool:
        return self.family == "convnet"

    @property
    def is_causal(self) -> bool:
        return self.family in _DECODERS or (self.family == "encoder" and self.causal)

    @property
    def padded(self) -> bool:
        return not self.is_conv and min(self.lengths) < self.seq

    def describe(self) -> str:
        """The fields that differ from the defaults, as ``ModelConfig(...)`` source."""
        defaults = ModelConfig(family=self.family, seed=self.seed)
        changed = [
            f"{f.name}={getattr(self, f.name)!r}"
            for f in dataclasses.fields(self)
            if f.name in ("family", "seed") or getattr(self, f.name) != getattr(defaults, f.name)
        ]
        return f"ModelConfig({', '.join(changed)})"


def draw_config(pick: Callable[[Sequence[Any]], Any]) -> ModelConfig:
    """A configuration drawn with ``pick(options) -> one option`` (hypothesis or ``random.Random.choice``).

    Sizes stay tiny (hidden <= 48, at most 2 layers, sequences <= 12, batches <= 4) so a case takes
    a second or two on a CPU; widths are often odd (head dims 5 or 7, odd intermediate sizes).
    """
    family = pick(FAMILIES)
    seed = pick(range(1000))
    if family == "convnet":
        batch, other_batch = pick((2, 3, 4)), pick((1, 2, 3, 4))
        seq = pick((5, 6, 8))
        return ModelConfig(
            family=family,
            seed=seed,
            hidden=pick((3, 4, 5, 8)),  # channels
            layers=pick((1, 2)),
            conv_dims=pick((1, 2)),
            conv_bias=pick((False, True)),
            depthwise=pick((False, True)),
            linear_bn=pick((False, True)),
            transposed=pick((False, False, True)),
            bn_first=pick((False, False, True)),
            branch=pick((False, False, True)),
            stride=pick((1, 1, 2)),
            dilation=pick((1, 1, 2)),
            lengths=(seq,) * batch,
            seq=seq,
            other_lengths=(seq,) * other_batch,
            other_seq=pick((4, 7, 9)),
        )
    heads = pick((1, 2, 3, 4))
    head_dim = pick((4, 6, 8, 12) if family in _ROPE else (4, 5, 6, 7, 8, 12))
    while heads * head_dim > 48:
        heads -= 1
    kv_heads = pick([k for k in range(1, heads + 1) if heads % k == 0]) if family in ("llama", "encoder") else heads
    impl = pick(("sdpa", "eager"))
    fields: dict[str, Any] = dict(
        family=family,
        seed=seed,
        hidden=heads * head_dim,
        heads=heads,
        kv_heads=kv_heads,
        layers=pick((1, 2)),
        intermediate=pick((13, 24, 37, 50)),
        vocab=pick((40, 64, 97)),
        attn_implementation=impl,
    )
    if family == "encoder":
        fields.update(
            pre_ln=pick((True, False)),
            causal=pick((False, False, True)),
            explicit_norm=pick((False, True)),
            pooling=pick(("none", "mean", "cls")),
            norm_affine=pick(("affine", "affine", "no bias", "none")),
            mask_style=pick(("additive", "masked_fill")),
            fused_qkv=pick((False, True)),
        )
    if family in ("bert", "gpt2", "llama") or (family == "encoder" and fields["pooling"] == "none"):
        fields["tie_word_embeddings"] = pick((False, True))
    lengths, seq = _draw_lengths(pick)
    other_lengths, other_seq = _draw_lengths(pick, smallest=1)
    return ModelConfig(**fields, lengths=lengths, seq=seq, other_lengths=other_lengths, other_seq=other_seq)


def _draw_lengths(pick: Callable[[Sequence[Any]], Any], smallest: int = 2) -> tuple[tuple[int, ...], int]:
    """Row lengths of a batch (often one single-token row, sometimes no padding at all, sometimes
    padded past its longest row as ``padding="max_length"`` does) and its padded length.

    The example keeps batch and length >= 2 (``smallest``): export specializes size-1 dims. The
    second batch may be a single row or a single token, which the dynamic graph must take."""
    batch = pick(range(smallest, 5))
    seq = pick(range(smallest, 13))
    style = pick(("ragged", "ragged", "single-token row", "full", "max_length"))
    if style == "full":
        return (seq,) * batch, seq
    if style == "max_length" and seq > 1:
        return tuple(pick(range(1, seq)) for _ in range(batch)), seq
    lengths = [pick(range(1, seq + 1)) for _ in range(batch)]
    lengths[0] = seq  # the longest row sets the padded length, as a tokenizer pads
    if style == "single-token row" and batch > 1:
        lengths[-1] = 1
    return tuple(lengths), seq


def random_config(rng: random.Random) -> ModelConfig:
    """A configuration drawn with ``rng`` (``bench/fuzz.py``'s seeded sampler)."""
    return draw_config(lambda options: rng.choice(list(options)))


def model_configs():
    """Hypothesis strategy over :class:`ModelConfig` (the space of :func:`draw_config`)."""
    from hypothesis import strategies as st

    @st.composite
    def configs(draw):
        return draw_config(lambda options: draw(st.sampled_from(list(options))))

    return configs()


def fuzz_cases(max_combinations: int = 3):
    """Hypothesis strategy over ``(config, combinations)``: a model and up to ``max_combinations``
    distinct exact pass combinations to run on it (one capture, several cases)."""
    from hypothesis import strategies as st

    return st.tuples(model_configs(), st.lists(st.sampled_from(COMBINATIONS), min_size=1, max_size=max_combinations, unique=True))


# --------------------------------------------------------------------------
# Hand-written models
# --------------------------------------------------------------------------


class _Attention(nn.Module):
    """Self-attention with a key-padding mask: ``F.scaled_dot_product_attention`` (``"sdpa"``) or
    the matmul / masked softmax written out (``"eager"``); grouped-query when ``kv_heads < heads``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.heads, cfg.kv_heads, cfg.head_dim
        self.causal, self.implementation, self.mask_style = cfg.causal, cfg.attn_implementation, cfg.mask_style
        self.widths = [cfg.heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim]
        if cfg.fused_qkv:
            self.qkv = nn.Linear(cfg.hidden, sum(self.widths))
        else:
            self.q, self.k, self.v = (nn.Linear(cfg.hidden, w) for w in self.widths)
        self.out = nn.Linear(cfg.heads * cfg.head_dim, cfg.hidden)

    def forward(self, x: Tensor, attention_mask: Tensor) -> Tensor:
        b, t, _ = x.shape
        if hasattr(self, "qkv"):
            q, k, v = self.qkv(x).split(self.widths, dim=-1)
        else:
            q, k, v = self.q(x), self.k(x), self.v(x)
        q = q.view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = k.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        keep = attention_mask[:, None, None, :].bool()  # [B, 1, 1, T]
        if self.causal:
            keep = keep & torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        if self.implementation == "sdpa":
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, enable_gqa=self.kv_heads < self.heads)
        else:
            if self.kv_heads < self.heads:
                k = k.repeat_interleave(self.heads // self.kv_heads, dim=1)
                v = v.repeat_interleave(self.heads // self.kv_heads, dim=1)
            scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)
            if self.mask_style == "masked_fill":
                scores = scores.masked_fill(~keep, torch.finfo(x.dtype).min)
            else:
                scores = scores + (~keep).to(x.dtype) * torch.finfo(x.dtype).min
            ctx = scores.softmax(dim=-1) @ v
        return self.out(ctx.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))


class _Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.pre_ln = cfg.pre_ln
        self.attn = _Attention(cfg)
        self.norm1, self.norm2 = _norm(cfg), _norm(cfg)
        self.mlp = nn.Sequential(nn.Linear(cfg.hidden, cfg.intermediate), nn.GELU(), nn.Linear(cfg.intermediate, cfg.hidden))

    def forward(self, x: Tensor, attention_mask: Tensor) -> Tensor:
        if self.pre_ln:
            x = x + self.attn(self.norm1(x), attention_mask)
            return x + self.mlp(self.norm2(x))
        x = self.norm1(x + self.attn(x, attention_mask))
        return self.norm2(x + self.mlp(x))


def _norm(cfg: ModelConfig) -> nn.Module:
    if cfg.explicit_norm:  # ExplicitLayerNorm always has a scale and a shift
        return ExplicitLayerNorm(cfg.hidden)
    return nn.LayerNorm(cfg.hidden, elementwise_affine=cfg.norm_affine != "none", bias=cfg.norm_affine == "affine")


class FuzzEncoder(nn.Module):
    """Hand-written transformer encoder: token + position embeddings, ``layers`` Pre-LN or Post-LN
    blocks (a final norm after Pre-LN ones), then per ``pooling`` the hidden states ``[B, T, H]``
    (or, with ``tie_word_embeddings``, logits ``[B, T, vocab]`` against the token embedding), their
    mean over valid tokens or the first token ``[B, H]``. ``forward(input_ids, attention_mask)``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.pooling, self.tied_head = cfg.pooling, cfg.tie_word_embeddings
        self.tok = nn.Embedding(cfg.vocab, cfg.hidden)
        self.pos = nn.Embedding(MAX_POSITIONS, cfg.hidden)
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.layers))
        self.final_norm = _norm(cfg) if cfg.pre_ln else nn.Identity()

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        x = self.tok(input_ids) + self.pos(torch.arange(input_ids.shape[1], device=input_ids.device))
        for block in self.blocks:
            x = block(x, attention_mask)
        x = self.final_norm(x)
        if self.pooling == "mean":
            keep = attention_mask.unsqueeze(-1).to(x.dtype)
            return (x * keep).sum(dim=1) / keep.sum(dim=1)
        if self.pooling == "cls":
            return x[:, 0]
        return F.linear(x, self.tok.weight) if self.tied_head else x


class FuzzConvNet(nn.Module):
    """Conv + BatchNorm + ReLU stages, a mean over positions and a linear head. ``forward(x)`` with
    ``x`` ``[B, 3, L]`` (``conv_dims=1``) or ``[B, 3, L, L]``.

    ``layers`` stages of ``hidden`` channels (3 in), the first with ``stride`` and ``dilation``, the
    second depthwise when ``depthwise``, the last a ConvTranspose when ``transposed``; a BatchNorm
    on the input when ``bn_first``; the first conv read by two BatchNorms whose outputs are summed
    when ``branch``; a BatchNorm1d after the head when ``linear_bn``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        conv, transposed, bn = (nn.Conv1d, nn.ConvTranspose1d, nn.BatchNorm1d) if cfg.conv_dims == 1 else (nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm2d)
        self.input_bn = bn(3) if cfg.bn_first else nn.Identity()
        self.convs, self.bns = nn.ModuleList(), nn.ModuleList()
        for i in range(cfg.layers):
            cin = 3 if i == 0 else cfg.hidden
            groups = cfg.hidden if (cfg.depthwise and i > 0) else 1
            stride, dilation = (cfg.stride, cfg.dilation) if i == 0 else (1, 1)
            if cfg.transposed and i == cfg.layers - 1:
                layer = transposed(cin, cfg.hidden, 3, stride=stride, padding=dilation, dilation=dilation, bias=cfg.conv_bias, groups=groups)
            else:
                layer = conv(cin, cfg.hidden, 3, stride=stride, padding=dilation, dilation=dilation, bias=cfg.conv_bias, groups=groups)
            self.convs.append(layer)
            self.bns.append(bn(cfg.hidden))
        self.branch_bn = bn(cfg.hidden) if cfg.branch else None
        self.head = nn.Sequential(nn.Linear(cfg.hidden, 5), nn.BatchNorm1d(5)) if cfg.linear_bn else nn.Linear(cfg.hidden, 5)

    def forward(self, x: Tensor) -> Tensor:
        x = self.input_bn(x)
        for i, (conv, bn) in enumerate(zip(self.convs, self.bns)):
            y = conv(x)
            x = F.relu(bn(y) + self.branch_bn(y) if i == 0 and self.branch_bn is not None else bn(y))
        return self.head(x.flatten(2).mean(dim=2))


# --------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------


def build(cfg: ModelConfig) -> nn.Module:
    """The model of ``cfg`` in eval mode, with weights from ``torch.manual_seed(cfg.seed)`` (the
    caller's RNG untouched) and every norm's scale, shift and BatchNorm statistics randomised, so
    that folding them into neighbouring weights is not an identity."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = _build_hf(cfg) if cfg.family in HF_FAMILIES else FuzzConvNet(cfg) if cfg.is_conv else FuzzEncoder(cfg)
        _randomise_norms(model)
    return model.eval()


def _build_hf(cfg: ModelConfig) -> nn.Module:
    import transformers

    common = dict(vocab_size=cfg.vocab, attn_implementation=cfg.attn_implementation)
    if cfg.family in ("bert", "roberta"):
        fields = dict(
            hidden_size=cfg.hidden,
            num_hidden_layers=cfg.layers,
            num_attention_heads=cfg.heads,
            intermediate_size=cfg.intermediate,
            max_position_embeddings=MAX_POSITIONS + 2,  # RoBERTa's positions start after padding_idx
            tie_word_embeddings=cfg.tie_word_embeddings,
            **common,
        )
        if cfg.family == "roberta":
            return transformers.RobertaModel(transformers.RobertaConfig(pad_token_id=_PAD_ID, **fields), add_pooling_layer=True)
        config = transformers.BertConfig(**fields)
        return transformers.BertForMaskedLM(config) if cfg.tie_word_embeddings else transformers.BertModel(config)
    if cfg.family == "distilbert":
        return transformers.DistilBertModel(
            transformers.DistilBertConfig(
                dim=cfg.hidden, n_layers=cfg.layers, n_heads=cfg.heads, hidden_dim=cfg.intermediate, max_position_embeddings=MAX_POSITIONS, **common
            )
        )
    if cfg.family == "gpt2":
        config = transformers.GPT2Config(
            n_embd=cfg.hidden,
            n_layer=cfg.layers,
            n_head=cfg.heads,
            n_inner=cfg.intermediate,
            n_positions=MAX_POSITIONS,
            tie_word_embeddings=cfg.tie_word_embeddings,
            bos_token_id=0,  # the default (50256) lies outside the tiny vocabulary
            eos_token_id=0,
            **common,
        )
        return transformers.GPT2LMHeadModel(config)
    if cfg.family == "llama":
        config = transformers.LlamaConfig(
            hidden_size=cfg.hidden,
            num_hidden_layers=cfg.layers,
            num_attention_heads=cfg.heads,
            num_key_value_heads=cfg.kv_heads,
            head_dim=cfg.head_dim,
            intermediate_size=cfg.intermediate,
            max_position_embeddings=MAX_POSITIONS,
            tie_word_embeddings=cfg.tie_word_embeddings,
            **common,
        )
        return transformers.LlamaForCausalLM(config)
    raise ValueError(f"unknown family {cfg.family!r}; expected one of {FAMILIES}")


def _randomise_norms(model: nn.Module) -> None:
    with torch.no_grad():
        for module in model.modules():
            if "Norm" not in type(module).__name__:
                continue
            weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
            if isinstance(weight, Tensor):
                weight.copy_(1 + 0.3 * torch.randn_like(weight))
            if isinstance(bias, Tensor):
                bias.copy_(0.2 * torch.randn_like(bias))
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.copy_(0.5 * torch.randn_like(module.running_mean))
                module.running_var.copy_(0.5 + torch.rand_like(module.running_var) * 1.5)


def inputs_for(cfg: ModelConfig, other: bool = False) -> tuple[tuple, dict[str, Tensor]]:
    """``(args, kwargs)`` of the example batch of ``cfg`` (``other=False``) or of its second batch
    (another batch size and length). The mask is a keyword where the model's second parameter is
    something else (GPT-2's ``past_key_values``)."""
    lengths, seq = (cfg.other_lengths, cfg.other_seq) if other else (cfg.lengths, cfg.seq)
    gen = torch.Generator().manual_seed(cfg.seed * 2 + other)
    if cfg.is_conv:
        shape = (len(lengths), 3, seq) if cfg.conv_dims == 1 else (len(lengths), 3, seq, seq)
        return (torch.randn(shape, generator=gen),), {}
    ids = torch.randint(5, cfg.vocab, (len(lengths), seq), generator=gen)
    mask = (torch.arange(seq)[None, :] < torch.tensor(lengths)[:, None]).long()
    ids = ids * mask + _PAD_ID * (1 - mask)
    return ((ids,), {"attention_mask": mask}) if cfg.family == "gpt2" else ((ids, mask), {})


def dynamic_shapes_for(cfg: ModelConfig) -> Any:
    """``"auto"`` (graphopt's default: batch and sequence dims) for token models; batch and spatial
    dims for conv nets, whose ``[B, C, L]`` input the default would read as ``[B, T, D]``."""
    if not cfg.is_conv:
        return "auto"
    return ({0: Dim.AUTO, **{d: Dim.AUTO for d in range(2, 2 + cfg.conv_dims)}},)


# --------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------

OK, FAILED = "ok", "failed"


@dataclass
class CaseOutcome:
    """One config x one pass combination. ``statuses`` maps each pass the manager ran (the combination
    plus any it requires) to its report status; ``failure`` says what went wrong (None: equivalent)."""

    config: ModelConfig
    passes: tuple[str, ...]
    statuses: dict[str, str] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    failure: str | None = None
    dynamic: bool = True
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.failure is None

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": dataclasses.asdict(self.config),
            "config_source": self.config.describe(),
            "passes": list(self.passes),
            "statuses": self.statuses,
            "reasons": self.reasons,
            "failure": self.failure,
            "dynamic": self.dynamic,
            "seconds": round(self.seconds, 3),
        }


@dataclass
class _Captured:
    gm: torch.fx.GraphModule
    args: tuple
    kwargs: dict
    dynamic_shapes: Any
    note: str


def _capture(model: nn.Module, args: tuple, kwargs: dict, dynamic_shapes: Any) -> _Captured:
    """What ``graphopt.optimize`` captures (the same fallback to static shapes), done once per model."""
    if not (isinstance(dynamic_shapes, str) and dynamic_shapes == "auto"):
        return _Captured(capture(model, args, kwargs, dynamic_shapes), args, kwargs, dynamic_shapes, "")
    try:
        spec = auto_dynamic_shapes(model, args, kwargs)
        return _Captured(capture(model, args, kwargs, spec, fallback=False), args, kwargs, spec, "")
    except (CaptureError, TypeError, ValueError) as error:
        return _Captured(capture(model, args, kwargs, None), args, kwargs, None, f"dynamic capture failed: {one_line(error)}")


def _names(passes: Sequence[str | Pass]) -> tuple[str, ...]:
    return tuple(p if isinstance(p, str) else p.name for p in passes)


def _optimize_captured(captured: _Captured, passes: Sequence[str | Pass]) -> OptimizedModule:
    """``graphopt.optimize`` (eager backend, verification on) on an already captured graph: the
    manager never edits the graph it is given, so one capture serves every combination."""
    gm, report = PassManager(passes).run(captured.gm, captured.args, captured.kwargs, Report(capture=captured.note))
    compiled = get_backend("eager")(gm, captured.args, captured.kwargs)
    return OptimizedModule(gm, compiled, report, "eager", dynamic_shapes=captured.dynamic_shapes, inputs=captured_inputs(gm), shape_note=captured.note)


def run_case(cfg: ModelConfig, passes: Sequence[str | Pass]) -> CaseOutcome:
    """One case through ``graphopt.optimize`` itself (its own capture)."""
    return run_config(cfg, [tuple(passes)], share_capture=False)[0]


def run_config(cfg: ModelConfig, combinations: Sequence[Sequence[str | Pass]], *, share_capture: bool = True) -> list[CaseOutcome]:
    """Every combination on the model of ``cfg``: one :class:`CaseOutcome` each, in order.

    ``share_capture`` captures the model once and runs each combination's pass manager on that
    graph (what ``graphopt.optimize`` does after its capture); False calls ``graphopt.optimize`` per
    combination. A build or capture error fails every case with that error.
    """
    start = time.perf_counter()
    try:
        model = build(cfg)
        example, other = inputs_for(cfg), inputs_for(cfg, other=True)
        with torch.no_grad(), inference_view(model):  # the function capture takes: eval mode, no KV cache
            references = [run_graph(model, *example), run_graph(model, *other)]
        captured = _capture(model, *example, dynamic_shapes_for(cfg)) if share_capture else None
    except Exception as error:  # noqa: BLE001 - a fuzz run records every error with its config
        return [CaseOutcome(cfg, _names(c), failure=f"build/capture error: {_error_line(error)}", seconds=time.perf_counter() - start) for c in combinations]
    outcomes = []
    for passes in combinations:
        t0 = time.perf_counter()
        outcome = CaseOutcome(cfg, _names(passes))
        try:
            if captured is not None:
                optimized = _optimize_captured(captured, passes)
            else:
                optimized = optimize(model, list(passes), example[0], example_kwargs=example[1], dynamic_shapes=dynamic_shapes_for(cfg))
            outcome.failure = _check(optimized, outcome, [example, other], references)
        except Exception as error:  # noqa: BLE001
            outcome.failure = f"error: {_error_line(error)}"
        outcome.seconds = time.perf_counter() - t0
        outcomes.append(outcome)
    return outcomes


def _check(optimized: OptimizedModule, outcome: CaseOutcome, batches: list[tuple[tuple, dict]], references: list[Any]) -> str | None:
    """Record the report in ``outcome``; return why the optimized module is not the model, or None."""
    records = optimized.report.records
    outcome.statuses = {r.name: r.status for r in records}
    outcome.reasons = {r.name: r.reason for r in records if r.reason}
    unknown = {n: s for n, s in outcome.statuses.items() if s not in (APPLIED, NOT_APPLICABLE, UNCHANGED)}
    if unknown:
        name, status = next(iter(unknown.items()))
        return f"{name} {status}" + (f": {outcome.reasons.get(name, '')}" if status == ROLLED_BACK else "")
    if optimized.report.warnings:
        return f"budget warning: {optimized.report.warnings[0]}"
    outcome.dynamic = optimized.dynamic_shapes is not None
    applied = [r for r in records if r.status == APPLIED]
    for which, (args, kwargs), reference in zip(("example", "second batch"), batches, references):
        if which == "second batch" and not outcome.dynamic:
            break  # a static capture rejects other shapes by design (InputShapeError)
        with torch.no_grad():
            out = optimized(*args, **kwargs)
        masks = declared_masks(applied, reference, args)
        got, want = flat_outputs(out), flat_outputs(reference)
        if len(got) != len(want):
            return f"wrong output on the {which}: {len(got)} outputs, expected {len(want)}"
        if masks is not None:
            got = [g[m.expand_as(g)] if m is not None else g for g, m in zip(got, masks)]
            want = [w[m.expand_as(w)] if m is not None else w for w, m in zip(want, masks)]
        try:
            assert_close(got, want, max_rel_err=Exact().tol)
        except AssertionError as error:
            return f"wrong output on the {which}: {_error_line(error)}"
    return None


def _error_line(error: BaseException) -> str:
    """The error's type and message, and the innermost graphopt frame that raised it."""
    frames = [f for f in traceback.extract_tb(error.__traceback__) if "graphopt" in f.filename or "/passes/" in f.filename]
    where = f" (at {frames[-1].filename.rsplit('/', 2)[-2:][-1]}:{frames[-1].lineno} in {frames[-1].name})" if frames else ""
    return f"{type(error).__name__}: {one_line(error)}{where}"
