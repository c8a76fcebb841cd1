"""Store keys for token chunks.

A key names the KV of one chunk of ``chunk_tokens`` tokens *given every token before it*: keys
form a chain, ``key[i] = H(key[i-1] || tokens of chunk i)``, seeded with the namespace (what
changes the meaning of the bytes: model, dtype, format) and the request's own extras
(``cache_salt``, LoRA adapter). The chunk size is a setting, not the engine's block size, so
engines with different block sizes share keys when they agree on a common chunk size.

Keys depend on nothing process-specific (no hash seeds), so every process and host computes the
same keys for the same configuration and tokens.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

KEY_BYTES = 16
FORMAT_VERSION = 1  # of the chunk byte layout (docs/format.md); part of every namespace


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=KEY_BYTES).digest()


def namespace_digest(fields: Mapping[str, Any]) -> bytes:
    """Digest of the fields that change what stored KV means (canonical JSON, sorted keys)."""
    canonical = json.dumps({"format": FORMAT_VERSION, **fields}, sort_keys=True, separators=(",", ":"), default=str)
    return _digest(canonical.encode())


def request_seed(namespace: bytes, cache_salt: str | None = None, lora: str | None = None) -> bytes:
    """The chain's starting point for one request: the namespace plus the request's own extras."""
    extras = json.dumps({"salt": cache_salt, "lora": lora}, sort_keys=True).encode()
    return _digest(namespace + extras)


def chunk_keys(seed: bytes, token_ids: Sequence[int], chunk_tokens: int) -> list[bytes]:
    """Keys of every full chunk of ``token_ids`` (a trailing partial chunk has none)."""
    count = len(token_ids) // chunk_tokens
    if count == 0:
        return []
    tokens = np.asarray(token_ids[: count * chunk_tokens], dtype=np.int64).astype("<i4", copy=False).tobytes()
    width = chunk_tokens * 4
    keys = []
    key = seed
    for i in range(count):
        key = _digest(key + tokens[i * width : (i + 1) * width])
        keys.append(key)
    return keys
