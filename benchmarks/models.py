"""Small models built offline: random weights of a real architecture and a locally trained tokenizer.

The text such a model writes is meaningless, but the arithmetic is real: prefill cost, KV sizes
and the exactness of cached KV are those of a model of that shape. Everything is seeded, so the
same call builds byte-identical files on every machine.

    python benchmarks/models.py PATH [--size tiny|small]
"""

from __future__ import annotations

import argparse
import json
import os
import random

# (hidden, layers, heads, kv heads, intermediate, vocab); "small" has about 100M parameters.
SIZES = {
    "tiny": (128, 2, 4, 2, 256, 2048),
    "small": (768, 12, 12, 4, 2048, 16384),
}
MAX_POSITIONS = 32768
_WORDS = 5000


def corpus_words(seed: int = 0) -> list[str]:
    """A fixed vocabulary of pronounceable made-up words (the tokenizer's training text uses them)."""
    rng = random.Random(seed)
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"]
    words = set()
    while len(words) < _WORDS:
        words.add("".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))))
    return sorted(words)


def make_text(rng: random.Random, words: list[str], count: int) -> str:
    """``count`` words of sentence-like text."""
    out = []
    for i in range(count):
        word = rng.choice(words)
        out.append(word.capitalize() if i == 0 or out[-1].endswith(".") else word)
        if rng.random() < 0.08:
            out[-1] += "."
    return " ".join(out)


def cache_dir(size: str) -> str:
    """Where the benchmarks keep the ``size`` model they build: under the user's cache directory."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "ucm", "bench-models", size)


def build(path: str, size: str = "tiny", seed: int = 0) -> str:
    """Write a model and tokenizer to ``path`` (skipped when an identical build is there); return ``path``."""
    stamp = os.path.join(path, "ucm-model.json")
    spec = {"size": size, "seed": seed, "version": 1}
    if os.path.exists(stamp):
        with open(stamp) as f:
            if json.load(f) == spec:
                return path

    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    hidden, layers, heads, kv_heads, intermediate, vocab = SIZES[size]
    os.makedirs(path, exist_ok=True)
    rng = random.Random(seed)
    words = corpus_words(seed)
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator((make_text(rng, words, 200) for _ in range(2000)), trainer)
    from tokenizers import decoders

    tokenizer.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(path)

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=intermediate,
        max_position_embeddings=MAX_POSITIONS,
        bos_token_id=1,
        eos_token_id=2,
        torch_dtype="bfloat16",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path)
    with open(stamp, "w") as f:
        json.dump(spec, f)
    return path


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path")
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    args = parser.parse_args()
    print(build(args.path, args.size))
