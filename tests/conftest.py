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

def assert_resumed_equal(straight: dict, resumed: dict, rerun) -> None:
    """A resumed training run ends where the uninterrupted one does: `straight` and `resumed` map names to
    tensors (weights, buffers). On CPU bit for bit, tensor by tensor. On CUDA the warp's backward kernel
    (atomic adds) and cuDNN's algorithms sum in a varying order, so two uninterrupted runs can already
    differ, and tiny models amplify it: on the edge trainer a 1e-6 relative nudge to the weights at the
    resume point moves weights by up to 5.5e-3 three steps later (spectral norm's power iteration is
    ill-conditioned at initialisation). There `rerun()` trains the uninterrupted run again, and the resumed
    run must be as close to it as that rerun: mean absolute difference over every element at most 10x the
    rerun's (+1e-7), bit for bit where the rerun is."""
    assert straight.keys() == resumed.keys()
    if not torch.cuda.is_available():
        for name in straight:
            assert torch.equal(straight[name], resumed[name]), f"{name} differs after resume"
        return
    again = rerun()

    def mean_difference(a: dict, b: dict) -> float:
        total = sum((a[k].detach().cpu().double() - b[k].detach().cpu().double()).abs().sum() for k in a)
        return float(total) / sum(a[k].numel() for k in a)
    noise, gap = mean_difference(straight, again), mean_difference(straight, resumed)
    print(f"on CUDA: resumed vs uninterrupted {gap:.2e} per element, rerun vs uninterrupted {noise:.2e}")
    assert gap <= 10 * noise + 1e-7, f"resumed differs by {gap:.2e} per element, a rerun by {noise:.2e}"


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
