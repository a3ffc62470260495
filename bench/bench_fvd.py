"""Reference FVDs on synthetic data and the cost of I3D feature extraction (docs/design.md, "Evaluation").

    python bench/bench_fvd.py                     # 64 clips a set, 16 frames, 64x64
    python bench/bench_fvd.py --clips 128 --root datasets

Draws 16-frame training shots (evaluate.training_shots, fixed seed) from synth-drive and synth-dance
(generated under --root when missing), splits the synth-drive shots into two disjoint halves, and
prints FVD(drive half A, drive half B), FVD(drive A, dance) and the wall time of I3D feature
extraction per 1000 clips on this device. Appends a row to bench/fvd.csv.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
import record  # noqa: E402
import evaluate  # noqa: E402
from data.synthetic import write_dataset  # noqa: E402

CSV = Path(__file__).with_name("fvd.csv")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="datasets")
    parser.add_argument("--clips", type=int, default=64, help="clips per set")
    parser.add_argument("--window", type=int, default=16)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    device = common.pick_device(args.device)
    roots = {}
    for kind in ("drive", "dance"):
        roots[kind] = Path(args.root) / f"synth_{kind}"
        if not (roots[kind] / "meta.yaml").is_file():
            write_dataset(kind, roots[kind], sequences=8, frames=300, size=(64, 64), seed=0, val=1, test=1)
    drive = evaluate.training_shots(roots["drive"], "train", args.window, max_shots=2 * args.clips, seed=0)
    dance = evaluate.training_shots(roots["dance"], "train", args.window, max_shots=args.clips, seed=0)
    # disjoint halves: every other shot of the sorted draw, so both halves span all sequences
    half_a, half_b = drive[0::2], drive[1::2]
    started = time.perf_counter()
    features = {name: evaluate.shot_features(shots, args.window, device=device, progress=True)
                for name, shots in (("drive_a", half_a), ("drive_b", half_b), ("dance", dance))}
    seconds = time.perf_counter() - started
    clips = sum(len(f) for f in features.values())
    row = {"date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "device": record.device_name(device),
           "torch": torch.__version__, "commit": common.git_commit(), "clips_per_set": args.clips,
           "window": args.window,
           "fvd_drive_halves": round(evaluate.frechet_distance(features["drive_a"], features["drive_b"]), 2),
           "fvd_drive_vs_dance": round(evaluate.frechet_distance(features["drive_a"], features["dance"]), 2),
           "i3d_seconds_per_1000_clips": round(1000 * seconds / clips, 1)}
    for key, value in row.items():
        print(f"{key:28s} {value}")
    record.append_csv(CSV, [row])
    print(f"appended a row to {CSV}")


if __name__ == "__main__":
    main()
