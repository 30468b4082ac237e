"""Frontends: every way in (optimize/save/load, capture, the torch.compile backend, the CLI, dump) converges on the canonical IR."""
