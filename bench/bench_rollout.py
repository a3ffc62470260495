"""Rollout throughput of the paper's 64x64 KITTI generators (docs/design.md, "Benchmarks").

    python bench/bench_rollout.py                       # batches 1, 10, 100; every variant this device has
    python bench/bench_rollout.py --batches 1 10 --steps 20 --cfg kitti64.yaml

For the structure step and the image step separately, at each batch size, for
{eager torch, fused kernels, fused + CUDA graph} x {fp32, bf16} in the rollout's layout (rollout.channels_last;
on CPU the eager step is also measured contiguous), and for the structure step the baseline
`plain` (bench/plain_structure.py: the same weights as a plain eager build, nothing fused, every tensor
contiguous; the speed-up of each mode over it is printed): frame-steps per second (batch x
steps / time), peak memory, the FLOPs of one step per frame (torch.utils.flop_counter), and the
achieved fraction of this device's ceiling measured in the same run (ceiling_rate: the best of a matmul
and the generators' 3x3 convolutions at the same precision, threads and TF32 setting). Fused kernels
need a CUDA device (on CPU Triton only runs in the interpreter, which is a test path, not a speed
path); CUDA graphs need CUDA; bf16 runs where the device computes it natively (run.precision=auto's
rule). Weights are random: the cost of a step does not depend on them. Prints a table and appends rows
to bench/rollout.csv.
"""
from __future__ import annotations

import argparse
import copy
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
import record  # noqa: E402
import kernels  # noqa: E402
import image_model  # noqa: E402
import structure_model  # noqa: E402
from plain_structure import PlainStructureStep  # noqa: E402
from rollout import StepRunner  # noqa: E402

CSV = Path(__file__).with_name("rollout.csv")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rate(fn, flops: float, device, reps: int = 5) -> float:
    fn()
    sync(device)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return flops / statistics.median(times)


def ceiling_rate(device, dtype, batch: int = 10) -> tuple[float, str]:
    """The rate the steps are compared with: the best of a dense 2048^3 matmul and 3x3 convolutions at the
    widths and sizes of the 64x64 generators (channels-last), measured here at the step's precision and
    thread count. On CUDA the matmul uses TF32 exactly when the convolutions do (cudnn.allow_tf32), so an
    fp32 step is not compared with a slower fp32 matmul. On CPU oneDNN's convolutions beat its fp32 matmul
    (a matmul-only ceiling put the fp32 step at 145%). Returns (FLOP/s, which op set it)."""
    size = 2048
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    matmul_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32
    try:
        tf32 = " TF32" if device.type == "cuda" and dtype == torch.float32 and torch.backends.cudnn.allow_tf32 else ""
        rates = {f"matmul {size}^3{tf32}": _rate(lambda: a @ b, 2 * size**3, device)}
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
    for width, side in ((64, 64), (128, 32), (256, 16), (256, 8)):
        x = torch.randn(batch, width, side, side, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
        w = torch.randn(width, width, 3, 3, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            rates[f"conv3x3 {width}ch {side}x{side}{tf32}"] = _rate(lambda: torch.nn.functional.conv2d(x, w, padding=1),
                                                                   2 * batch * width * width * 9 * side * side, device)
    best = max(rates, key=rates.get)
    return rates[best], best


class StructureStep:
    """structure.step on a fixed batch, after a short context."""

    def __init__(self, model, batch, device, generator):
        self.model, self.generator, self.device = model, generator, device
        self.state = model.init_state(batch, 1, device)
        height, width = model.size
        context = torch.randint(0, model.num_classes, (batch, height, width), dtype=torch.uint8, device=device)
        for _ in range(2):
            model.observe(self.state, context, generator)

    def step(self, generator):
        return {"label": self.model.step(self.state, generator)}

    def state_tensors(self):
        from rollout import _tensors_of
        return _tensors_of(self.state)


class ImageStep:
    """image.step on a fixed batch; its ring buffers are updated in place like the rollout does."""

    def __init__(self, model, batch, device, num_classes, size):
        self.model, self.device = model, device
        height, width = size
        self.labels = torch.randint(0, num_classes, (batch, height, width), dtype=torch.uint8, device=device)
        # a boundary channel when the generator takes one (its values do not change the cost)
        self.edges = torch.zeros(batch, 1, height, width, device=device) if model.use_edges else None
        self.state = model.init_state(torch.zeros(batch, model.tau, 3, height, width, device=device),
                                      self.labels[:, None].expand(-1, model.tau, -1, -1),
                                      None if self.edges is None else self.edges[:, None].expand(-1, model.tau, -1, -1, -1))

    @torch.inference_mode()
    def step(self, generator):
        rgb, new_state = self.model.step(self.state, self.labels, self.edges)
        for key, value in new_state.items():
            self.state[key].copy_(value)
        return {"rgb": rgb}

    def state_tensors(self):
        return list(self.state.values())


def flops_per_frame(stepper, batch, generator) -> float:
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        stepper.step(generator)
    return counter.get_total_flops() / batch


def measure(stepper, device, precision, use_graph, steps, generator) -> tuple[float, float]:
    """Median seconds per step over `steps` timed steps after warm-up, and peak memory in MiB."""
    stepper.device = device
    runner = StepRunner(stepper, generator, use_graph, precision)   # autocast, as in rollout.py
    for _ in range(3):
        runner()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        runner()
        sync(device)
        times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:  # the process's peak resident set: an upper bound that includes Python and the weights
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return statistics.median(times), peak


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cfg", default="kitti64.yaml")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 10, 100])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--csv", default=str(CSV), help="CSV to append to (default bench/rollout.csv)")
    parser.add_argument("--no-csv", action="store_true", help="print only")
    args = parser.parse_args(argv)
    cfg = common.load_config(args.cfg)
    device = common.pick_device(args.device)
    on_cuda = device.type == "cuda"
    triton_ok = on_cuda and torch.cuda.get_device_capability(device) >= (8, 0)
    modes = [("eager", "torch", False)] + ([("fused", "triton", False), ("fused+graph", "triton", True)] if triton_ok else [])
    # emulated bf16 (a CPU without AVX512-BF16 / AMX) runs ~50x slower than fp32 and says nothing about a rollout
    precisions = ["fp32"] + (["bf16"] if common.resolve_precision("auto", device) == "bf16" else [])
    structure = structure_model.build_model(cfg).to(device).for_rollout(channels_last=False)
    contiguous = structure
    if cfg.rollout.channels_last:   # the rollout's layout; contiguous measured beside it on CPU
        structure = copy.deepcopy(contiguous).for_rollout(channels_last=True)
        if not on_cuda:
            modes.insert(0, ("eager contiguous", "torch", False))
    image = image_model.build_model(cfg).to(device).eval()
    if not on_cuda:
        print("CPU: fused Triton kernels and CUDA graphs need a CUDA device; measuring the eager torch path.")
    device_label, triton_version = record.device_name(device), record.triton_version()
    ceilings = {p: ceiling_rate(device, torch.float32 if p == "fp32" else torch.bfloat16) for p in precisions}
    rows = []
    for component in ("structure", "image"):
        for batch in args.batches:
            generator = torch.Generator(device).manual_seed(0)
            with torch.inference_mode():
                stepper = (StructureStep(structure, batch, device, generator) if component == "structure"
                           else ImageStep(image, batch, device, cfg.data.num_classes, cfg.data.size))
                measured = modes if component == "structure" else [m for m in modes if m[0] != "eager contiguous"]
                steppers = ({"eager contiguous": StructureStep(contiguous, batch, device, generator)}
                            if ("eager contiguous", "torch", False) in measured else {})
                flops = flops_per_frame(stepper, batch, generator)
                plain = PlainStructureStep(contiguous, batch, device, generator) if component == "structure" else None
            baseline = {}
            for mode, backend, use_graph in ([("plain", "torch", False)] if plain else []) + measured:
                kernels.set_backend(backend)
                for precision in precisions:
                    with torch.inference_mode():
                        seconds, peak = measure(plain if mode == "plain" else steppers.get(mode, stepper), device,
                                                precision, use_graph, args.steps, generator)
                    baseline.setdefault(precision, seconds)
                    achieved = flops * batch / seconds
                    rows.append({"device": device_label, "torch": torch.__version__, "triton": triton_version,
                                 "commit": common.git_commit(), "config": args.cfg, "component": component,
                                 "batch": batch, "mode": mode, "precision": precision,
                                 "ms_per_step": round(seconds * 1e3, 3), "frames_per_s": round(batch / seconds, 1),
                                 "peak_mib": round(peak, 1), "gflop_per_frame": round(flops / 1e9, 3),
                                 "achieved_tflops": round(achieved / 1e12, 4),
                                 "ceiling_tflops": round(ceilings[precision][0] / 1e12, 3),
                                 "ceiling_op": ceilings[precision][1],
                                 "fraction_of_ceiling": round(achieved / ceilings[precision][0], 4),
                                 "vs_plain": round(baseline[precision] / seconds, 3) if plain else ""})
                    r = rows[-1]
                    print(f"{component:9s} b={batch:<4d} {mode:12s} {precision:5s} {r['ms_per_step']:9.2f} ms/step "
                          f"{r['frames_per_s']:9.1f} frames/s  peak {r['peak_mib']:8.1f} MiB  "
                          f"{r['gflop_per_frame']:.2f} GFLOP/frame  {100 * r['fraction_of_ceiling']:.1f}% of ceiling"
                          + (f"  {r['vs_plain']:.2f}x plain" if plain else ""), flush=True)
    kernels.set_backend("auto")
    if not args.no_csv:
        record.append_csv(args.csv, rows)
        print(f"appended {len(rows)} rows to {args.csv}")


if __name__ == "__main__":
    main()
