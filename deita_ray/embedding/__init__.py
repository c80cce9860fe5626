"""Deita's embeddings ("Repr Filter" input): conversation rendering, embedders and the Ray Data
embedding pipeline (`deita-ray embed`)."""
