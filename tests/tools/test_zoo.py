"""Tests for graphopt.zoo: every model builds, runs, is deterministic and exports."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

from graphopt.tools import zoo
from graphopt.testing import assert_close
from tests_helpers import save_tiny_bert

# vit-s at full size is slow to export; tests use a small variant unless stated. vit-digits
# trains for minutes when its cache is missing: tests use its untrained weights.
SMALL_OVERRIDES = {"vit-s": {"image_size": 64, "num_hidden_layers": 2}, "vit-digits": {"trained": False}}
REAL_WEIGHTS = ("minilm", "minilm-eager")
RANDOM_INIT = [n for n in zoo.list_models() if n not in REAL_WEIGHTS]
EXPORTABLE = [n for n in zoo.list_models() if n not in ("gpt2-tiny", "llama-tiny")]
HF_MODELS = ["minilm", "bert-base", "gpt2-tiny", "llama-tiny", "vit-s", "vit-digits"]
HAS_SENTENCE_TRANSFORMERS = importlib.util.find_spec("sentence_transformers") is not None


def _load(name: str, **kwargs) -> zoo.ZooEntry:
    return zoo.load(name, **{**SMALL_OVERRIDES.get(name, {}), **kwargs})


def _primary(out) -> torch.Tensor:
    """The main tensor of a model output (a tensor, or a ModelOutput's first field)."""
    return out if isinstance(out, torch.Tensor) else out[0]


@torch.no_grad()
def _run(entry: zoo.ZooEntry) -> torch.Tensor:
    return _primary(entry.model(*entry.example_inputs))


def _call_targets(exported) -> set[str]:
    return {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}


# ---------------------------------------------------------------- registry


def test_registry_is_consistent():
    names = zoo.list_models()
    assert names == list(zoo.MODELS)
    assert set(names) == {
        "minilm",
        "minilm-eager",
        "bert-base",
        "gpt2-tiny",
        "llama-tiny",
        "llama-long",
        "bert-long",
        "vit-s",
        "vit-digits",
        "convnet-bn",
        "preln-tiny",
    }
    assert all(desc and "\n" not in desc for desc in zoo.MODELS.values())


def test_unknown_model_error_lists_known_names():
    with pytest.raises(zoo.ZooError) as info:
        zoo.load("foo")
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert "\n" not in message
    assert message.startswith("unknown zoo model 'foo'; known: ")
    assert all(name in message for name in zoo.list_models())


def test_unknown_override_is_rejected():
    with pytest.raises(zoo.ZooError, match="image_size"):
        zoo.load("preln-tiny", image_size=32)


# ---------------------------------------------------------------- every model


@pytest.mark.parametrize("name", zoo.list_models())
def test_loads_and_runs(name):
    entry = _load(name)
    assert entry.name == name
    assert entry.description == zoo.MODELS[name]
    assert entry.kind in {"encoder", "decoder", "vision", "conv"}
    assert not entry.model.training
    assert isinstance(entry.example_inputs, tuple)
    if entry.dynamic_shapes is not None:
        assert len(entry.dynamic_shapes) == len(entry.example_inputs)
    assert (entry.tokenizer is not None) == (name in REAL_WEIGHTS)
    out = _run(entry)
    assert out.is_floating_point() and torch.isfinite(out).all()


@pytest.mark.parametrize("name", zoo.list_models())
def test_deterministic_and_seed_dependent(name):
    state = torch.random.get_rng_state()
    a, b = _load(name, seed=0), _load(name, seed=0)
    assert torch.equal(torch.random.get_rng_state(), state), "load() must not touch the global RNG"
    assert a.model is not b.model
    for x, y in zip(a.example_inputs, b.example_inputs):
        assert torch.equal(x, y)
    out_a = _run(a)
    assert torch.equal(out_a, _run(b))
    if name in RANDOM_INIT:
        assert not torch.allclose(out_a, _run(_load(name, seed=1)))


@pytest.mark.parametrize("name", EXPORTABLE)
def test_exports_with_dynamic_shapes(name):
    entry = _load(name)
    exported = torch.export.export(entry.model, entry.example_inputs, dynamic_shapes=entry.dynamic_shapes, strict=False)
    assert_close(_primary(exported.module()(*entry.example_inputs)), _run(entry))
    if entry.dynamic_shapes is None:
        return
    # Re-run the exported program at a different batch (and sequence) size.
    if entry.kind in ("conv", "vision"):  # images: batch dim only
        inputs = (entry.example_inputs[0][:1].repeat(3, 1, 1, 1),)
    else:  # token ids (and an attention mask)
        inputs = tuple(x[:, :9].repeat(3, 1) for x in entry.example_inputs)
    with torch.no_grad():
        expected = _primary(entry.model(*inputs))
    assert_close(_primary(exported.module()(*inputs)), expected)


def test_vit_s_full_size_forward():
    entry = zoo.load("vit-s")
    assert entry.model.config.num_hidden_layers == 12 and entry.model.config.hidden_size == 384
    assert entry.example_inputs[0].shape == (1, 3, 224, 224)
    out = _run(entry)
    assert out.shape == (1, 197, 384) and torch.isfinite(out).all()


# ---------------------------------------------------------------- attention implementation


def test_minilm_attn_implementation_switches_graph():
    default = _load("minilm")  # as users load it: transformers' default, SDPA
    eager = _load("minilm-eager")  # the explicit attention
    assert default.model.bert.config._attn_implementation == "sdpa"
    assert _load("minilm", attn_implementation="eager").model.bert.config._attn_implementation == "eager"
    default_ops = _call_targets(torch.export.export(default.model, default.example_inputs, strict=False))
    eager_ops = _call_targets(torch.export.export(eager.model, eager.example_inputs, strict=False))
    assert "aten.scaled_dot_product_attention.default" in default_ops
    assert "aten.softmax.int" not in default_ops
    assert "aten.scaled_dot_product_attention.default" not in eager_ops
    assert {"aten.softmax.int", "aten.matmul.default"} <= eager_ops
    assert_close(_run(eager), _run(default))


@pytest.mark.parametrize("name", HF_MODELS)
def test_attn_implementation_override(name):
    default, eager = _load(name, attn_implementation="sdpa"), _load(name, attn_implementation="eager")
    hf_model = {"minilm": lambda m: m.bert, "vit-digits": lambda m: m.vit}.get(name, lambda m: m)
    assert hf_model(default.model).config._attn_implementation == "sdpa"
    assert hf_model(eager.model).config._attn_implementation == "eager"
    assert_close(_run(eager), _run(default))


def test_preln_tiny_uses_explicit_attention_and_masks_padding():
    entry = _load("preln-tiny")
    ops = _call_targets(torch.export.export(entry.model, entry.example_inputs, strict=False))
    assert "aten.scaled_dot_product_attention.default" not in ops
    assert {"aten.softmax.int", "aten.matmul.default", "aten.rsqrt.default"} <= ops
    ids, mask = entry.example_inputs
    assert (mask == 0).any()
    changed = ids.masked_fill(mask == 0, 7)
    with torch.no_grad():
        a, b = entry.model(ids, mask), entry.model(changed, mask)
    keep = mask.bool()
    assert_close(a[keep], b[keep])
    assert a.shape == (*ids.shape, 64)


# ---------------------------------------------------------------- model specifics


def test_gpt2_tiny_is_tied_and_caches():
    model = _load("gpt2-tiny").model
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.config.use_cache is True


def test_convnet_bn_has_nontrivial_batchnorm():
    model = _load("convnet-bn").model
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert {type(m) for m in bns} == {nn.BatchNorm1d, nn.BatchNorm2d}
    assert any(isinstance(m, nn.Conv1d) for m in model.modules())
    for bn in bns:
        assert bn.running_mean.abs().min() > 0
        assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))
        assert (bn.running_var > 0).all()
        assert not torch.allclose(bn.weight, torch.ones_like(bn.weight))
        assert bn.bias.abs().min() > 0


def test_minilm_shapes_and_normalisation():
    entry = _load("minilm")
    ids, mask = entry.example_inputs
    assert ids.shape[0] == 8 and ids.dtype == mask.dtype == torch.int64
    assert (mask == 0).any(), "example sentences should need padding"
    out = _run(entry)
    assert out.shape == (8, 384)
    assert_close(out.norm(dim=1), torch.ones(8))


@pytest.mark.skipif(not HAS_SENTENCE_TRANSFORMERS, reason="sentence_transformers not installed")
def test_minilm_matches_sentence_transformers():
    from sentence_transformers import SentenceTransformer

    sentences = zoo.real_sentences(64)
    reference = SentenceTransformer(str(zoo.minilm_dir()), device="cpu").encode(sentences, normalize_embeddings=True, convert_to_tensor=True)
    entry = _load("minilm")
    with torch.no_grad():
        ours = entry.model(*zoo.tokenize(entry.tokenizer, sentences))
    assert zoo.cosine_similarity_rows(ours, reference.cpu()).min() > 0.9999


@pytest.mark.parametrize("name", ["llama-long", "bert-long"])
def test_long_context_models_capture_with_sdpa(name):
    """The long-context entries: transformers' default SDPA attention, short examples, and a graph
    captured on them that takes a longer sequence (its sequence dim is dynamic)."""
    import graphopt

    entry = _load(name)
    config = entry.model.config
    assert config._attn_implementation == "sdpa"
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (256, 4, 4)
    assert config.max_position_embeddings == {"llama-long": 16384, "bert-long": 8192}[name]
    if name == "llama-long":
        assert config.num_key_value_heads == 2 and config.head_dim == 64 and config.use_cache is False
    assert all(x.shape == (2, 64) for x in entry.example_inputs)
    opt = graphopt.optimize(entry.model, ["canonicalize"], entry.example_inputs)
    assert "aten.scaled_dot_product_attention.default" in _call_targets(opt.graph_module)
    longer = tuple(x[:1].repeat(1, 3) for x in entry.example_inputs)  # [1, 192]: another batch and length
    with torch.no_grad():
        assert_close(_primary(opt(*longer)), _primary(entry.model(*longer)))


def test_vit_digits_untrained_is_a_capturable_classifier():
    """The untrained path (no cache, no training): [B, 10] logits on real digits, SDPA attention,
    and graphopt captures it with a dynamic batch."""
    import graphopt

    entry = _load("vit-digits")
    config = entry.model.vit.config
    assert config._attn_implementation == "sdpa"
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.num_labels) == (192, 4, 3, 10)
    assert (config.image_size // config.patch_size) ** 2 >= 64
    (images,) = entry.example_inputs
    test_images, _ = zoo.digits_data("test")
    assert torch.equal(images, test_images[:8])
    out = _run(entry)
    assert isinstance(out, torch.Tensor) and out.shape == (8, 10) and torch.isfinite(out).all()
    gm = graphopt.capture(entry.model, entry.example_inputs, dynamic_shapes=entry.dynamic_shapes)
    assert "aten.scaled_dot_product_attention.default" in _call_targets(gm)
    with torch.no_grad():
        assert_close(gm(images), out)
        assert_close(gm(test_images[8:11]), entry.model(test_images[8:11]))
    assert 0.0 <= zoo.top1(entry.model, *zoo.digits_data("test")) <= 1.0


def test_digits_data_is_deterministic_with_the_stated_sizes():
    (train_x, train_y), (test_x, test_y) = zoo.digits_data("train"), zoo.digits_data("test")
    size = zoo.VIT_DIGITS_CONFIG["image_size"]
    assert train_x.shape == (1397, 1, size, size) and test_x.shape == (400, 1, size, size)
    assert train_y.shape == (1397,) and test_y.shape == (400,)
    assert train_x.dtype == torch.float32 and train_y.dtype == torch.int64
    assert train_x.min() >= -1 and train_x.max() <= 1
    assert torch.bincount(test_y, minlength=10).min() >= 39  # stratified: about 40 of each digit
    again_x, again_y = zoo.digits_data("train")
    assert torch.equal(again_x, train_x) and torch.equal(again_y, train_y)
    with pytest.raises(ValueError):
        zoo.digits_data("validation")


def test_vit_digits_weights_come_from_the_cache(tmp_path, monkeypatch):
    """``load("vit-digits")`` reads the cache file named by the config + recipe hash (no training
    when it is there); another recipe names another file."""
    monkeypatch.setenv("GRAPHOPT_CACHE", str(tmp_path))
    path = zoo.vit_digits_cache_path()
    assert path.parent == tmp_path and path.name.startswith("vit-digits-") and path.suffix == ".pt"
    assert zoo.vit_digits_cache_path(zoo.DigitsRecipe(epochs=1)) != path
    untrained = _load("vit-digits", seed=3)
    payload = {"state_dict": untrained.model.vit.state_dict(), "train_seconds": 1.0, "threads": 1, "test_top1": 0.1}
    torch.save(payload, path)
    loaded = zoo.load("vit-digits")  # seed 0: only the cached weights make it equal the seed-3 model
    assert_close(_run(loaded), _run(untrained))
    assert zoo.train_vit_digits()["trained_now"] is False


# ---------------------------------------------------------------- text workload


def test_real_sentences_deterministic():
    first, second = zoo.real_sentences(), zoo.real_sentences()
    assert first == second and len(first) == 64
    assert len(set(first)) == 64
    for s in first:
        assert s == " ".join(s.split())
        assert 5 <= len(s.split()) <= 60
    assert zoo.real_sentences(10) == first[:10]
    with pytest.raises(ValueError):
        zoo.real_sentences(10_000)


def test_tokenize_padding():
    tokenizer = _load("minilm").tokenizer
    sentences = zoo.real_sentences(64)
    ids, mask = zoo.tokenize(tokenizer, sentences)
    lengths = mask.sum(dim=1)
    assert ids.dtype == mask.dtype == torch.int64
    assert ids.shape == mask.shape == (64, lengths.max().item())
    assert 15 <= lengths.double().mean() <= 30, "sentences should average 15-30 MiniLM tokens"
    assert lengths.min() < lengths.max()
    for row, n in enumerate(lengths.tolist()):
        assert mask[row, :n].all() and not mask[row, n:].any()
        assert (ids[row, n:] == tokenizer.pad_token_id).all()

    fixed_ids, fixed_mask = zoo.tokenize(tokenizer, sentences, pad_to=128)
    assert fixed_ids.shape == fixed_mask.shape == (64, 128)
    assert torch.equal(fixed_ids[:, : ids.shape[1]], ids)
    assert torch.equal(fixed_mask.sum(dim=1), lengths)

    short_ids, short_mask = zoo.tokenize(tokenizer, sentences, max_length=8)
    assert short_ids.shape == (64, 8) and short_mask.all()
    assert (short_ids[:, -1] == tokenizer.sep_token_id).all()


def test_embedding_comparisons():
    a = torch.nn.functional.normalize(torch.randn(16, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    assert_close(zoo.cosine_similarity_rows(a, 3 * a), torch.ones(16, dtype=torch.float64))
    assert_close(zoo.cosine_similarity_rows(a, -a), -torch.ones(16, dtype=torch.float64))
    assert zoo.nearest_neighbour_agreement(a, 2 * a) == 1.0
    # Swapping rows 0 and 1 changes who is whose neighbour.
    swapped = a.clone()
    swapped[[0, 1]] = a[[1, 0]]
    assert zoo.nearest_neighbour_agreement(a, swapped) < 1.0
    with pytest.raises(ValueError):
        zoo.cosine_similarity_rows(a, a[:4])


# ---------------------------------------------------------------- users' Hugging Face folders


@pytest.fixture(scope="module")
def hf_bert(tmp_path_factory):
    return save_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


def test_load_hf_is_the_model_as_users_load_it(hf_bert):
    from transformers import AutoModel, AutoTokenizer

    entry = zoo.load_hf(hf_bert)
    assert entry.name == f"hf:{hf_bert}" and entry.kind == "encoder" and str(hf_bert) in entry.description
    assert not entry.model.training
    assert entry.model.config._attn_implementation == "sdpa"  # transformers' default, not forced to eager
    reference = AutoModel.from_pretrained(hf_bert, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(hf_bert, local_files_only=True)
    ids, mask = entry.example_inputs
    expected_ids, expected_mask = zoo.tokenize(tokenizer, zoo.real_sentences(8))
    assert torch.equal(ids, expected_ids) and torch.equal(mask, expected_mask)
    assert ids.shape[0] == 8 and mask.sum(dim=1).min() < ids.shape[1]  # padded to the longest
    with torch.no_grad():
        ours, theirs = entry.model(ids, mask), reference(ids, mask)
    assert_close(ours.last_hidden_state, theirs.last_hidden_state)
    assert_close(ours.pooler_output, theirs.pooler_output)


def test_load_hf_texts_make_the_example_batch_and_shapes_are_dynamic(hf_bert):
    texts = ["A short one.", "This second sentence is quite a bit longer than the first one is."]
    entry = zoo.load_hf(hf_bert, texts=texts)
    ids, mask = entry.example_inputs
    assert ids.shape[0] == 2 and mask[0].sum() < mask[1].sum() == ids.shape[1]
    assert torch.equal(ids, zoo.tokenize(entry.tokenizer, texts)[0])
    exported = torch.export.export(entry.model, entry.example_inputs, dynamic_shapes=entry.dynamic_shapes, strict=False)
    other = zoo.tokenize(entry.tokenizer, zoo.real_sentences(3))
    with torch.no_grad():
        assert_close(exported.module()(*other).last_hidden_state, entry.model(*other).last_hidden_state)


def test_load_hf_errors_are_zoo_errors_of_one_line(tmp_path, hf_bert):
    (tmp_path / "no_config").mkdir()
    (tmp_path / "bad_config").mkdir()
    (tmp_path / "bad_config" / "config.json").write_text("{}")
    (tmp_path / "file.txt").write_text("x")
    no_tokenizer = save_tiny_bert(tmp_path / "no_tokenizer", tokenizer=False)
    cases = {
        tmp_path / "missing": "no such folder",
        tmp_path / "file.txt": "is a file, not a Hugging Face model folder",
        tmp_path / "no_config": "is not a Hugging Face model folder: it has no config.json",
        tmp_path / "bad_config": "transformers cannot load the model in",
        no_tokenizer: "has no tokenizer",
        "": "no folder given",
    }
    for path, message in cases.items():
        with pytest.raises(zoo.ZooError, match=message) as info:
            zoo.load_hf(path)
        assert "\n" not in str(info.value)
    with pytest.raises(zoo.ZooError, match="no text given"):
        zoo.load_hf(hf_bert, texts=[])
