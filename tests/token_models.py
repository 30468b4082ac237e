"""Models the token-reduction tests share: a tiny sentence embedder as users load it (SDPA), and one
whose duplicated tokens stay identical through every layer (no position information)."""

import torch

from graphopt.tools.zoo import SentenceEmbedder


def tiny_embedder(seed: int = 0, layers: int = 3, positions: bool = True):
    """A random-init BERT (4 heads of 16, SDPA as loaded) under masked-mean pooling; without
    ``positions`` the position embeddings are zero, so equal ids give equal tokens in every layer."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.BertConfig(
        num_hidden_layers=layers,
        hidden_size=64,
        num_attention_heads=4,
        intermediate_size=128,
        vocab_size=100,
        max_position_embeddings=64,
        attn_implementation="sdpa",
    )
    bert = transformers.BertModel(config).eval()
    if not positions:
        with torch.no_grad():
            bert.embeddings.position_embeddings.weight.zero_()
    return SentenceEmbedder(bert).eval()


def padded_batch(lengths=(24, 17, 9), seq: int = 24, seed: int = 0):
    """Ids ``[B, seq]`` (CLS = 1 first, SEP = 2 last of each row) and a mask with trailing pads."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 100, (len(lengths), seq), generator=gen)
    mask = torch.zeros(len(lengths), seq, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
        ids[b, 0], ids[b, n - 1] = 1, 2
        ids[b, n:] = 0
    return ids, mask
