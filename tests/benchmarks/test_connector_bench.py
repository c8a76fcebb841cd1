"""The main job's workload and settings (benchmarks/connector_bench.py), without running engines."""

from __future__ import annotations

import itertools
import math

import connector_bench as bench
import pytest


def test_no_prompt_ends_on_or_one_token_past_a_block_boundary(tiny_model):
    # One past: ExampleConnector could never hit the prompt (its save and its lookup round to
    # different whole blocks); on the boundary: a whole block would be computed behind the cached
    # prefix. Either would skew the overhead comparison. (Without the rule, some of these 70
    # prompts do end there.)
    block = 32
    settings = bench.parse_args(
        ["--docs", "4", "--questions", "8", "--doc-tokens", "300", "--block-size", str(block), "--dtype", "float32"]
        + ["--cold-docs", "5"]
    )
    workload = bench.build_workload(settings, tiny_model)
    prompts = [p.tokens for p in workload.prompts + workload.new_questions] + [workload.chunked]
    prompts += workload.cold_check
    assert len(prompts) == 70
    tails = [len(tokens) % block for tokens in prompts]
    assert all(tail not in (0, 1) for tail in tails), tails
    # The questions still differ in length: the rule redraws a question, it does not pad prompts.
    assert len(set(tails)) > 3


def test_questions_share_their_document_prefix(tiny_model):
    settings = bench.parse_args(["--docs", "2", "--questions", "3", "--doc-tokens", "300", "--dtype", "float32"])
    workload = bench.build_workload(settings, tiny_model)
    by_doc: dict[int, list[list[int]]] = {}
    for prompt in workload.prompts + workload.new_questions:
        by_doc.setdefault(prompt.doc, []).append(prompt.tokens)
    for prompts in by_doc.values():
        assert len(prompts) == 6
        assert len({tuple(p[:300]) for p in prompts}) == 1
        assert len({tuple(p) for p in prompts}) == 6


@pytest.mark.parametrize("value", ["48", "16", "0"])
def test_a_block_size_cpu_attention_cannot_run_is_refused_by_name(value, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--block-size", value])
    err = capsys.readouterr().err
    assert "--block-size must be a positive multiple of 32" in err and value in err


def test_the_default_block_size_is_32_and_128_is_accepted():
    assert bench.parse_args([]).block_size == 32
    assert bench.parse_args(["--block-size", "128"]).block_size == 128


def test_page_in_reads_every_file_of_a_store_once(tmp_path):
    # The warm and fresh passes read each store before timing its loads; a file it skipped would
    # leave that connector's loads reading from the disk while the other's do not.
    sizes = {"a/b/one": 3 << 20, "a/two": 1, "three": 0, "c/d/e/four": (1 << 20) + 7}
    for name, size in sizes.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * size)
    total, _ = bench.page_in(str(tmp_path))
    assert total == sum(sizes.values()) == bench.directory_bytes(str(tmp_path))


def test_page_in_is_off_by_default_and_reported_when_on():
    assert bench.parse_args([]).page_in is False
    line = bench.paged_in_line(bench.parse_args([]), [])
    assert "not read ahead" in line
    warm = bench.Pass("ucm-warm", "ucm", paged_in=[(4 << 20, 0.0), (2 << 20, 1 << 20)])
    line = bench.paged_in_line(bench.parse_args(["--page-in"]), [warm, bench.Pass("none", None)])
    assert "2 times" in line and bench.mib(3 << 20) in line and bench.mib(1 << 19) in line


def test_the_report_says_what_ucm_engines_prewarmed():
    fresh = [bench.Pass(f"ucm-fresh-{i}", "ucm", prewarm=(float(i << 20), 0.5)) for i in (1, 3)]
    line = bench.prewarm_line(fresh)
    assert "2 warm and fresh engines" in line and bench.mib(2 << 20) in line and "0.50 s" in line
    off = bench.prewarm_line([bench.Pass("ucm-warm", "ucm", prewarm=(0.0, 0.0))])
    assert "read nothing back" in off


def test_the_cold_check_prefills_documents_of_its_own(tiny_model):
    # Its documents must be new to both engines: one seen before would be a prefix-cache or store
    # hit, not the cold prefill whose cost the check measures.
    settings = bench.parse_args(["--docs", "2", "--doc-tokens", "300", "--cold-docs", "3", "--dtype", "float32"])
    workload = bench.build_workload(settings, tiny_model)
    heads = {tuple(p[:300]) for p in workload.cold_check}
    assert len(heads) == 3
    assert not heads & {tuple(p.tokens[:300]) for p in workload.prompts}
    assert not heads & {tuple(workload.chunked[:300])}
    # Nor a throughput prompt (1000 tokens here): the first 300 tokens of each must differ.
    assert not {tuple(p[:300]) for p in workload.cold_check} & {tuple(p[:300]) for b in workload.throughput for p in b}
    assert all(len(p) > 300 for p in workload.cold_check)  # a document and its question


def test_cold_docs_defaults_and_bad_values():
    assert bench.parse_args([]).cold_docs == 24
    assert bench.parse_args(["--quick"]).cold_docs == 1
    assert bench.parse_args(["--cold-docs", "0"]).cold_docs == 0


def test_the_help_names_the_defaults_a_run_uses(capsys):
    # The help once said 8 fresh processes while a run started 12.
    with pytest.raises(SystemExit):
        bench.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    defaults, quick = bench.parse_args([]), bench.parse_args(["--quick"])
    for option in ("--docs", "--doc-tokens", "--questions", "--fresh", "--reloads", "--cold-docs", "--repeats"):
        name = option.lstrip("-").replace("-", "_")
        described = text.split(f"{option} {name.upper()} ", 1)[1]  # not the usage
        said = described.split("(default: ", 1)[1]
        assert said.startswith(f"{getattr(defaults, name)}; {getattr(quick, name)} with --quick)"), option
    assert (quick.docs, quick.questions, quick.doc_tokens) == (2, 2, 1500)  # the smoke test stays small
    assert f"{quick.docs} documents x {quick.questions} questions x {quick.doc_tokens} tokens" in text


def test_the_command_line_wins_over_quick():
    settings = bench.parse_args(["--quick", "--fresh", "5", "--docs", "4"])
    assert (settings.fresh, settings.docs, settings.reloads, settings.size) == (5, 4, 2, "tiny")


def test_a_negative_cold_docs_is_refused_by_name(capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--cold-docs", "-1"])
    assert "--cold-docs must be 0 or more" in capsys.readouterr().err


def test_the_cost_of_saving_rests_on_the_cold_check_and_else_on_the_cold_pass():
    def rows(*seconds, hooks=(), waits=()):
        return [
            {
                "ttft": value,
                "counters": {bench.STEP_SECONDS: hook} if hook is not None else {},
                **({"wait_s": wait} if wait is not None else {}),
            }
            for value, hook, wait in itertools.zip_longest(seconds, hooks, waits)
        ]

    # Two documents, two questions each in the cold pass: the first prompts are rows 0 and 2. UCM's
    # rows carry the time its engine spent in the connector's hooks, the cold check's its waits too.
    passes = {
        "none": bench.Pass("none", None, rows(40.0, 0.5, 44.0, 0.5)),
        "ucm-cold": bench.Pass("ucm-cold", "ucm", rows(41.0, 0.6, 43.0, 0.6, hooks=(0.04, 0.0, 0.05, 0.0))),
        "cold-check-none": bench.Pass("cold-check-none", None, rows(42.0, 45.0)),
        "cold-check-ucm": bench.Pass(
            "cold-check-ucm", "ucm", rows(42.5, 45.1, hooks=(0.045, 0.05), waits=(0.03, 0.02))
        ),
    }
    assert bench.cold_prefills(passes, [0, 2]) == [
        ("cold check, document 1", 42.0, 42.5, 0.045, 0.03),
        ("cold check, document 2", 45.0, 45.1, 0.05, 0.02),
    ]
    # A cold check that failed, or did not run, leaves the cold pass's first prompts.
    passes["cold-check-ucm"].error = "engine died"
    assert bench.cold_prefills(passes, [0, 2]) == [
        ("cold pass, document 1", 40.0, 41.0, 0.04, 0.0),
        ("cold pass, document 2", 44.0, 43.0, 0.05, 0.0),
    ]
    del passes["cold-check-ucm"], passes["cold-check-none"]
    assert len(bench.cold_prefills(passes, [0, 2])) == 2


def test_a_cold_check_prefill_counts_the_waits_for_saves_but_the_last():
    steps = [
        {"seconds": 1.5, "drain_s": 0.02, "done": False},
        {"seconds": 1.6, "drain_s": 0.03, "done": False},
        {"seconds": 1.7, "drain_s": 0.05, "done": True, "token": 7, "logprob": -1.25},
    ]
    row = bench.cold_check_row(steps)
    # The last wait comes after the token: a request's TTFT does not include it.
    assert row["ttft"] == pytest.approx(1.5 + 1.6 + 1.7 + 0.02 + 0.03)
    assert (row["wait_s"], row["after_s"]) == (pytest.approx(0.05), 0.05)
    assert (row["steps"], row["token"], row["logprob"]) == (3, 7, -1.25)
    passes = {
        "cold-check-none": bench.Pass("cold-check-none", None, [{"token": 7, "logprob": -1.25}] * 2),
        "cold-check-ucm": bench.Pass("cold-check-ucm", "ucm", [row, {**row, "logprob": -1.5}]),
    }
    assert bench.same_in_check(passes) == "1/2"


def test_paired_prefills_give_a_paired_interval():
    # Each document is slower or faster for both ways alike; UCM is 1 s slower on every one. Redrawn
    # as pairs, the interval sees that; redrawn apart, the spread between documents hides it.
    none = [40.0, 44.0, 42.0, 46.0, 41.0, 45.0]
    ucm = [t + 1.0 for t in none]
    low, high = bench.ratio_interval(ucm, none, paired=True)
    assert 1.0 < low <= high < 1.04
    low, high = bench.ratio_interval(ucm, none)
    assert low < 1.0 < high


def test_throughput_pairs_the_rounds_both_ways_ran():
    # Round by round the machine speeds up and slows down for both ways alike, and UCM is 2% slower
    # in each. The last round's UCM engine failed: its no-connector run is left out, not compared
    # with nothing.
    # The rounds ran in two pairs of engine processes, UCM 2% slower in the first and 4% in the second.
    none = [356.0, 379.0, 371.0, 400.0, 362.0, 388.0]
    ucm = [value * 0.98 for value in none[:3]] + [value * 0.96 for value in none[3:]]
    pair = [1, 1, 1, 2, 2, 2]
    runs = {
        "none": [{"tokens_per_s": v, "pair": p} for v, p in zip(none + [300.0], pair + [2], strict=True)],
        "ucm": [{"tokens_per_s": v, "pair": p} for v, p in zip(ucm, pair, strict=True)],
    }
    change, (low, high), rounds, per_pair = bench.throughput_change(runs)
    assert rounds == 6
    assert change == pytest.approx(sum(ucm) / sum(none) - 1)
    assert per_pair == pytest.approx({1: -0.02, 2: -0.04})
    assert 0.95 < low <= high < 0.99
    assert bench.change_interval((low, high)) == f"{100 * (low - 1):+.1f}% to {100 * (high - 1):+.1f}%"
    # Nothing to compare when one way never ran.
    change, bounds, rounds, per_pair = bench.throughput_change({"none": runs["none"], "ucm": []})
    assert rounds == 0 and math.isnan(change) and bench.change_interval(bounds) == "n/a" and per_pair == {}


def test_the_throughput_check_runs_in_pairs_of_engines_and_they_are_planned():
    default, quick = bench.parse_args([]), bench.parse_args(["--quick"])
    assert default.repeats == 24 and quick.repeats == 2
    # Each throughput pair is two more engines; a single repeat runs in one pair.
    one = bench.parse_args(["--repeats", "1"])
    assert bench.engines_planned(default) - bench.engines_planned(one) == 2 * (bench.THROUGHPUT_PAIRS - 1)
    no_check = bench.parse_args(["--cold-docs", "0"])
    assert bench.engines_planned(default) - bench.engines_planned(no_check) == 2 * bench.COLD_CHECK_PAIRS
    # A single cold-check document runs in one pair.
    one_doc = bench.parse_args(["--cold-docs", "1"])
    assert bench.engines_planned(one_doc) - bench.engines_planned(no_check) == 2


def test_throughput_ways_take_turns_call_by_call_on_the_same_prompts():
    batch = [[n] for n in range(7)]
    turns = bench.throughput_turns(batch, 2)
    # Each call's prompts go to both ways back to back, and the way that goes first alternates.
    assert [way for way, _ in turns] == ["none", "ucm", "ucm", "none", "none", "ucm", "ucm", "none"]
    assert [prompts for _, prompts in turns[::2]] == [[[0], [1]], [[2], [3]], [[4], [5]], [[6]]]
    assert all(turns[i][1] == turns[i + 1][1] for i in range(0, len(turns), 2))
    # One way's share of a repeat: its calls' seconds and tokens summed, then divided.
    calls = [
        {"seconds": 1.0, "prompt_tokens": 2000, "output_tokens": 64, "drain_s": 0.02, "foreign_cpu": 0.1},
        {"seconds": 3.0, "prompt_tokens": 2000, "output_tokens": 64, "drain_s": 0.03, "foreign_cpu": 0.3},
    ]
    total = bench.repeat_totals(calls)
    assert total["tokens_per_s"] == pytest.approx(4128 / 4.0)  # not the mean of 2064 and 688 tokens/s
    assert (total["seconds"], total["calls"]) == (4.0, 2)
    assert total["drain_s"] == pytest.approx(0.05) and total["foreign_cpu"] == pytest.approx(0.2)


def test_ucm_config_store_settings_go_beside_the_bench_root():
    settings = bench.parse_args(["--ucm-config", '{"chunk_tokens": 16, "store_config": {"shared_memory_bytes": 0}}'])
    spec = bench.EngineSpec(
        label="ucm",
        model="m",
        connector="ucm",
        store="/bench/ucm-store",
        kv_cache_bytes=1 << 30,
        max_model_len=4096,
        max_num_batched_tokens=4096,
        dtype="bfloat16",
        block_size=32,
        log="/bench/ucm.log",
        ucm_config=settings.ucm_config,
    )
    assert spec.ucm_extra_config() == {
        "chunk_tokens": 16,
        "store_config": {"root": "/bench/ucm-store", "shared_memory_bytes": 0},
    }
    # Without store settings the connector gets the bench's root alone.
    spec.ucm_config = {}
    assert spec.ucm_extra_config() == {"store_config": {"root": "/bench/ucm-store"}}
