"""Rewrite passes (installed as graphopt.passes)."""
