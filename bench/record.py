"""What every benchmark records beside its numbers: the device, the Triton version, and an atomic CSV append."""
from __future__ import annotations

import csv
import io
import platform
from pathlib import Path

import torch

import common


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    # the vector ISA torch dispatches to and native bf16 tell apart machines that share a model name
    # (AMD EPYC with AVX2 only, or with AVX-512 and AVX512-BF16), whose speeds and precision differ
    isa = torch.backends.cpu.get_cpu_capability()
    bf16 = ", native bf16" if common.cpu_has_native_bf16() else ""
    return f"CPU {model} {isa}{bf16} ({torch.get_num_threads()} threads)"


def triton_version() -> str:
    try:
        import triton
        return triton.__version__
    except Exception as err:  # missing or broken: the record says so
        return f"unavailable ({type(err).__name__})"


def append_csv(path, rows: list[dict], fields: list[str] | None = None) -> None:
    """Append rows atomically (old content plus the new rows to a temp file renamed over the CSV); a file
    whose header differs from `fields` (default: the first row's keys) is refused rather than mixed."""
    path, fields = Path(path), list(fields or rows[0])
    old = path.read_text() if path.exists() else ""
    if old and old.splitlines()[0].split(",") != fields:
        raise SystemExit(f"{path}: header differs from {fields}; move the file aside")
    text = io.StringIO(newline="")
    # "\n" as read_text() hands back the old rows: csv's default "\r\n" left a file mixing the two
    writer = csv.DictWriter(text, fieldnames=fields, lineterminator="\n")
    if not old:
        writer.writeheader()
    writer.writerows(rows)
    common.atomic_write_bytes(path, (old + text.getvalue()).encode())
