"""Training steps per second of the structure generator of a CPU config (docs/design.md, "Benchmarks").

    python bench/bench_training.py                            # synth_scroll.yaml, 1 and 2 threads
    python bench/bench_training.py --cfg synth_drive.yaml --threads 1 --steps 20

The real train_structure.train_step (forward, loss with the config's born weight, backward, Adam) on
random label clips of the config's shape, for {contiguous fp32 (the baseline), channels-last fp32,
channels-last bf16 autocast (where the CPU has AVX512-BF16 or AMX)} x threads; median seconds per step
over --steps timed steps after 5 warm-up steps, each case in a fresh model. The baseline's row is the
plain eager loop; the others print their speed-up over it at the same thread count. Prints a table and
appends rows to bench/training.csv.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
import record  # noqa: E402
import train_structure  # noqa: E402
from structure_model import build_model  # noqa: E402

CSV = Path(__file__).with_name("training.csv")


def seconds_per_step(cfg, channels_last: bool, steps: int) -> float:
    s = cfg.structure
    torch.manual_seed(0)
    model = build_model(cfg)
    if channels_last:
        model = model.to_channels_last()
    optimizer = torch.optim.Adam(model.parameters(), lr=s.lr)
    scaler = common.grad_scaler(torch.device("cpu"), cfg.run.precision)
    finite = common.FiniteLosses(cfg)
    frames = torch.randint(0, cfg.data.num_classes, (s.batch_size, s.n_past + s.n_future, *cfg.data.size),
                           dtype=torch.uint8)
    times = []
    for step in range(5 + steps):
        start = time.perf_counter()
        train_structure.train_step(model, optimizer, scaler, frames, cfg, step, 255, s.born_weight, finite)
        times.append(time.perf_counter() - start)
    return statistics.median(times[5:])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cfg", default="synth_scroll.yaml")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=30, help="timed steps per case")
    parser.add_argument("--csv", default=str(CSV), help="CSV to append to (default bench/training.csv)")
    parser.add_argument("--no-csv", action="store_true", help="print only")
    args = parser.parse_args(argv)
    cases = [("eager contiguous", False, "fp32"), ("channels-last", True, "fp32")]
    if common.cpu_has_native_bf16():
        cases.append(("channels-last", True, "bf16"))
    device_label = record.device_name(torch.device("cpu"))
    restore, rows = torch.get_num_threads(), []
    for threads in args.threads:
        torch.set_num_threads(threads)
        baseline = None
        for name, channels_last, precision in cases:
            cfg = common.load_config(args.cfg, [f"run.precision={precision}"])
            seconds = seconds_per_step(cfg, channels_last, args.steps)
            baseline = baseline or seconds
            rows.append({"device": device_label, "torch": torch.__version__, "commit": common.git_commit(),
                         "config": args.cfg, "component": "structure", "threads": threads, "mode": name,
                         "precision": precision, "batch": cfg.structure.batch_size,
                         "clip_frames": cfg.structure.n_past + cfg.structure.n_future,
                         "ms_per_step": round(seconds * 1e3, 2), "steps_per_min": round(60 / seconds),
                         "vs_baseline": round(baseline / seconds, 3)})
            r = rows[-1]
            print(f"structure {args.cfg} threads={threads} {name:17s} {precision:5s} {r['ms_per_step']:8.1f} ms/step "
                  f"{r['steps_per_min']:6d} steps/min  {r['vs_baseline']:.2f}x baseline", flush=True)
    torch.set_num_threads(restore)
    if not args.no_csv:
        record.append_csv(args.csv, rows)
        print(f"appended {len(rows)} rows to {args.csv}")


if __name__ == "__main__":
    main()
