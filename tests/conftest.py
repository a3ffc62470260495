"""Shared fixtures. The Triton interpreter must be switched on before anything imports triton."""
import os
import sys
from pathlib import Path

if not os.environ.get("CUDA_VISIBLE_DEVICES") and "TRITON_INTERPRET" not in os.environ:
    try:
        import torch
        if not torch.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"
    except ImportError:
        pass

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Test models are tiny: one thread each avoids OpenMP oversubscription, which slows a contended 2-core
# machine (or two DDP test processes) by an order of magnitude. Subprocesses inherit the variable.
os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch  # noqa: E402

torch.set_num_threads(1)

import pytest  # noqa: E402


# ----------------------------------------------------------------------------- kernel parity tests

KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# interpreter bf16 arithmetic is unreliable: bf16 only on a GPU
KERNEL_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if KERNEL_DEVICE == "cuda" else [])
LAYOUTS = ["contiguous", "channels_last", "strided", "cropped"]


def triton_only(test):
    """Skip where neither a GPU nor the interpreter can run Triton (the reason says which is missing)."""
    import kernels
    from kernels import _dispatch
    return pytest.mark.skipif(
        not kernels.HAS_TRITON or (KERNEL_DEVICE == "cpu" and not _dispatch.INTERPRET),
        reason=f"Triton path unavailable here (triton error: {_dispatch.TRITON_ERROR}, "
               f"interpreter: {_dispatch.INTERPRET})")(test)


# ----------------------------------------------------------------------------- trainers on a device

def assert_resumed_equal(a: torch.Tensor, b: torch.Tensor, name: str) -> None:
    """Resumed == uninterrupted, for the trainers' resume tests (run.device=auto: CUDA where there is one).
    Bit for bit on CPU. On CUDA the backward kernels that accumulate with atomic adds (the one-hot conv's and
    the warp's weight gradients) and cuDNN's algorithms sum in a varying order, so the tolerance is stated:
    every element within 1e-3 (about one Adam step at the trainers' learning rates: a gradient component near
    zero can flip its update's sign) and the mean difference within 1e-5."""
    if not torch.cuda.is_available():
        assert torch.equal(a, b), f"{name} differs after resume"
        return
    diff = (a.detach().cpu().double() - b.detach().cpu().double()).abs()
    assert diff.max() <= 1e-3 and diff.mean() <= 1e-5, f"{name} differs after resume: max {diff.max():.2e}"


def seeded(*key) -> torch.Generator:
    """A CPU generator seeded by the test case's parameters, so each case draws its own inputs."""
    import zlib
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


@pytest.fixture
def master_port() -> int:
    """A free TCP port for a torchrun test's rendezvous."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

@pytest.fixture(scope="session")
def tiny_drive(tmp_path_factory):
    """A tiny synth-drive dataset: 3 train / 1 val / 1 test sequences of 40 frames at 32x32."""
    from data.synthetic import write_dataset
    root = tmp_path_factory.mktemp("tiny_drive") / "synth_drive"
    write_dataset("drive", root, sequences=3, frames=40, size=(32, 32), seed=0, val=1, test=1)
    return root


@pytest.fixture(scope="session")
def tiny_dance(tmp_path_factory):
    from data.synthetic import write_dataset
    root = tmp_path_factory.mktemp("tiny_dance") / "synth_dance"
    write_dataset("dance", root, sequences=3, frames=40, size=(32, 32), seed=0, val=1, test=1)
    return root


def write_random_dataset(root, sequences=2, frames=8, size=(16, 16), num_classes=4, splits=("train", "val"),
                         modalities=("label", "rgb", "instance", "flow"), seed=0):
    """A small dataset of random frames written through the layout writer (independent of the generators)."""
    import numpy as np
    from data.layout import write_frame, write_meta
    rng = np.random.default_rng(seed)
    write_meta(root, kind="random", class_names=[f"c{i}" for i in range(num_classes)],
               palette=rng.integers(0, 256, (num_classes, 3)), fps=10, size=size)
    height, width = size
    for split in splits:
        for s in range(sequences):
            seq = Path(root) / split / f"seq_{s:04d}"
            for t in range(frames):
                arrays = {"label": rng.integers(0, num_classes, (height, width), dtype=np.uint8),
                          "rgb": rng.integers(0, 256, (height, width, 3), dtype=np.uint8),
                          "instance": rng.integers(0, 1000, (height, width), dtype=np.uint16),
                          "flow": rng.normal(0, 1, (2, height, width)).astype(np.float16)}
                for modality in modalities:
                    write_frame(seq, modality, t, arrays[modality])
    return Path(root)


@pytest.fixture
def random_dataset(tmp_path):
    return write_random_dataset(tmp_path / "random")


def pytest_collection_modifyitems(config, items):
    """In CI (CI=true) nothing may be skipped for a missing install: the Triton interpreter tests and
    the tests on the real metric weights are the point of the suite, so a skip there fails the run."""
    if os.environ.get("CI") != "true":
        return
    for item in items:
        for mark in item.iter_markers("skipif"):
            reason = mark.kwargs.get("reason", "")
            if mark.args and mark.args[0] and ("missing" in reason or "unavailable" in reason):
                raise pytest.UsageError(f"CI=true but {item.nodeid} would be skipped: {reason}")
