"""Evol-Complexity / Evol-Quality data for training Deita scorers: `evol` (grow each seed in rounds
through an OpenAI-compatible endpoint) and `rank` (score all variants of a seed in one request), whose
output `scorer_data.jsonl` is what `deita-ray train scorer` fine-tunes on."""
