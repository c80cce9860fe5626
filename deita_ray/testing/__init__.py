"""Test and benchmark helpers: tiny-model builders and small pools.

Never imported by the runtime pipeline (nothing under ``deita_ray/`` outside this package imports it;
tests/test_models.py checks that). It may import the runtime, not the other way round.

* `deita_ray.testing.tiny_llama`: `build_tiny_llama`, a tiny random LLaMA with a trained tokenizer.
* `deita_ray.testing.pools`: small input pools cut from the bundled demo pool.
* `deita_ray.testing.openai_server`: a local OpenAI-compatible chat server with deterministic fault
  injection (`serve`, `stats`, `reset`, `planned_faults`), for the chat client and the evol stages.

The models the demo needs at runtime (SmolLM2, MiniLM) are in `deita_ray.bundled_models`.
"""
