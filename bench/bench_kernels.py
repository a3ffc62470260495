"""Benchmark the fused kernels against the unfused torch ops they replace (docs/design.md, "Kernels" and "Benchmarks").

    python bench/bench_kernels.py                 # every kernel, realistic shapes, fp32 (+ bf16 on CUDA)
    python bench/bench_kernels.py --quick         # small batch, few repetitions
    python bench/bench_kernels.py --batch 16 --sizes 64 --dtypes fp32,fp16 --no-csv

For each kernel and shape: the median wall time of one call (forward, or forward + backward) after
warm-up, with the device synchronised around every timed call; the achieved bandwidth, counting the
bytes the fused kernel must move at least (every input read once, every output written once); and the
ratio of that bandwidth to a device-to-device copy of the same number of bytes measured in the same
run. On CUDA both paths run: "fused" (Triton) and "torch" (the plain-torch reference, i.e. the
unfused ops). On CPU only the torch path is timed: the Triton interpreter is a correctness tool, not a
performance path. Results print as a table and are appended to bench/kernels.csv with the device,
torch/triton versions and git commit.
"""

import argparse
import datetime
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import kernels  # noqa: E402
from record import append_csv, device_name, triton_version  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
CSV_FIELDS = ["date_utc", "device", "torch", "triton", "commit", "kernel", "pass", "shape", "dtype", "path",
              "median_ms", "gb_per_s", "copy_gb_per_s", "ratio_to_copy", "bytes", "load_avg"]


# ----------------------------------------------------------------------------- timing

def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn, device, reps, warmup, budget_s):
    """Median of `reps` synchronised calls after `warmup` calls; stops early (>= 3 calls) past budget_s."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times, start = [], time.perf_counter()
    while len(times) < reps and (len(times) < 3 or time.perf_counter() - start < budget_s):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_seconds(n_bytes, device, reps, warmup, budget_s):
    """Median time of a device-to-device copy that reads n_bytes / 2 and writes n_bytes / 2."""
    half = max(1, n_bytes // 2)
    src = torch.empty(half, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    return median_seconds(lambda: dst.copy_(src), device, reps, warmup, budget_s)


# ----------------------------------------------------------------------------- cases
# Each case builds its inputs once and returns (call, bytes): call() runs the public function once
# (forward, or forward + backward), bytes is the minimum traffic of the fused kernel(s).

def case_convlstm(B, C, H, W, dtype, device, backward):
    s, pixels = torch.tensor([], dtype=dtype).element_size(), B * H * W
    gates = torch.randn(B, 4 * C, H, W, device=device, dtype=dtype, requires_grad=backward)
    c_prev = torch.randn(B, C, H, W, device=device, requires_grad=backward)
    n_bytes = pixels * C * (4 * s + 4 + s + 4)
    if not backward:
        return (lambda: kernels.convlstm_cell(gates, c_prev)), n_bytes
    grad_h, grad_c = torch.randn(B, C, H, W, device=device, dtype=dtype), torch.randn(B, C, H, W, device=device)

    def call():
        h, c = kernels.convlstm_cell(gates, c_prev)
        torch.autograd.grad((h, c), (gates, c_prev), (grad_h, grad_c))
    return call, n_bytes + pixels * C * (4 * s + 4 + s + 4 + 4 * s + 4)


def case_warp_blend(B, C, H, W, dtype, device, backward):
    s, pixels = torch.tensor([], dtype=dtype).element_size(), B * H * W
    prev = torch.randn(B, C, H, W, device=device, dtype=dtype)  # detached, as vid2vid's previous frame
    flow = (torch.randn(B, 2, H, W, device=device) * 3).to(dtype).requires_grad_(backward)
    mask = torch.rand(B, 1, H, W, device=device, dtype=dtype, requires_grad=backward)
    hallucinated = torch.randn(B, C, H, W, device=device, dtype=dtype, requires_grad=backward)
    n_bytes = pixels * s * (C + 2 + 1 + C + C)
    if not backward:
        return (lambda: kernels.warp_blend(prev, flow, mask, hallucinated)), n_bytes
    grad = torch.randn(B, C, H, W, device=device, dtype=dtype)

    def call():
        out = kernels.warp_blend(prev, flow, mask, hallucinated)
        torch.autograd.grad(out, (flow, mask, hallucinated), grad)
    return call, n_bytes + pixels * s * (C + 2 + 1 + C + C + 2 + 1 + C)


def case_argmax_onehot(B, N, H, W, dtype, device, backward):
    s, pixels = torch.tensor([], dtype=dtype).element_size(), B * H * W
    logits = torch.randn(B, N, H, W, device=device, dtype=dtype)
    return (lambda: kernels.argmax_onehot(logits)), pixels * (N * s + 1 + N * s)


def case_onehot_conv3x3(B, N, H, W, dtype, device, backward, c_out=64):
    s, pixels = torch.tensor([], dtype=dtype).element_size(), B * H * W
    index = torch.randint(0, N, (B, H, W), device=device, dtype=torch.uint8)
    weight = torch.randn(c_out, N, 3, 3, device=device, dtype=dtype, requires_grad=backward)
    bias = torch.randn(c_out, device=device, dtype=dtype, requires_grad=backward)
    n_bytes = pixels * (1 + c_out * s)
    if not backward:
        return (lambda: kernels.onehot_conv3x3(index, weight, bias)), n_bytes
    grad = torch.randn(B, c_out, H, W, device=device, dtype=dtype)

    def call():
        out = kernels.onehot_conv3x3(index, weight, bias)
        torch.autograd.grad(out, (weight, bias), grad)
    return call, n_bytes + pixels * (1 + c_out * s)


def plan(args, on_cuda):
    """(kernel name, case builder, (B, C or N, H, W), passes) for the requested sizes."""
    rows = []
    b = args.batch
    rows.append(("convlstm_cell", case_convlstm, (b, 256, 8, 8), ("fwd", "fwd+bwd")))
    for size in args.sizes:
        bs = b if (on_cuda or size <= 64) else min(b, args.cpu_batch_large)
        rows.append(("warp_blend", case_warp_blend, (bs, 3, size, size), ("fwd", "fwd+bwd")))
        rows.append(("argmax_onehot", case_argmax_onehot, (bs, 19, size, size), ("fwd",)))
        rows.append(("onehot_conv3x3", case_onehot_conv3x3, (bs, 19, size, size), ("fwd", "fwd+bwd")))
    return rows


# ----------------------------------------------------------------------------- environment record

def git_commit():
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "kernels", "bench/bench_kernels.py"],
                               cwd=ROOT, capture_output=True, text=True).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# ----------------------------------------------------------------------------- main

def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=100, help="batch size B (default 100)")
    parser.add_argument("--sizes", default="64,256", help="square map sizes for warp/onehot (default 64,256)")
    parser.add_argument("--dtypes", default=None, help="fp32,bf16,fp16 (default fp32,bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--cpu-batch-large", type=int, default=8,
                        help="on CPU, batch for sizes above 64 so that the run takes minutes (default 8)")
    parser.add_argument("--reps", type=int, default=None, help="timed calls per case (default 50 CUDA, 10 CPU)")
    parser.add_argument("--budget", type=float, default=None, help="seconds per timed case before stopping early")
    parser.add_argument("--quick", action="store_true", help="batch 8, sizes 64, 3 repetitions")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--csv", default=str(ROOT / "bench" / "kernels.csv"), help="CSV to append to")
    parser.add_argument("--no-csv", action="store_true", help="print only")
    args = parser.parse_args()
    if args.quick:
        args.batch, args.sizes, args.reps = 8, "64", args.reps or 3
    try:
        args.sizes = [int(s) for s in str(args.sizes).split(",") if s]
    except ValueError:
        parser.error(f"--sizes must be comma-separated integers, got {args.sizes!r}")
    if args.batch < 1 or not args.sizes or min(args.sizes) < 1:
        parser.error("--batch and --sizes must be positive")
    return args


def main():
    args = parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_cuda = device.type == "cuda"
    if on_cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    dtype_names = (args.dtypes or ("fp32,bf16" if on_cuda else "fp32")).split(",")
    unknown = [d for d in dtype_names if d not in DTYPES]
    if unknown:
        raise SystemExit(f"--dtypes: unknown {unknown}; choose from {list(DTYPES)}")
    reps = args.reps or (50 if on_cuda else 10)
    warmup = 5 if on_cuda else 1
    budget = args.budget if args.budget is not None else (10.0 if on_cuda else 4.0)
    paths = ["fused", "torch"] if on_cuda else ["torch"]
    if on_cuda and not kernels.HAS_TRITON:
        print(f"triton is not usable ({kernels._dispatch.TRITON_ERROR}); timing the torch path only")
        paths = ["torch"]
    if not on_cuda:
        print("CPU: timing the torch path only (the Triton interpreter is not a performance path)")

    record = dict(date_utc=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                  device=device_name(device), torch=torch.__version__, triton=triton_version(), commit=git_commit(),
                  load_avg=f"{os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "")
    # the 1-minute load average is recorded because a shared host makes CPU timings noisy
    print(f"{record['device']} | torch {record['torch']} | triton {record['triton']} | commit {record['commit']} "
          f"| load {record['load_avg']}")
    header = f"{'kernel':<15} {'pass':<8} {'shape (B,C,H,W)':<20} {'dtype':<5} {'path':<6} " \
             f"{'median ms':>10} {'GB/s':>8} {'copy GB/s':>10} {'x copy':>7}"
    print(header)
    print("-" * len(header))
    rows = []
    copy_cache = {}
    for name, build, shape, passes in plan(args, on_cuda):
        for dtype_name in dtype_names:
            dtype = DTYPES[dtype_name]
            for pass_name in passes:
                backward = pass_name == "fwd+bwd"
                call, n_bytes = build(*shape, dtype, device, backward)
                if n_bytes not in copy_cache:
                    copy_cache[n_bytes] = copy_seconds(n_bytes, device, reps, warmup, budget)
                copy_gbps = n_bytes / copy_cache[n_bytes] / 1e9
                for path in paths:
                    with kernels.using_backend("triton" if path == "fused" else "torch"):
                        seconds = median_seconds(call, device, reps, warmup, budget)
                    gbps = n_bytes / seconds / 1e9
                    row = dict(record, kernel=name, shape="x".join(map(str, shape)), dtype=dtype_name,
                               path=path, median_ms=f"{seconds * 1e3:.4f}", gb_per_s=f"{gbps:.2f}",
                               copy_gb_per_s=f"{copy_gbps:.2f}", ratio_to_copy=f"{gbps / copy_gbps:.3f}",
                               bytes=n_bytes, **{"pass": pass_name})
                    rows.append(row)
                    print(f"{name:<15} {pass_name:<8} {str(shape):<20} {dtype_name:<5} {path:<6} "
                          f"{seconds * 1e3:>10.3f} {gbps:>8.2f} {copy_gbps:>10.2f} {gbps / copy_gbps:>7.3f}",
                          flush=True)
                del call
    if not args.no_csv:
        append_csv(args.csv, rows, CSV_FIELDS)
        print(f"appended {len(rows)} rows to {args.csv}")


if __name__ == "__main__":
    main()
