"""A minimal training loop on the shared machinery, for the resume and signal tests.

    python tests/toy_loop.py RUN_DIR STEPS [--resume] [--signal-at K]
"""
import os
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
from data.clips import ClipDataset, make_loader  # noqa: E402


@common.releases_folder_locks
def run(data_root, run_dir, steps, resume=False, signal_at=None):
    cfg = common.load_config(None, [f"data.root={data_root}", f"run.dir={run_dir}", "data.size=[16, 16]"])
    common.seed_everything(cfg.run.seed)
    dataset = ClipDataset(cfg.data.root, "train", n_past=2, n_future=2, stride=1, modalities=("label", "rgb"))
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    checkpoint = common.lock_folder(run_dir) / "last.pt"
    step = 0
    if resume:
        step = common.load_checkpoint(checkpoint, modules={"model": model}, optimizers={"optimizer": optimizer},
                                      cfg=cfg, check_keys=["data.num_classes"])["step"]
    batches = make_loader(dataset, batch_size=2, seed=cfg.run.seed, start_step=step, flip=True)
    with common.StopSignal() as stop:
        while step < steps:
            batch = next(batches)
            rgb = batch["rgb"][:, 0].float() / 127.5 - 1
            noise = torch.randn_like(rgb) * 0.1  # the RNG stream must continue across a resume
            target = batch["label"][:, 1].long().clamp(max=3)
            loss = torch.nn.functional.cross_entropy(model(rgb + noise), target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            if signal_at == step:
                os.kill(os.getpid(), signal.SIGTERM)
            if stop.should_stop():
                break
    common.save_checkpoint(checkpoint, step=step, cfg=cfg, modules={"model": model}, optimizers={"optimizer": optimizer})
    return model, step


if __name__ == "__main__":
    args = sys.argv[1:]
    signal_at = int(args[args.index("--signal-at") + 1]) if "--signal-at" in args else None

    def main():
        _, done = run(args[0], args[1], int(args[2]), resume="--resume" in args, signal_at=signal_at)
        print(f"stopped at step {done}", flush=True)

    common.main_guard(main)
