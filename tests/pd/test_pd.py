"""Prefill/decode disaggregation on real vLLM servers: through the proxy, outputs equal a single
server's, and the decode server loads every full chunk of each prompt from the store."""

from __future__ import annotations

import json
import random
import threading
import time
import urllib.error
import urllib.request

import pytest

CHUNK = 32  # the chunk size of every server (tests/pd/conftest.py)


def tokens(count: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 2000) for _ in range(count)]


def post(url: str, path: str, body: dict) -> dict:
    request = urllib.request.Request(
        url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.loads(response.read())


def stream(url: str, path: str, body: dict) -> list[dict]:
    request = urllib.request.Request(
        url + path, data=json.dumps({**body, "stream": True}).encode(), headers={"Content-Type": "application/json"}
    )
    events = []
    with urllib.request.urlopen(request, timeout=300) as response:
        for line in response:
            line = line.strip()
            if line.startswith(b"data: ") and line != b"data: [DONE]":
                events.append(json.loads(line[6:]))
    return events


def completion(prompt: list[int]) -> dict:
    return {"model": "tiny", "prompt": prompt, "max_tokens": 8, "temperature": 0, "logprobs": 2}


def answer(response: dict) -> tuple:
    """What must match between servers: text, tokens and their logprobs (exact floats)."""
    choice = response["choices"][0]
    logprobs = choice["logprobs"]
    return choice["text"], logprobs["tokens"], logprobs["token_logprobs"], logprobs["top_logprobs"]


def cached(response: dict) -> int:
    return (response["usage"].get("prompt_tokens_details") or {}).get("cached_tokens") or 0


def stats(url: str) -> dict:
    with urllib.request.urlopen(url + "/stats", timeout=10) as response:
        return json.loads(response.read())


def full_chunks_but_last_token(prompt: list[int]) -> int:
    return (len(prompt) - 1) // CHUNK * CHUNK


@pytest.mark.parametrize(("proxy", "seed"), [("proxy32", 1000), ("proxy128", 2000)])
def test_one_prefill_and_one_decode_server_answer_as_one_server(pd, proxy, seed):
    """Prefill at block size 32 or 128, decode at 32, chunks of 32 tokens in the store."""
    prompts = [tokens(n, seed + n) for n in (300, 130, 65, 40, 31)]
    for prompt in prompts:
        single = post(pd["baseline"], "/v1/completions", completion(prompt))
        split = post(pd[proxy], "/v1/completions", completion(prompt))
        assert answer(split) == answer(single), f"{len(prompt)}-token prompt"
        # The decode server computed at most the last chunk: the rest came from the store.
        assert cached(split) == full_chunks_but_last_token(prompt), f"{len(prompt)}-token prompt"
    assert stats(pd[proxy])["prefill_fallbacks"] == 0


def test_streaming_through_the_proxy(pd):
    prompt = tokens(200, 3000)
    single = post(pd["baseline"], "/v1/completions", completion(prompt))
    events = stream(pd["proxy32"], "/v1/completions", completion(prompt))
    assert len(events) > 1
    assert "".join(e["choices"][0]["text"] for e in events if e["choices"]) == single["choices"][0]["text"]


def test_chat_through_the_proxy(pd):
    messages = [{"role": "user", "content": " ".join(f"w{i}" for i in range(150))}]
    body = {"model": "tiny", "messages": messages, "max_tokens": 8, "temperature": 0, "logprobs": True}
    single = post(pd["baseline"], "/v1/chat/completions", body)
    split = post(pd["proxy32"], "/v1/chat/completions", body)
    assert split["choices"][0]["message"]["content"] == single["choices"][0]["message"]["content"]
    assert split["choices"][0]["logprobs"] == single["choices"][0]["logprobs"]
    assert cached(split) == full_chunks_but_last_token(list(range(split["usage"]["prompt_tokens"])))


def test_a_failed_prefill_is_recomputed_by_the_decode_server(pd):
    """The proxy's prefill server does not exist: the decode server misses and computes the prompt."""
    prompt = tokens(150, 4000)
    single = post(pd["baseline"], "/v1/completions", completion(prompt))
    split = post(pd["proxy-no-prefill"], "/v1/completions", completion(prompt))
    assert answer(split) == answer(single)
    assert cached(split) == 0
    report = stats(pd["proxy-no-prefill"])
    assert report["prefill_fallbacks"] >= 1 and report["errors"] == 0
    assert not next(s for s in report["servers"] if s["role"] == "prefill")["healthy"]


def test_a_bad_request_gets_the_servers_own_error(pd):
    request = urllib.request.Request(
        pd["proxy32"] + "/v1/completions",
        data=json.dumps({"model": "no-such-model", "prompt": [5, 6, 7], "max_tokens": 2}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=60)
    assert caught.value.code == 404
    assert "no-such-model" in caught.value.read().decode()


def test_a_redis_restart_under_load_costs_misses_never_errors(pd):
    """Requests keep flowing through the proxy while the shared Redis server restarts empty:
    every client gets the single server's answer, and the pair hits again afterwards."""
    prompts = [tokens(260, 5000 + i) for i in range(6)]
    expected = [answer(post(pd["baseline"], "/v1/completions", completion(p))) for p in prompts]
    results: list = [None] * len(prompts)

    def ask(i: int) -> None:
        try:
            results[i] = answer(post(pd["proxy32"], "/v1/completions", completion(prompts[i])))
        except Exception as exc:  # an error reaching the client is what this test is about
            results[i] = exc

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for i, thread in enumerate(threads):
        thread.start()
        if i == 2:
            time.sleep(0.3)
            pd["redis"].stop()
            pd["redis"].start()
    for thread in threads:
        thread.join(300)
    errors = [r for r in results if not isinstance(r, tuple)]
    assert not errors, errors
    for got, want in zip(results, expected, strict=True):
        # The same text and tokens. Logprobs to 1e-4: the decode server batched these requests
        # together, and a batch's rounding differs from one request's (here in the 5th digit).
        assert got[:2] == want[:2]
        assert got[2] == pytest.approx(want[2], abs=1e-4)
    # Afterwards the store works again: a new prompt's chunks go through it.
    prompt = tokens(200, 6000)
    split = post(pd["proxy32"], "/v1/completions", completion(prompt))
    assert answer(split) == answer(post(pd["baseline"], "/v1/completions", completion(prompt)))
    assert cached(split) == full_chunks_but_last_token(prompt)
