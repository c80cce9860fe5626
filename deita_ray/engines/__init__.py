"""Model access shared by stages: loading and running models the same way wherever a stage needs them.

A stage (scoring, embedding, the coming Evol generation) imports what it needs from here and never from
another stage, so stages stay independent of each other:

* `deps`: the one lazy import of an optional dependency (`require`, with the pip line that fixes it)
  and of a registered implementation (`registered_class`);
* `hf`: transformers/torch loading (tokenizer, model context, device, dtype, threads, padded batches);
* `vllm`: offline vLLM engine set-up and teardown;
* `openai_client`: an OpenAI-compatible endpoint: retries, backoff, API-key handling and redaction,
  and the `/v1/completions` client of the scorer backend;
* `chat_client`: `/v1/chat/completions` with a request cache and a rate limiter shared by an actor
  pool (Evol generation and ranking), built on `openai_client`;
* `batching`: length-bucketed batching for padded forward passes.

Nothing here imports torch, transformers, vLLM or openai at module import time.
"""
