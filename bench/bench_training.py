"""Training steps per second of a CPU config's three trainers (docs/design.md, "Benchmarks").

    python bench/bench_training.py                            # synth_scroll.yaml: structure and image, 1 and 2 threads
    python bench/bench_training.py --cfg synth_drive.yaml --components edge --threads 1 --steps 20

Each trainer's real train_step on random inputs of the config's shape, each case in fresh models, median
seconds per step over --steps timed steps after 5 warm-up steps:
- structure: train_structure.train_step (forward, loss with the config's born weight, backward, Adam) on label
  clips of structure.n_past + n_future frames, for {contiguous, channels-last (the trainer's layout)} x
  {fp32, bf16 autocast}, contiguous fp32 the baseline;
- image: train_image.train_step (generator, image and video discriminators, both Adam steps) on clips of
  image.tau + image.frames_max frames (the curriculum's longest), for {fp32 (the baseline), bf16 autocast};
- edge: train_edge.train_step (discriminator, then generator) on edge.batch_size frames, {fp32, bf16}.
bf16 rows only where the CPU has AVX512-BF16 or AMX (emulated bf16 is slower than fp32). The baseline's
row is the plain eager loop in fp32; the others print their speed-up over it at the same thread count.
Prints a table and appends rows to bench/training.csv.
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
import train_edge  # noqa: E402
import train_image  # noqa: E402
import train_structure  # noqa: E402
from edge_model import build_discriminator as build_edge_discriminator  # noqa: E402
from edge_model import build_model as build_edge  # noqa: E402
from image_model import build_discriminators  # noqa: E402
from image_model import build_model as build_image  # noqa: E402
from structure_model import build_model as build_structure  # noqa: E402

CSV = Path(__file__).with_name("training.csv")


def median_seconds(step, steps: int) -> float:
    times = []
    for i in range(5 + steps):
        start = time.perf_counter()
        step(i)
        times.append(time.perf_counter() - start)
    return statistics.median(times[5:])


def structure_step(cfg, channels_last: bool):
    s = cfg.structure
    model = build_structure(cfg)
    if channels_last:
        model = model.to_channels_last()
    optimizer = torch.optim.Adam(model.parameters(), lr=s.lr)
    scaler = common.grad_scaler(torch.device("cpu"), cfg.run.precision)
    finite = common.FiniteLosses(cfg)
    frames = torch.randint(0, cfg.data.num_classes, (s.batch_size, s.n_past + s.n_future, *cfg.data.size),
                           dtype=torch.uint8)
    return lambda i: train_structure.train_step(model, optimizer, scaler, frames, cfg, i, 255, s.born_weight, finite)


def image_step(cfg, channels_last: bool):
    ic, (height, width) = cfg.image, cfg.data.size
    generator = build_image(cfg)
    image_d, video_d = build_discriminators(cfg)
    optimizers = {name: torch.optim.Adam(m.parameters(), ic.lr, betas=(ic.beta1, ic.beta2))
                  for name, m in (("generator", generator), ("image_d", image_d), ("video_d", video_d))}
    nets = {"generator": generator, "image_d": image_d, "video_d": video_d, "image_d_ddp": image_d,
            "video_d_ddp": list(video_d), "perceptual": None}  # lambda_vgg: the CPU configs train without VGG
    shape = (ic.batch_size, ic.tau + ic.frames_max)
    batch = {"label": torch.randint(0, cfg.data.num_classes, (*shape, height, width), dtype=torch.uint8),
             "rgb": torch.randint(0, 256, (*shape, 3, height, width), dtype=torch.uint8),
             "instance": torch.randint(0, 4, (*shape, height, width), dtype=torch.int32),
             "flow": torch.randn(*shape, 2, height, width)}
    inputs = train_image.prepare_batch(batch, cfg, torch.device("cpu"))
    scaler = common.grad_scaler(torch.device("cpu"), cfg.run.precision)
    finite = common.FiniteLosses(cfg)
    return lambda i: train_image.train_step(nets, optimizers, scaler, inputs, cfg, i, 0, finite)


def edge_step(cfg, channels_last: bool):
    e = cfg.edge
    generator, discriminator = build_edge(cfg), build_edge_discriminator(cfg)
    opt_g = torch.optim.Adam(generator.parameters(), lr=e.lr, betas=(e.beta1, e.beta2))
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=e.lr * e.d_lr_ratio, betas=(e.beta1, e.beta2))
    scalers = {k: common.grad_scaler(torch.device("cpu"), cfg.run.precision) for k in ("g", "d")}
    labels = torch.randint(0, cfg.data.num_classes, (e.batch_size, *cfg.data.size), dtype=torch.uint8)
    truth = torch.rand(e.batch_size, *cfg.data.size) < 0.1
    finite = common.FiniteLosses(cfg)
    return lambda i: train_edge.train_step(generator, discriminator, opt_g, opt_d, scalers, labels, truth, cfg, i,
                                           finite)


# component -> (step factory, its cases as (mode, channels-last, precision), the batch, frames per clip)
COMPONENTS = {
    "structure": (structure_step, [("eager contiguous", False, "fp32"), ("channels-last", True, "fp32"),
                                   ("eager contiguous", False, "bf16"), ("channels-last", True, "bf16")],
                  lambda cfg: (cfg.structure.batch_size, cfg.structure.n_past + cfg.structure.n_future)),
    "image": (image_step, [("eager", False, "fp32"), ("eager", False, "bf16")],
              lambda cfg: (cfg.image.batch_size, cfg.image.tau + cfg.image.frames_max)),
    "edge": (edge_step, [("eager", False, "fp32"), ("eager", False, "bf16")],
             lambda cfg: (cfg.edge.batch_size, 1)),
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cfg", default="synth_scroll.yaml")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--components", nargs="+", choices=sorted(COMPONENTS),
                        help="default: structure, image, and edge where the config enables it")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per case")
    parser.add_argument("--csv", default=str(CSV), help="CSV to append to (default bench/training.csv)")
    parser.add_argument("--no-csv", action="store_true", help="print only")
    args = parser.parse_args(argv)
    base = common.load_config(args.cfg, [])
    components = args.components or ["structure", "image"] + (["edge"] if base.edge.enabled else [])
    native_bf16 = common.cpu_has_native_bf16()
    device_label = record.device_name(torch.device("cpu"))
    restore, rows = torch.get_num_threads(), []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for component in components:
            factory, cases, shape = COMPONENTS[component]
            baseline = None
            for name, channels_last, precision in cases:
                if precision == "bf16" and not native_bf16:
                    continue
                cfg = common.load_config(args.cfg, [f"run.precision={precision}"])
                torch.manual_seed(0)
                seconds = median_seconds(factory(cfg, channels_last), args.steps)
                baseline = baseline or seconds
                batch, clip_frames = shape(cfg)
                rows.append({"device": device_label, "torch": torch.__version__, "commit": common.git_commit(),
                             "config": args.cfg, "component": component, "threads": threads, "mode": name,
                             "precision": precision, "batch": batch, "clip_frames": clip_frames,
                             "ms_per_step": round(seconds * 1e3, 2), "steps_per_min": round(60 / seconds),
                             "vs_baseline": round(baseline / seconds, 3)})
                r = rows[-1]
                print(f"{component:9s} {args.cfg} threads={threads} {name:17s} {precision:5s} {r['ms_per_step']:8.1f} "
                      f"ms/step {r['steps_per_min']:6d} steps/min  {r['vs_baseline']:.2f}x baseline", flush=True)
    torch.set_num_threads(restore)
    if not args.no_csv:
        record.append_csv(args.csv, rows)
        print(f"appended {len(rows)} rows to {args.csv}")


if __name__ == "__main__":
    main()
