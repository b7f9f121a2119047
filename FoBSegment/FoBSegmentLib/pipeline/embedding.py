"""Slices -> embeddings, through the cache: no slice is ever encoded twice."""

from __future__ import annotations

import numpy as np

from ..backbones.base import EMBED_SHAPE, Backbone
from ..embedding_cache import EmbeddingCache


class Embedder:
    """A backbone's encoder behind an :class:`EmbeddingCache`.

    Every embedding handed out has been through the cache's storage precision, whether it was
    just encoded or read back, so a run gives the same masks from a cold or a warm cache."""

    def __init__(self, backbone: Backbone, cache: EmbeddingCache, batch_size: int | None = None):
        self.backbone = backbone
        self.cache = cache
        self.batch_size = batch_size or (8 if backbone.device.type == "cuda" else 1)
        self.encoded_count = 0

    def cache_id(self) -> str:
        return self.backbone.weights_id() + self.backbone.preprocess_id()

    def embed(self, stack: np.ndarray, norm, indices, keys: dict | None = None, on_encoded=None) -> dict:
        """Embeddings (256, 64, 64) of the given stack slices, encoding only those not cached.

        ``keys`` (slice index -> cache key) spares a run re-hashing a slice it asks for again;
        ``on_encoded(n)`` is called after each encoded batch (progress and cancel checks)."""
        out, todo = {}, []
        for i in indices:
            key = keys.get(i) if keys is not None else None
            x = None
            if key is None:
                x = self.backbone.prepare(norm.apply(stack[i]))
                key = EmbeddingCache.key(x, self.cache_id())
                if keys is not None:
                    keys[i] = key
            e = self.cache.get(key, shape=EMBED_SHAPE)
            if e is None and x is None:  # evicted since it was hashed
                x = self.backbone.prepare(norm.apply(stack[i]))
            if e is None:
                todo.append((i, x, key))
            else:
                out[i] = e
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start:start + self.batch_size]
            emb = self.backbone.encode(np.stack([x for _, x, _ in chunk]))
            self.encoded_count += len(chunk)
            for (i, _, key), e in zip(chunk, emb):
                out[i] = self.cache.put(key, e)
            if on_encoded is not None:
                on_encoded(len(chunk))
        return out
