"""The main job's workload and settings (benchmarks/connector_bench.py), without running engines."""

from __future__ import annotations

import connector_bench as bench
import pytest


def test_no_prompt_ends_on_or_one_token_past_a_block_boundary(tiny_model):
    # One past: ExampleConnector could never hit the prompt (its save and its lookup round to
    # different whole blocks); on the boundary: a whole block would be computed behind the cached
    # prefix. Either would skew the overhead comparison. (Without the rule, some of these 65
    # prompts do end there.)
    block = 32
    settings = bench.parse_args(
        ["--docs", "4", "--questions", "8", "--doc-tokens", "300", "--block-size", str(block), "--dtype", "float32"]
    )
    workload = bench.build_workload(settings, tiny_model)
    prompts = [p.tokens for p in workload.prompts + workload.new_questions] + [workload.chunked]
    assert len(prompts) == 65
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
