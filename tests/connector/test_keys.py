"""Chunk keys: shared where the KV is the same, different wherever it may differ."""

import pytest

pytest.importorskip("vllm")  # the package imports vLLM's base classes

from ucm.connector.vllm import keys  # noqa: E402

FIELDS = {
    "model": "m",
    "revision": None,
    "dtype": "torch.bfloat16",
    "cache_dtype": "torch.bfloat16",
    "layers": 2,
    "kv_heads": 2,
    "head_size": 64,
    "chunk_tokens": 32,
}


def test_keys_chain_over_all_previous_tokens():
    seed = keys.request_seed(keys.namespace_digest(FIELDS))
    tokens = list(range(100))
    base = keys.chunk_keys(seed, tokens, 32)
    assert len(base) == 3  # the trailing 4 tokens make no full chunk
    changed = keys.chunk_keys(seed, [999] + tokens[1:], 32)
    assert all(a != b for a, b in zip(base, changed, strict=True)), "a change in chunk 0 must change every later key"
    tail = keys.chunk_keys(seed, tokens[:64] + [7] * 36, 32)
    assert tail[:2] == base[:2] and tail[2] != base[2]


def test_keys_are_deterministic_and_16_bytes():
    seed = keys.request_seed(keys.namespace_digest(dict(FIELDS)))
    again = keys.request_seed(keys.namespace_digest(dict(reversed(list(FIELDS.items())))))
    assert keys.chunk_keys(seed, list(range(64)), 32) == keys.chunk_keys(again, list(range(64)), 32)
    assert {len(k) for k in keys.chunk_keys(seed, list(range(64)), 32)} == {16}


@pytest.mark.parametrize(
    "field,value",
    [("model", "other"), ("dtype", "torch.float16"), ("cache_dtype", "fp8"), ("layers", 3), ("chunk_tokens", 16)],
)
def test_namespace_separates_what_changes_the_bytes(field, value):
    tokens = list(range(64))
    base = keys.chunk_keys(keys.request_seed(keys.namespace_digest(FIELDS)), tokens, 32)
    other = keys.chunk_keys(keys.request_seed(keys.namespace_digest({**FIELDS, field: value})), tokens, 32)
    assert set(base).isdisjoint(other)


def test_salt_and_lora_start_their_own_chains():
    namespace = keys.namespace_digest(FIELDS)
    tokens = list(range(64))
    plain = keys.chunk_keys(keys.request_seed(namespace), tokens, 32)
    salted = keys.chunk_keys(keys.request_seed(namespace, cache_salt="tenant-a"), tokens, 32)
    lora = keys.chunk_keys(keys.request_seed(namespace, lora="adapter"), tokens, 32)
    assert set(plain).isdisjoint(salted) and set(plain).isdisjoint(lora) and set(salted).isdisjoint(lora)
