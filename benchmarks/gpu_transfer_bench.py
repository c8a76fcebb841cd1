#!/usr/bin/env python3
"""The CUDA transfer path next to its alternatives, in one run on one GPU.

For each page shape (an MLA latent page, fp8 K and V pages, bf16 K and V pages), each count of
scattered blocks and each direction (device to pinned host, and back), the same chunks are moved:

* ``ucm copy engines``: ``ucm.store.transfer.copy_chunks_cuda`` (its default way): a kernel resident
  on 8 SMs converts pages into a 64 MiB ring of device slots, the copy engines move the slots;
* ``ucm kernel``: the same call with ``way="kernel"``: one launch reads or writes the pinned host
  memory directly (no device memory at all);
* ``cudaMemcpyAsync per page``: one copy-engine copy per (layer, plane, block) page;
* ``torch index + copy``: ``index_select`` into a device staging buffer as large as the
  transfer, then one copy to or from pinned memory (bytes viewed as uint8, so fp8 works too);
* ``one large copy``: a single pinned copy of the same number of bytes (the ceiling).

Then the overlap check: bf16 matrix products on one stream beside the transfer on another, for
a few caps on the kernel's thread blocks. Times are medians over CUDA events.
Run: ``python benchmarks/gpu_transfer_bench.py [--quick]``; a Markdown report goes to stdout.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time

import torch

from ucm.store import _cuda
from ucm.store.transfer import PagedGeometry, copy_chunks_cuda

TOKENS = 16
# name: (layers, planes, heads, head_size, dtype)
SHAPES = {
    "MLA latent, bf16, 18 KiB page": (61, 1, 1, 576, torch.bfloat16),
    "fp8 K and V, 32 KiB per block": (32, 2, 8, 128, torch.float8_e4m3fn),
    "bf16 K and V, 64 KiB per block": (32, 2, 8, 128, torch.bfloat16),
}


def log(message: str) -> None:
    print(f"[{time.perf_counter() - START:6.1f}s] {message}", file=sys.stderr, flush=True)


def timed(fn, repeats: int, stream: torch.cuda.Stream) -> float:
    """Median seconds of fn() enqueued on ``stream``, by CUDA events (one warm-up run first)."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        fn()
        end.record(stream)
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


class Case:
    def __init__(self, shape: str, num_blocks: int, host: torch.Tensor):
        layers, planes, heads, dim, dtype = SHAPES[shape]
        self.shape, self.planes, self.layers = shape, planes, layers
        self.cache_blocks = num_blocks + num_blocks // 5
        elem = torch.tensor([], dtype=dtype).element_size()
        self.page_bytes = TOKENS * heads * dim * elem
        # vLLM's FlashAttention pages: per layer [2, blocks, tokens, heads, dim] (MLA: [blocks, tokens, dim]).
        self.tensors = []
        for _ in range(layers):
            shape_ = (planes, self.cache_blocks, TOKENS, heads, dim)
            raw = torch.randint(0, 256, (torch.Size(shape_).numel() * elem,), dtype=torch.uint8, device="cuda")
            self.tensors.append(raw.view(dtype).view(shape_))
        views = [t.permute(0, 1, 3, 2, 4) for t in self.tensors]  # [planes, blocks, heads, tokens, dim]
        self.geometry = PagedGeometry(
            keys=[v[0].data_ptr() for v in views],
            values=[v[1].data_ptr() for v in views] if planes == 2 else [],
            key_strides=tuple(views[0][0].stride()),
            value_strides=tuple(views[0][-1].stride()),
            elem_bytes=elem,
            heads=heads,
            head_size=dim,
            chunk_tokens=TOKENS,
            device="cuda",
        )
        generator = torch.Generator().manual_seed(num_blocks)
        self.blocks = torch.randperm(self.cache_blocks, generator=generator)[:num_blocks].sort().values.tolist()
        self.offsets = [0] * num_blocks
        self.nbytes = layers * planes * num_blocks * self.page_bytes
        self.host = host[: self.nbytes]
        self.index = torch.tensor(self.blocks, device="cuda")

    def kernel(self, to_host: bool, stream, max_blocks: int = 0, way: str = "kernel"):
        return lambda: copy_chunks_cuda(
            to_host,
            self.geometry,
            self.blocks,
            self.offsets,
            self.host.data_ptr(),
            stream=stream.cuda_stream,
            max_blocks=max_blocks,
            way=way,
        )

    def per_page(self, to_host: bool, stream):
        device, host = [], []
        base = self.host.data_ptr()
        for t in self.tensors:
            for plane in range(self.planes):
                start = t[plane].data_ptr()
                device += [start + b * self.page_bytes for b in self.blocks]
        host = [base + i * self.page_bytes for i in range(len(device))]
        dst, src = (host, device) if to_host else (device, host)
        return lambda: _cuda.copy_pages(dst, src, self.page_bytes, stream.cuda_stream)

    def torch_index(self, to_host: bool, stream):
        staging = torch.empty(self.nbytes, dtype=torch.uint8, device="cuda")
        per = len(self.blocks) * self.page_bytes
        pages = [
            t.view(torch.uint8).view(self.planes, self.cache_blocks, -1)[p]
            for t in self.tensors
            for p in range(self.planes)
        ]

        def run():
            with torch.cuda.stream(stream):
                if to_host:
                    for i, page in enumerate(pages):
                        torch.index_select(
                            page, 0, self.index, out=staging[i * per : (i + 1) * per].view(-1, self.page_bytes)
                        )
                    self.host.copy_(staging, non_blocking=True)
                else:
                    staging.copy_(self.host, non_blocking=True)
                    for i, page in enumerate(pages):
                        page.index_copy_(0, self.index, staging[i * per : (i + 1) * per].view(-1, self.page_bytes))

        return run, staging

    def large_copy(self, to_host: bool, stream, staging):
        def run():
            with torch.cuda.stream(stream):
                if to_host:
                    self.host.copy_(staging, non_blocking=True)
                else:
                    staging.copy_(self.host, non_blocking=True)

        return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1,000 blocks only, fewer repeats")
    parser.add_argument("--overlap-only", action="store_true", help="only the overlap check")
    args = parser.parse_args()
    counts = [] if args.overlap_only else [1000] if args.quick else [1000, 10000]
    repeats = 3 if args.quick else 5
    props = torch.cuda.get_device_properties(0)
    stream = torch.cuda.Stream()
    biggest = max(
        layers * planes * max(counts + [1000]) * TOKENS * heads * dim * torch.tensor([], dtype=dtype).element_size()
        for layers, planes, heads, dim, dtype in SHAPES.values()
    )
    log(f"pinning {biggest / 2**30:.1f} GiB of host memory")
    host = torch.empty(biggest, dtype=torch.uint8).pin_memory()
    rows = []
    for shape in SHAPES:
        for count in counts:
            case = Case(shape, count, host)
            for to_host in (True, False):
                direction = "device->host" if to_host else "host->device"
                log(f"{shape}, {count} blocks, {direction}")
                torch_run, staging = case.torch_index(to_host, stream)
                results = {
                    "one large copy": timed(case.large_copy(to_host, stream, staging), repeats, stream),
                    "ucm copy engines": timed(case.kernel(to_host, stream, way="copy-engine"), repeats, stream),
                    "ucm kernel": timed(case.kernel(to_host, stream), repeats, stream),
                    "torch index + copy": timed(torch_run, repeats, stream),
                    "cudaMemcpyAsync per page": timed(case.per_page(to_host, stream), min(repeats, 3), stream),
                }
                del staging
                rows.append((shape, count, direction, case.nbytes, results))
            del case
            torch.cuda.empty_cache()

    print(f"- date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC")
    print(
        f"- GPU: {props.name}, {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs; "
        f"torch {torch.__version__}"
    )
    print(
        "- GB/s = 10^9 bytes per second, median of CUDA-event timings; device staging: the copy-engine way "
        "64 MiB (its ring), the kernel way none, torch as much as the transfer\n"
    )
    ways = ["one large copy", "ucm copy engines", "ucm kernel", "torch index + copy", "cudaMemcpyAsync per page"]
    print("| pages | blocks | direction | GB moved | " + " | ".join(ways) + " | ucm copy engines / large copy |")
    print("| --- | ---: | --- | ---: | " + " | ".join("---:" for _ in ways) + " | ---: |")
    for shape, count, direction, nbytes, results in rows:
        rates = [nbytes / results[w] / 1e9 for w in ways]
        print(
            f"| {shape} | {count:,} | {direction} | {nbytes / 1e9:.2f} | "
            + " | ".join(f"{r:.1f}" for r in rates)
            + f" | {rates[1] / rates[0]:.1%} |"
        )

    # Overlap: matrix products on one stream, the transfer on another.
    log("overlap with bf16 matrix products")
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    compute_stream = torch.cuda.Stream()

    def compute():
        with torch.cuda.stream(compute_stream):
            for _ in range(20):
                torch.mm(a, b)

    case = Case("bf16 K and V, 64 KiB per block", 1000, host)
    compute_alone = timed(compute, repeats, compute_stream)
    print(
        "\n| transfer (bf16 pages, 1,000 blocks, 2.1 GB) | way | started | thread blocks | compute alone (ms) "
        "| transfer alone (ms) | both (ms) | compute ends (ms) | transfer ends (ms) | both / longer alone |"
    )
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    high = torch.cuda.Stream(priority=-1)  # the highest priority torch offers
    variants = [
        ("copy-engine", o, cap, p_)
        for p_ in ("normal", "high")
        for o in ("transfer first", "compute first")
        for cap in (0, 64)
    ]
    variants += [
        ("kernel", o, cap, p_)
        for p_ in ("normal", "high")
        for o in ("transfer first", "compute first")
        for cap in (16, 8)
    ]
    for to_host in (True, False):
        for way, order, cap, priority in variants:
            side = stream if priority == "normal" else high
            run = case.kernel(to_host, side, max_blocks=cap, way=way)
            alone = timed(run, repeats, side)
            pair, ends = [], []
            for _ in range(repeats):
                torch.cuda.synchronize()
                begin = torch.cuda.Event(enable_timing=True)
                done_c, done_t = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record(torch.cuda.current_stream())
                compute_stream.wait_event(begin)
                side.wait_event(begin)
                t0 = time.perf_counter()
                for step in (run, compute) if order == "transfer first" else (compute, run):
                    step()
                done_c.record(compute_stream)
                done_t.record(side)
                torch.cuda.synchronize()
                pair.append(time.perf_counter() - t0)
                ends.append((begin.elapsed_time(done_c), begin.elapsed_time(done_t)))
            both = statistics.median(pair)
            end_c = statistics.median(e[0] for e in ends)
            end_t = statistics.median(e[1] for e in ends)
            label = "device->host" if to_host else "host->device"
            print(
                f"| {label} | {way}, {priority} priority | {order} | {cap or 'default'} | {compute_alone * 1e3:.1f} | "
                f"{alone * 1e3:.1f} | {both * 1e3:.1f} | {end_c:.1f} | {end_t:.1f} | "
                f"{both / max(compute_alone, alone):.2f}x |"
            )

    # A load beside a forward pass: the chunks of 1,000 blocks copied into a 32-layer cache while a
    # stand-in forward pass runs one matrix product per layer, each layer waiting for its own data.
    log("a load beside a forward pass, whole or layer by layer")
    layers = len(case.tensors)
    layer_a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)

    def forward(wait_layer):
        for layer in range(layers):
            wait_layer(layer)
            torch.mm(layer_a, layer_a)

    def no_wait(layer):
        pass

    forward_alone = timed(lambda: forward(no_wait), repeats, torch.cuda.current_stream())
    load_alone = timed(
        case.kernel(False, torch.cuda.current_stream(), way="copy-engine"), repeats, torch.cuda.current_stream()
    )
    side = torch.cuda.Stream(priority=-1)

    def whole():
        case.kernel(False, torch.cuda.current_stream(), way="copy-engine")()
        forward(no_wait)

    def by_layer():
        side.wait_stream(torch.cuda.current_stream())
        events = []
        for layer in range(layers):
            copy_chunks_cuda(
                False,
                case.geometry,
                case.blocks,
                case.offsets,
                case.host.data_ptr(),
                layers=(layer, layer + 1),
                stream=side.cuda_stream,
            )
            event = torch.cuda.Event()
            event.record(side)
            events.append(event)
        forward(lambda layer: torch.cuda.current_stream().wait_event(events[layer]))

    current = torch.cuda.current_stream()
    print("\n| load of 1,000 blocks (2.1 GB, 32 layers) with a 32-layer forward pass | ms |")
    print("| --- | ---: |")
    print(f"| forward pass alone (one bf16 8192^3 product per layer) | {forward_alone * 1e3:.1f} |")
    print(f"| load alone (one call, copy engines) | {load_alone * 1e3:.1f} |")
    print(f"| load, then the forward pass | {timed(whole, repeats, current) * 1e3:.1f} |")
    layered = timed(by_layer, repeats, current)
    print(f"| load layer by layer on a side stream, each layer waiting for its own | {layered * 1e3:.1f} |")
    log("done")


START = time.perf_counter()
if __name__ == "__main__":
    main()
