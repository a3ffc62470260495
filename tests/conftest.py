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

import pytest  # noqa: E402


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
