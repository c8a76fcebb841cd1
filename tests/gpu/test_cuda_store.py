"""Stores take CUDA tensors as buffers: dumped and loaded through pinned staging, never ``.cpu()``."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
from ucm.store.transfer import cuda_available  # noqa: E402

if not torch.cuda.is_available() or not cuda_available():
    pytest.skip("needs a CUDA GPU and ucm-store built with the CUDA path", allow_module_level=True)

from ucm.store import open_store  # noqa: E402


def store_config(kind: str, root) -> tuple[str, dict]:
    posix = {"root": str(root)}
    if kind == "posix":
        return "posix", posix
    return "memory", {"capacity_bytes": 1 << 28, "backend": {"name": "posix", "config": posix}}


@pytest.mark.parametrize("kind", ["posix", "memory+posix"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float8_e4m3fn])
def test_device_tensors_round_trip(tmp_path, kind, dtype):
    # fp16 and bf16 reach the store through __cuda_array_interface__, fp8 through DLPack (torch's
    # interface cannot describe it).
    blocks = [torch.randn(3, 4096, device="cuda").to(dtype) for _ in range(4)]
    host_part = torch.randn(512).to(dtype)
    ids = [f"{kind}-{dtype}-{i}".encode() for i in range(4)]
    with open_store(*store_config(kind, tmp_path / "store")) as store:
        # Block 3 gathers a device tensor and a host tensor.
        store.wait(store.dump(ids, blocks[:3] + [[blocks[3], host_part]]))
        loaded = [torch.full_like(b.view(torch.uint8), 0xA5).view(dtype) for b in blocks]
        host_loaded = torch.full_like(host_part.view(torch.uint8), 0x5A).view(dtype)
        store.wait(store.load(ids, loaded[:3] + [[loaded[3], host_loaded]]))
    for want, got in zip(blocks, loaded, strict=True):
        assert torch.equal(want.view(torch.uint8), got.view(torch.uint8))
    assert torch.equal(host_part.view(torch.uint8), host_loaded.view(torch.uint8))


def test_a_strided_device_tensor_is_refused_by_name(tmp_path):
    block = torch.randn(64, 64, device="cuda", dtype=torch.float16).t()
    with open_store("posix", {"root": str(tmp_path / "store")}) as store:
        with pytest.raises(ValueError, match=r"buffers\[0\] is not contiguous"):
            store.dump([b"strided"], [block])
