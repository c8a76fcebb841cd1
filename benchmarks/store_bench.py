#!/usr/bin/env python3
"""Throughput of the ``posix`` and ``memory`` stores next to plain file I/O and memcpy.

Every number in the output comes from this one run: the baselines are measured in the
same process, on the same bytes, from and into the same preallocated arena as the stores.

For each block size, a batch of N blocks totalling ``--total-bytes`` is

* dumped to / loaded from the ``posix`` store (one ``dump``/``load`` call, then ``wait``),
  compared with one plain ``open``/``write``/``close`` (``open``/``readv``/``close``) per block;
* dumped to / loaded from the ``posix`` store with its shared host-memory tier (``shared``: the
  dump writes the files, and a background thread then copies them into the tier, untimed; the
  load copies the blocks out of the tier), compared with the plain write and with a numpy copy
  per block;
* dumped to / loaded from the ``memory`` store, compared with a numpy copy per block.

Plain I/O and copies run on 1 thread and on ``--threads`` threads (contiguous ranges of blocks
per thread); the better of the two is the baseline. Each timing is the best of ``--repeats``.
Every write creates new files (new block ids for the store), after syncing dirty pages, and
nothing is deleted before the end of the run, so the disk must hold every repeat's files (the
batch is capped to fit). Every load is checked once, after its timing, against the dumped
bytes. Reads hit a warm page cache unless ``--drop-caches`` is given. Other work on the machine
skews the numbers: the load average at the start and the end is printed.

Run ``python benchmarks/store_bench.py --markdown`` to get the tables of docs/benchmarks/store.md.
Progress goes to stderr, the report to stdout.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

import numpy as np
from machine import cpu_model, load_average, package_version  # benchmarks/ is on sys.path when a script runs

try:
    from ucm.store import KVStore, open_store
    from ucm.store.plugins import load_plugin
except ImportError as exc:  # pragma: no cover - only hit when the package is missing
    sys.exit(f"store_bench: cannot import ucm.store ({exc}); install it first: pip install ./packages/ucm-store")

KIB = 1 << 10
MIB = 1 << 20
GIB = 1 << 30

#: Minimum store/baseline throughput ratios; they apply to blocks of TARGET_MIN_BLOCK bytes or more.
TARGETS = {"posix dump": 0.8, "posix load": 0.9, "memory dump": 0.7, "memory load": 0.7}
TARGET_MIN_BLOCK = MIB

LOOKUP_IDS = 10_000
LOOKUP_BLOCK_BYTES = 4 * KIB
LOOKUP_REPEATS = 5


# -- command line ---------------------------------------------------------------------------
def parse_bytes(text: str) -> int:
    """``"64K"``, ``"16MiB"``, ``"1G"``, ``"4096"`` -> bytes (binary units)."""
    units = {"": 1, "K": KIB, "M": MIB, "G": GIB, "T": 1 << 40}
    cleaned = text.strip().upper().removesuffix("B").removesuffix("I")
    number, unit = (cleaned[:-1], cleaned[-1]) if cleaned[-1:] in units else (cleaned, "")
    try:
        value = int(float(number) * units[unit])
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 64K, 1M, 1GiB)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive: {text!r}")
    return value


def parse_sizes(text: str) -> list[int]:
    return [parse_bytes(part) for part in text.split(",") if part.strip()]


def format_bytes(count: int) -> str:
    for unit, scale in (("GiB", GIB), ("MiB", MIB), ("KiB", KIB)):
        if count >= scale and count % scale == 0:
            return f"{count // scale} {unit}"
    return f"{count / MIB:.1f} MiB" if count >= MIB else f"{count} B"


def default_threads(store_name: str) -> int:
    return load_plugin("ucm.stores", store_name, KVStore).config_schema["threads"].default


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=parse_sizes, default="64K,1M,16M", help="block sizes (default: %(default)s)")
    parser.add_argument(
        "--total-bytes",
        type=parse_bytes,
        default="1G",
        help="bytes per batch, for each block size; capped to what the machine's memory and disk hold "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--root", help="parent directory of the fresh scratch directory (default: /var/tmp, else the temp dir)"
    )
    parser.add_argument("--threads", type=int, help="posix store threads and baseline threads (default: the store's)")
    parser.add_argument("--repeats", type=int, default=3, help="timings per number; the best is reported (default: 3)")
    parser.add_argument(
        "--drop-caches",
        action="store_true",
        help="drop the page cache before every timed read (machine-wide; needs root) to measure cold reads",
    )
    parser.add_argument("--markdown", action="store_true", help="print Markdown tables (for docs/benchmarks/store.md)")
    args = parser.parse_args(argv)
    if args.threads is None:
        args.threads = default_threads("posix")
    if args.threads < 1 or args.repeats < 1:
        parser.error("--threads and --repeats must be at least 1")
    if args.drop_caches and not os.access("/proc/sys/vm/drop_caches", os.W_OK):
        parser.error("--drop-caches needs write access to /proc/sys/vm/drop_caches (run as root)")
    return args


# -- the machine ----------------------------------------------------------------------------


def meminfo_bytes(key: str) -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            name, _, value = line.partition(":")
            if name == key:
                return int(value.split()[0]) * KIB
    raise KeyError(key)


def filesystem_of(path: str) -> str:
    """Filesystem type of the mount holding ``path``, from /proc/mounts (longest matching mount point)."""
    path = os.path.realpath(path)
    best_mount, best_type = "", "unknown"
    with open("/proc/mounts") as mounts:
        for line in mounts:
            _device, mount_point, fs_type, *_ = line.split()
            mount_point = re.sub(r"\\([0-7]{3})", lambda match: chr(int(match[1], 8)), mount_point)  # \040 = space
            inside = path == mount_point or path.startswith(mount_point.rstrip("/") + "/")
            if inside and len(mount_point) > len(best_mount):
                best_mount, best_type = mount_point, fs_type
    return best_type


def capped_total_bytes(requested: int, scratch: str, files_per_byte: int, tier_copies: int) -> tuple[int, str]:
    """Bound the batch so that the arena (2x), the memory store (1x), the page cache (2x) and the
    shared tier (``tier_copies`` x) fit in memory, and every file written (``files_per_byte`` x,
    nothing is deleted before the end) fits in half the free disk."""
    memory_cap = meminfo_bytes("MemAvailable") // (5 + tier_copies)
    disk_cap = shutil.disk_usage(scratch).free // (2 * files_per_byte)
    total = min(requested, memory_cap // MIB * MIB, disk_cap // MIB * MIB)
    note = "" if total == requested else f" (capped from {format_bytes(requested)} to fit memory and disk)"
    return total, note


# -- timing ---------------------------------------------------------------------------------
def timed(run: Callable[..., object], *args: object) -> float:
    start = time.perf_counter()
    run(*args)
    return time.perf_counter() - start


def sync_and_maybe_drop_caches(drop: bool) -> None:
    """Start every timing with no dirty pages, so that writeback of earlier work does not compete."""
    os.sync()
    if drop:
        with open("/proc/sys/vm/drop_caches", "w") as control:
            control.write("3\n")


def split_ranges(count: int, parts: int) -> list[tuple[int, int]]:
    bounds = [count * part // parts for part in range(parts + 1)]
    return [(low, high) for low, high in zip(bounds, bounds[1:], strict=False) if high > low]


def run_split(pool: ThreadPoolExecutor, threads: int, count: int, work: Callable[[int, int], None]) -> None:
    """Run ``work(low, high)`` over ``threads`` contiguous ranges of ``range(count)``."""
    if threads == 1:
        work(0, count)
        return
    for future in [pool.submit(work, low, high) for low, high in split_ranges(count, threads)]:
        future.result()


# -- the work being timed -------------------------------------------------------------------
def block_ids(tag: str, count: int) -> list[bytes]:
    """16-byte ids, like the token-prefix hashes a serving engine uses; unique per tag."""
    return [hashlib.blake2b(f"{tag}/{index}".encode(), digest_size=16).digest() for index in range(count)]


def dump_and_wait(store: KVStore, ids: list[bytes], buffers: list[np.ndarray]) -> None:
    store.wait(store.dump(ids, buffers))


def load_and_wait(store: KVStore, ids: list[bytes], buffers: list[np.ndarray]) -> None:
    store.wait(store.load(ids, buffers))


def write_files(paths: list[str], blocks: list[np.ndarray], low: int, high: int) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
    for index in range(low, high):
        view = memoryview(blocks[index]).cast("B")
        fd = os.open(paths[index], flags, 0o644)
        try:
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)


def read_files(paths: list[str], blocks: list[np.ndarray], low: int, high: int) -> None:
    for index in range(low, high):
        view = memoryview(blocks[index]).cast("B")
        fd = os.open(paths[index], os.O_RDONLY | os.O_CLOEXEC)
        try:
            while view:
                got = os.readv(fd, [view])
                if got == 0:
                    raise OSError(f"{paths[index]}: file shorter than the block")
                view = view[got:]
        finally:
            os.close(fd)


def copy_blocks(sources: list[np.ndarray], destinations: list[np.ndarray], low: int, high: int) -> None:
    for index in range(low, high):
        np.copyto(destinations[index], sources[index])


# -- one block size -------------------------------------------------------------------------
@dataclass
class Batch:
    """N blocks of one size: source and destination slices of the arena, plus plain-file paths."""

    block_bytes: int
    sources: list[np.ndarray]
    destinations: list[np.ndarray]
    source_span: np.ndarray
    destination_span: np.ndarray
    plain_dir: str

    @classmethod
    def carve(
        cls, block_bytes: int, count: int, sources: np.ndarray, destinations: np.ndarray, plain_dir: str
    ) -> Batch:
        return cls(
            block_bytes=block_bytes,
            sources=[sources[i * block_bytes : (i + 1) * block_bytes] for i in range(count)],
            destinations=[destinations[i * block_bytes : (i + 1) * block_bytes] for i in range(count)],
            source_span=sources[: count * block_bytes],
            destination_span=destinations[: count * block_bytes],
            plain_dir=os.path.join(plain_dir, format_bytes(block_bytes).replace(" ", "")),
        )

    def new_plain_paths(self, name: str) -> list[str]:
        """Paths of one file per block in a new directory, like the store's new files."""
        directory = os.path.join(self.plain_dir, name)
        os.makedirs(directory)
        return [os.path.join(directory, f"{index:08d}") for index in range(self.count)]

    @property
    def count(self) -> int:
        return len(self.sources)

    @property
    def nbytes(self) -> int:
        return self.count * self.block_bytes

    def clear_destinations(self) -> None:
        self.destination_span.fill(0x5A)

    def verify(self, what: str) -> None:
        if not np.array_equal(self.destination_span, self.source_span):
            bad = next(i for i in range(self.count) if not np.array_equal(self.destinations[i], self.sources[i]))
            raise SystemExit(
                f"store_bench: {what} at {format_bytes(self.block_bytes)}: block {bad} differs from the dump"
            )


def bench_block_size(
    batch: Batch,
    posix: KVStore,
    shared: KVStore,
    memory: KVStore,
    pool: ThreadPoolExecutor,
    args: argparse.Namespace,
    log: Callable[[str], None],
) -> dict[str, float]:
    """GB/s of every variant ("posix dump", "plain write 8", ...), best of ``args.repeats``."""
    thread_counts = sorted({1, args.threads})
    size_tag = format_bytes(batch.block_bytes)
    count = batch.count
    copy = partial(copy_blocks, batch.sources, batch.destinations)
    samples: dict[str, list[float]] = defaultdict(list)

    # Writes. The variants take turns within each repeat so that they see the same machine state.
    # Every write creates new files and nothing is deleted until the end of the run: on ext4
    # without a journal, creating files soon after deleting many costs ~1 ms of CPU per file,
    # because the kernel scans past the recently freed inodes to avoid reusing them.
    memory_ids: list[bytes] = []
    for repeat in range(args.repeats):
        for threads in thread_counts:
            plain_paths = batch.new_plain_paths(f"{threads}-threads-{repeat}")
            write = partial(write_files, plain_paths, batch.sources)
            sync_and_maybe_drop_caches(False)
            samples[f"plain write {threads}"].append(timed(run_split, pool, threads, count, write))

        posix_ids = block_ids(f"posix/{size_tag}/{repeat}", count)
        sync_and_maybe_drop_caches(False)
        samples["posix dump"].append(timed(dump_and_wait, posix, posix_ids, batch.sources))

        shared_ids = block_ids(f"shared/{size_tag}/{repeat}", count)
        sync_and_maybe_drop_caches(False)
        samples["shared dump"].append(timed(dump_and_wait, shared, shared_ids, batch.sources))
        shared.wait_shared_memory()  # the copies into the tier, made in the background after the dump

        memory.remove(memory_ids)
        memory_ids = block_ids(f"memory/{size_tag}/{repeat}", count)
        samples["memory dump"].append(timed(dump_and_wait, memory, memory_ids, batch.sources))

        for threads in thread_counts:
            samples[f"memcpy {threads}"].append(timed(run_split, pool, threads, count, copy))
        log(f"  {size_tag}: writes, repeat {repeat + 1}/{args.repeats} done")
    batch.verify("memcpy")

    # Reads: of the blocks and plain files written last.
    read = partial(read_files, plain_paths, batch.destinations)
    for repeat in range(args.repeats):
        verify = repeat == 0
        timings = [(f"plain read {threads}", run_split, (pool, threads, count, read)) for threads in thread_counts]
        timings += [
            ("posix load", load_and_wait, (posix, posix_ids, batch.destinations)),
            ("shared load", load_and_wait, (shared, shared_ids, batch.destinations)),
            ("memory load", load_and_wait, (memory, memory_ids, batch.destinations)),
        ]
        for variant, run, run_args in timings:
            sync_and_maybe_drop_caches(args.drop_caches)
            if verify:
                batch.clear_destinations()
            samples[variant].append(timed(run, *run_args))
            if verify:
                batch.verify(variant)
        log(f"  {size_tag}: reads, repeat {repeat + 1}/{args.repeats} done")

    memory.remove(memory_ids)
    stats = shared.shared_memory_stats()
    if stats["error"] or stats["stale"] or stats["failed"]:
        raise SystemExit(f"store_bench: the shared tier failed: {stats}")
    # With every repeat's blocks in it, a set of 8 slots can overflow and lose a few of the last
    # repeat's copies: those loads read their files. The report says how many.
    log(f"  {size_tag}: the shared tier served {stats['hits']} of {stats['hits'] + stats['misses']} loads so far")
    return {variant: batch.nbytes / min(seconds) / 1e9 for variant, seconds in samples.items()}


def bench_lookup(posix: KVStore, arena_sources: np.ndarray) -> dict[str, float]:
    """Best-of time (ms) of one lookup call of LOOKUP_IDS absent and present ids."""
    present = block_ids("lookup/present", LOOKUP_IDS)
    absent = block_ids("lookup/absent", LOOKUP_IDS)
    blocks = [arena_sources[i * LOOKUP_BLOCK_BYTES : (i + 1) * LOOKUP_BLOCK_BYTES] for i in range(LOOKUP_IDS)]
    posix.wait(posix.dump(present, blocks))
    timings: dict[str, float] = {}
    for name, ids, expected in (("absent", absent, False), ("present", present, True)):
        samples = []
        for _ in range(LOOKUP_REPEATS):
            start = time.perf_counter()
            found = posix.lookup(ids)
            samples.append(time.perf_counter() - start)
            if found != [expected] * LOOKUP_IDS:
                raise SystemExit(f"store_bench: lookup of {name} ids returned {sum(found)} present of {LOOKUP_IDS}")
        timings[name] = min(samples) * 1e3
    posix.remove(present)
    return timings


# -- report ---------------------------------------------------------------------------------
def render_table(headers: list[str], rows: list[list[str]], markdown: bool, right: set[int]) -> str:
    if markdown:
        rule = ["---:" if column in right else "---" for column in range(len(headers))]
        return "\n".join("| " + " | ".join(cells) + " |" for cells in [headers, rule, *rows])
    widths = [max(len(cells[column]) for cells in [headers, *rows]) for column in range(len(headers))]

    def line(cells: list[str]) -> str:
        return "  ".join(
            cell.rjust(width) if column in right else cell.ljust(width)
            for column, (cell, width) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return "\n".join([line(headers), line(["-" * width for width in widths]), *map(line, rows)])


def best_baseline(rates: dict[str, float], baseline: str, thread_counts: list[int]) -> tuple[float, int]:
    return max((rates[f"{baseline} {threads}"], threads) for threads in thread_counts)


def report(
    args: argparse.Namespace,
    header: list[tuple[str, str]],
    results: dict[int, tuple[int, dict[str, float]]],
    lookup_ms: dict[str, float],
) -> str:
    thread_counts = sorted({1, args.threads})
    out: list[str] = []
    if args.markdown:
        out += [f"- **{key}**: {value}" for key, value in header]
    else:
        width = max(len(key) for key, _ in header)
        out += [f"{key.ljust(width)}  {value}" for key, value in header]

    comparisons = (
        ("posix dump", "plain write"),
        ("posix load", "plain read"),
        ("shared dump", "plain write"),
        ("shared load", "memcpy"),
        ("memory dump", "memcpy"),
        ("memory load", "memcpy"),
    )
    rows = []
    for block_bytes, (count, rates) in results.items():
        for operation, baseline in comparisons:
            store_rate = rates[operation]
            baseline_rate, baseline_threads = best_baseline(rates, baseline, thread_counts)
            ratio = store_rate / baseline_rate
            if block_bytes >= TARGET_MIN_BLOCK and operation in TARGETS:
                target, met = f">= {TARGETS[operation]:.2f}x", "yes" if ratio >= TARGETS[operation] else "NO"
            else:
                target = met = "-"
            rows.append(
                [
                    format_bytes(block_bytes),
                    str(count),
                    operation,
                    f"{store_rate:.2f}",
                    f"{baseline} ({baseline_threads} thr)",
                    f"{baseline_rate:.2f}",
                    f"{ratio:.2f}x",
                    target,
                    met,
                ]
            )
    out += [
        "",
        f"Throughput, GB/s (10^9 bytes/s), best of {args.repeats}; one dump/load call per batch; "
        f"targets apply at blocks >= {format_bytes(TARGET_MIN_BLOCK)}:",
        "",
        render_table(
            ["block", "blocks", "store op", "GB/s", "baseline", "GB/s", "ratio", "target", "met"],
            rows,
            args.markdown,
            right={1, 3, 5, 6},
        ),
    ]

    baseline_rows = [
        [format_bytes(block_bytes), baseline] + [f"{rates[f'{baseline} {threads}']:.2f}" for threads in thread_counts]
        for block_bytes, (_count, rates) in results.items()
        for baseline in ("plain write", "plain read", "memcpy")
    ]
    out += [
        "",
        "Baselines by thread count, GB/s:",
        "",
        render_table(
            ["block", "baseline"] + [f"{threads} thread{'s' if threads > 1 else ''}" for threads in thread_counts],
            baseline_rows,
            args.markdown,
            right=set(range(2, 2 + len(thread_counts))),
        ),
    ]

    lookup_rows = [
        [f"lookup, {LOOKUP_IDS:,} {name} ids", f"{ms:.2f}", f"{ms * 1e3 / LOOKUP_IDS:.2f}"]
        for name, ms in lookup_ms.items()
    ]
    out += [
        "",
        f"posix lookup, one call, best of {LOOKUP_REPEATS}:",
        "",
        render_table(["call", "ms", "us per id"], lookup_rows, args.markdown, right={1, 2}),
    ]
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731

    parent = args.root or ("/var/tmp" if os.path.isdir("/var/tmp") else tempfile.gettempdir())
    scratch = tempfile.mkdtemp(prefix="ucm-store-bench-", dir=parent)
    shm_dir = None
    try:
        files_per_byte = len(args.sizes) * args.repeats * (len({1, args.threads}) + 2)
        total_bytes, cap_note = capped_total_bytes(
            args.total_bytes, scratch, files_per_byte, tier_copies=len(args.sizes) * args.repeats
        )
        counts = {size: max(1, total_bytes // size) for size in args.sizes}
        span = max(max(count * size for size, count in counts.items()), LOOKUP_IDS * LOOKUP_BLOCK_BYTES)

        log(f"store_bench: preparing a {format_bytes(2 * span)} arena in {scratch}")
        arena = np.empty(2 * span, dtype=np.uint8)
        sources, destinations = arena[:span], arena[span:]
        rng = np.random.default_rng(20240607)
        for offset in range(0, span, 64 * MIB):
            chunk = sources[offset : offset + 64 * MIB]
            chunk[:] = np.frombuffer(rng.bytes(chunk.size), dtype=np.uint8)
        destinations.fill(0)  # touch every page before timing anything

        plain_dir = os.path.join(scratch, "plain")
        os.mkdir(plain_dir)
        posix = open_store("posix", {"root": os.path.join(scratch, "store"), "threads": args.threads})
        # The shared tier's arenas hold every repeat's blocks; they live in a directory of this run.
        shm_dir = tempfile.mkdtemp(prefix="ucm-store-bench-", dir="/dev/shm" if os.path.isdir("/dev/shm") else scratch)
        shared = open_store(
            "posix",
            {
                "root": os.path.join(scratch, "shared-store"),
                "threads": args.threads,
                # Every repeat's blocks, with room to spare: sets of 8 slots fill unevenly.
                "shared_memory_bytes": 2 * args.repeats * span,
                "shared_memory_dir": shm_dir,
            },
        )
        memory = open_store("memory", {"capacity_bytes": 2 * span})
        header = [
            ("date", datetime.datetime.now().astimezone().isoformat(timespec="seconds")),
            ("cpu", f"{cpu_model()}, {os.cpu_count()} cores ({len(os.sched_getaffinity(0))} usable)"),
            ("memory", f"{meminfo_bytes('MemTotal') / GIB:.1f} GiB"),
            ("kernel", platform.release()),
            ("load average", f"{load_average()} at start"),
            ("root", f"{scratch} on {filesystem_of(scratch)}; shared tier in {shm_dir}"),
            (
                "software",
                f"Python {platform.python_version()}, numpy {np.__version__}, ucm-store {package_version('ucm-store')}",
            ),
            ("batch", f"{format_bytes(total_bytes)} per block size{cap_note}"),
            (
                "threads",
                f"posix store and baselines {args.threads}, memory store {default_threads('memory')} (its default)",
            ),
            (
                "page cache",
                "COLD for reads and loads (dropped machine-wide before each timed read)"
                if args.drop_caches
                else "warm for reads and loads (files just written); dirty pages synced before each timing",
            ),
        ]

        results: dict[int, tuple[int, dict[str, float]]] = {}
        with posix, shared, memory, ThreadPoolExecutor(max_workers=args.threads) as pool:
            for size, count in counts.items():
                log(f"store_bench: {count} blocks of {format_bytes(size)}")
                batch = Batch.carve(size, count, sources, destinations, plain_dir)
                results[size] = (count, bench_block_size(batch, posix, shared, memory, pool, args, log))
            log("store_bench: lookups")
            lookup_ms = bench_lookup(posix, sources)
            tier = shared.shared_memory_stats()
        header = [
            (key, f"{value}, {load_average()} at end" if key == "load average" else value) for key, value in header
        ]
        header.append(
            (
                "shared tier",
                f"served {tier['hits']} of {tier['hits'] + tier['misses']} block loads from memory"
                + (
                    " (the others from their files: sets of 8 slots holding every repeat's blocks overflowed)"
                    if tier["misses"]
                    else ""
                ),
            )
        )
        print(report(args, header, results, lookup_ms))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if shm_dir is not None:
            shutil.rmtree(shm_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
