"""How often a bf16 rollout step's argmax differs from fp32's on the same state (docs/design.md, "Benchmarks").

    python bench/bench_precision.py                                   # the shipped synth_scroll model
    python bench/bench_precision.py --ckpt runs/kitti64/structure/last.pt --cfg kitti64.yaml --steps 100

A trained structure model observes val context clips and rolls out `--steps` frames in fp32. Before each
fp32 step, a copy of the state (and of the noise generator) takes the same step under bf16 autocast: the
two argmax frames differ only by the precision of that one step. Reported per step: the fraction of
pixels that differ, and of frames that differ anywhere. Prints a table and appends rows to
bench/precision.csv. A trained model is needed: random weights put every pixel near a tie.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
import record  # noqa: E402
import structure_model  # noqa: E402
from data import ensure_dataset  # noqa: E402
from data.clips import ClipDataset, fixed_batch  # noqa: E402

CSV = Path(__file__).with_name("precision.csv")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", default=str(common.ROOT / "checkpoints" / "synth_scroll_structure.pt"))
    parser.add_argument("--cfg", default=None, help="the dataset's config (default: the default config)")
    parser.add_argument("--clips", type=int, default=4)
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    cfg = common.load_config(args.cfg)
    model = structure_model.load(args.ckpt, cfg, device).for_rollout(channels_last=device.type == "cuda")
    n_past = model.trained_config.structure.n_past
    ensure_dataset(cfg)
    clips = ClipDataset(cfg.data.root, "val", n_past, 1, model.trained_config.structure.stride, modalities=("label",))
    context = fixed_batch(clips, args.clips)["label"][:, :n_past].to(device)

    generator = torch.Generator(device).manual_seed(0)
    with torch.inference_mode():
        state = model.init_state(len(context), args.samples, device)
        for t in range(n_past):
            model.observe(state, context[:, t], generator)
        pixels, frames = [], []
        started = time.time()
        for _ in range(args.steps):
            other, other_generator = copy.deepcopy(state), torch.Generator(device)
            other_generator.set_state(generator.get_state())
            with common.autocast(device, "bf16"):
                low = model.step(other, other_generator)
            high = model.step(state, generator)
            differ = (low != high).flatten(1)
            pixels.append(differ.float().mean().item())
            frames.append(differ.any(1).float().mean().item())
    seconds = time.time() - started
    pixel_rate, frame_rate = sum(pixels) / len(pixels), sum(frames) / len(frames)
    print(f"{args.steps} steps x {len(context) * args.samples} rollouts of {Path(args.ckpt).name} on "
          f"{record.device_name(device)}: bf16 against fp32 on the same state")
    print(f"  pixels whose argmax differs: {100 * pixel_rate:.4f}% per step (worst step {100 * max(pixels):.4f}%)")
    print(f"  frames with any difference:  {100 * frame_rate:.2f}% per step")
    record.append_csv(CSV, [{
        "device": record.device_name(device), "torch": torch.__version__, "commit": common.git_commit(),
        "checkpoint": Path(args.ckpt).name, "step_of_checkpoint": model.checkpoint_identity["step"],
        "rollouts": len(context) * args.samples, "steps": args.steps,
        "pixels_differ_pct": round(100 * pixel_rate, 5), "worst_step_pixels_pct": round(100 * max(pixels), 5),
        "frames_differ_pct": round(100 * frame_rate, 3), "seconds": round(seconds, 1)}])


if __name__ == "__main__":
    main()
