"""sentence-transformers embedder: `SentenceTransformer.encode` with the model's own pooling and
normalisation (e.g. all-MiniLM-L6-v2: mean pooling, then L2 normalisation)."""

from __future__ import annotations

from collections.abc import Sequence

from deita_ray.embedding.embedders import Embedder, EmbedResult
from deita_ray.engines.deps import require
from deita_ray.engines.hf import empty_cuda_cache, resolve_device, resolve_torch_dtype, set_torch_threads

INSTALL_HINT = "pip install sentence-transformers"


class SentenceTransformersEmbedder(Embedder):
    def setup(self) -> None:
        import torch

        st = require("sentence_transformers", INSTALL_HINT, needed_for="this embedder")
        device = resolve_device(self.config.device)
        set_torch_threads(self.config.torch_threads)
        self.net = st.SentenceTransformer(self.model, device=device)
        dtype = resolve_torch_dtype(self.config.dtype, device)
        if dtype != torch.float32:
            self.net = self.net.to(dtype)
        if self.config.max_length is not None:
            self.net.max_seq_length = self.config.max_length
        self.max_length = self.net.max_seq_length
        # sentence-transformers 6 renamed get_sentence_embedding_dimension (kept, deprecated).
        dimension = (
            getattr(self.net, "get_embedding_dimension", None) or self.net.get_sentence_embedding_dimension
        )
        self.dim = int(dimension() or 0)
        # The model's first module tokenizes with truncation at max_seq_length (special tokens included);
        # the same tokenizer, untruncated, tells which texts were cut and how many tokens were embedded.
        self.tokenizer = getattr(self.net, "tokenizer", None)

    def embed(self, texts: Sequence[str]) -> EmbedResult:
        # As a tensor, upcast here: numpy has no bfloat16, so a bfloat16 model could not convert itself.
        vectors = self.net.encode(
            list(texts), batch_size=self.batch_size, convert_to_tensor=True, show_progress_bar=False
        )
        vectors = vectors.float().cpu().numpy().reshape(len(texts), -1)
        if not self.dim:
            self.dim = vectors.shape[1]
        if self.tokenizer is not None and self.max_length:
            lengths = [
                len(row)
                for row in self.tokenizer(list(texts), add_special_tokens=True, verbose=False)["input_ids"]
            ]
            truncated = [n > self.max_length for n in lengths]
            tokens = [min(n, self.max_length) for n in lengths]
        else:
            truncated, tokens = [False] * len(texts), [0] * len(texts)
        return EmbedResult(vectors, truncated, tokens, [None] * len(texts))

    def teardown(self) -> None:
        self.net = None
        empty_cuda_cache()
