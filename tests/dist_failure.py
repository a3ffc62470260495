"""Two gloo ranks: rank 1 fails with a ConfigError while rank 0 waits for it in a receive, as a rank does in
the middle of a training step's collective. main_guard must let rank 1 exit (no closing barrier on the error
path), so that torchrun stops the job instead of hanging until the process group's timeout.

    python -m torch.distributed.run --nproc_per_node=2 tests/dist_failure.py
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402


def main():
    dist = common.setup_distributed("cpu")
    if dist.rank == 1:
        raise common.ConfigError("rank 1 failed on purpose")
    torch.distributed.recv(torch.zeros(1), src=1)   # never sent


if __name__ == "__main__":
    common.main_guard(main)
