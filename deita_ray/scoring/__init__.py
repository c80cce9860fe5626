"""Deita scorers: prompts, backends, the scorer and the Ray Data scoring pipeline."""
