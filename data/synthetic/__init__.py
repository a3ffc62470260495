"""Synthetic datasets in the common layout, generated deterministically from a seed.

    synth-drive  a forward-moving camera on a procedural road (19 Cityscapes trainIds)   data/synthetic/drive.py
    synth-dance  one articulated figure dancing (background + 24 DensePose parts)        data/synthetic/dance.py
    synth-scroll a side-scrolling landscape at 32x32 (9 classes): pixel-exact motion,     data/synthetic/scroll.py
                 random births at the edges (the CPU-scale world)
    synth-lanes  lanes of traffic and logs seen from above at 32x32 (7 classes): each     data/synthetic/lanes.py
                 sequence its own speeds, random entries upstream (the held-out check)
    synth-rain   vertical shafts at 32x32 (8 classes): drops fall, boxes rise, lamps       data/synthetic/rain.py
                 switch and drops freeze in place (a second held-out check)

All five write label, rgb, instance and exact backward flow for every frame:

    python -m data.synthetic drive --out datasets/synth_drive --sequences 40 --frames 300 --size 64 --seed 0
    python -m data.synthetic dance --out datasets/synth_dance --sequences 40 --frames 300 --size 128x128
    python -m data.synthetic preview drive --out docs/synth_drive.png      # frame grid: labels over RGB

Each sequence's randomness comes from (seed, split, index) alone, so a sequence does not depend on
how many others are generated. Sequences are written to a temporary folder and renamed when
complete; a rerun with the same arguments skips the complete ones. meta.yaml is written last, so a
root with meta.yaml is a complete dataset.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import yaml

from data.synthetic import (dance as synth_dance, drive as synth_drive, lanes as synth_lanes, rain as synth_rain,
                            scroll as synth_scroll)

GENERATOR_VERSION = 1
SPLITS = ("train", "val", "test")

DRIVE_CLASSES = synth_drive.CLASSES
DRIVE_PALETTE = synth_drive.PALETTE
DANCE_CLASSES = synth_dance.CLASSES
DANCE_PALETTE = synth_dance.PALETTE
SCROLL_CLASSES = synth_scroll.CLASSES
SCROLL_PALETTE = synth_scroll.PALETTE
LANES_CLASSES = synth_lanes.CLASSES
LANES_PALETTE = synth_lanes.PALETTE
RAIN_CLASSES = synth_rain.CLASSES
RAIN_PALETTE = synth_rain.PALETTE

KINDS = {
    # kind: (meta kind, class names, palette, fps, frame generator)
    "drive": ("synth-drive", DRIVE_CLASSES, DRIVE_PALETTE, synth_drive.FPS, synth_drive.render_drive),
    "dance": ("synth-dance", DANCE_CLASSES, DANCE_PALETTE, synth_dance.FPS, synth_dance.render_dance),
    "scroll": ("synth-scroll", SCROLL_CLASSES, SCROLL_PALETTE, synth_scroll.FPS, synth_scroll.render_scroll),
    "lanes": ("synth-lanes", LANES_CLASSES, LANES_PALETTE, synth_lanes.FPS, synth_lanes.render_lanes),
    "rain": ("synth-rain", RAIN_CLASSES, RAIN_PALETTE, synth_rain.FPS, synth_rain.render_rain),
}
MODALITIES = ("label", "rgb", "instance", "flow")


def parse_size(size) -> tuple[int, int]:
    """64, '64', '128x256', (128, 256) or [128, 256] -> (height, width)."""
    if isinstance(size, str):
        parts = size.lower().split("x")
        try:
            values = [int(p) for p in parts]
        except ValueError:
            raise ValueError(f"size {size!r}: expected N or HxW, e.g. 64 or 128x256") from None
    elif isinstance(size, (int, np.integer)):
        values = [int(size)]
    else:
        values = [int(v) for v in size]
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or min(values) < 16 or max(values) > 4096:
        raise ValueError(f"size {size!r}: need one or two sides between 16 and 4096 pixels")
    return values[0], values[1]


def _check_kind(kind: str) -> str:
    kind = kind.replace("synth-", "")
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r}: expected one of {sorted(KINDS)} (or the same with synth- in front)")
    return kind


def iter_sequence(kind: str, seed: int, frames: int, size):
    """Yields one dict per frame: label (H, W) uint8, rgb (H, W, 3) uint8, instance (H, W) uint16,
    flow (2, H, W) float32 backward flow in pixels (frame 0: zeros)."""
    kind = _check_kind(kind)
    if int(frames) < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    yield from KINDS[kind][4](int(seed), int(frames), parse_size(size))


def generate_sequence(kind: str, seed: int, frames: int, size) -> dict:
    """One whole sequence in memory: label (T, H, W) uint8, rgb (T, H, W, 3) uint8,
    instance (T, H, W) uint16, flow (T, 2, H, W) float32."""
    stacks = {m: [] for m in MODALITIES}
    for frame in iter_sequence(kind, seed, frames, size):
        for m in MODALITIES:
            stacks[m].append(frame[m])
    return {m: np.stack(v) for m, v in stacks.items()}


def sequence_seed(seed: int, split: str, index: int) -> int:
    """The seed of sequence `index` of `split`: a hash of (seed, split, index) only."""
    state = np.random.SeedSequence(entropy=int(seed), spawn_key=(SPLITS.index(split), int(index)))
    return int(state.generate_state(1, dtype=np.uint32)[0])


def _write_frame(seq_dir: Path, modality: str, t: int, array: np.ndarray) -> None:
    from PIL import Image
    folder = seq_dir / modality
    if modality == "flow":
        np.save(folder / f"{t:06d}.npy", array.astype(np.float16))
    elif modality == "instance":
        Image.fromarray(np.ascontiguousarray(array, dtype=np.uint16)).save(folder / f"{t:06d}.png", compress_level=1)
    else:
        Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8)).save(folder / f"{t:06d}.png", compress_level=1)


def _complete(seq_dir: Path, frames: int) -> bool:
    """A sequence folder only appears by rename once it is complete; still check the file counts."""
    for m in MODALITIES:
        folder = seq_dir / m
        if not folder.is_dir() or len(os.listdir(folder)) != frames:
            return False
    return True


def _write_sequence(kind: str, sequence_seed_value: int, frames: int, size, seq_dir: Path, on_frame=None) -> Path:
    """Render one sequence into a temporary folder beside `seq_dir`, then rename it into place."""
    tmp = seq_dir.parent / f".{seq_dir.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    for m in MODALITIES:
        (tmp / m).mkdir(parents=True)
    for t, frame in enumerate(iter_sequence(kind, sequence_seed_value, frames, size)):
        for m in MODALITIES:
            _write_frame(tmp, m, t, frame[m])
        if on_frame is not None:
            on_frame()
    if seq_dir.exists():            # an incomplete folder from elsewhere: replace it
        shutil.rmtree(seq_dir)
    os.replace(tmp, seq_dir)
    return seq_dir


def cpu_cores() -> int:
    """The cores this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def write_dataset(kind: str, out, sequences: int, frames: int, size, seed: int = 0, val: int = 2, test: int = 2,
                  progress: bool = True, workers: int = 0) -> Path:
    """Generate a dataset in the common layout under `out` (see the module docstring), one sequence per
    process over `workers` processes (0: one per CPU core). Every sequence depends on (seed, split, index)
    alone, so the files are the same whatever the number of workers."""
    kind = _check_kind(kind)
    height, width = parse_size(size)
    counts = {"train": int(sequences), "val": int(val), "test": int(test)}
    if min(counts.values()) < 0 or int(frames) < 1:
        raise ValueError(f"sequences/val/test must be >= 0 and frames >= 1, got {counts} and frames={frames}")
    if int(workers) < 0:
        raise ValueError(f"workers must be >= 0 (0 = one per CPU core), got {workers}")
    meta_kind, names, palette, fps, _ = KINDS[kind]
    generator = {"seed": int(seed), "sequences": counts, "frames": int(frames), "version": GENERATOR_VERSION}
    meta = {"kind": meta_kind, "num_classes": len(names), "class_names": list(names),
            "palette": [list(map(int, c)) for c in palette], "ignore_index": 255, "fps": int(fps),
            "size": [height, width], "generator": generator}
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    # only into a new (or empty) folder or one this function made: never over, or beside, a user's files
    if not (root / ".generator.yaml").is_file() and any(root.iterdir()):
        raise ValueError(f"{root} exists and holds files that data.synthetic did not write (no .generator.yaml): "
                         f"synthetic data is generated only into a new folder; give another one (--out, data.root)")
    # the arguments of this run; a run with other arguments must not mix into the same folder
    for name in (".generator.yaml", "meta.yaml"):
        path = root / name
        if path.is_file():
            try:
                found = yaml.safe_load(path.read_text()) or {}
            except yaml.YAMLError as e:
                raise ValueError(f"{path}: unreadable ({e}); delete {root} to regenerate") from None
            expected = {k: meta[k] for k in ("kind", "size", "generator")}
            if {k: found.get(k) for k in expected} != expected:
                raise ValueError(f"{path}: {root} holds a dataset generated with other arguments "
                                 f"({ {k: found.get(k) for k in expected} }, now {expected}); "
                                 f"use another --out or delete it")
    _atomic_yaml(root / ".generator.yaml", {k: meta[k] for k in ("kind", "size", "generator")})

    todo = []
    for split in SPLITS:
        split_dir = root / split
        split_dir.mkdir(exist_ok=True)
        for stale in split_dir.glob(".seq_*.tmp*"):      # left by an interrupted run
            shutil.rmtree(stale, ignore_errors=True)
        for index in range(counts[split]):
            seq_dir = split_dir / f"seq_{index:04d}"
            if not _complete(seq_dir, frames):
                todo.append((split, index, seq_dir))
    workers = min(int(workers) or cpu_cores(), max(1, len(todo)))
    bar = None
    if progress and todo:
        import common  # the top-level scripts' progress bar: redraws rarely in a log
        bar = common.progress(total=len(todo) * frames, unit="frame", desc=f"{meta_kind} {height}x{width}")
    jobs = [(kind, sequence_seed(seed, split, index), frames, (height, width), seq_dir) for split, index, seq_dir in todo]
    if workers == 1:
        for job in jobs:
            _write_sequence(*job, on_frame=bar.update if bar is not None else None)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed
        # spawn, not fork: the caller may hold torch's thread pools, which a forked child must not inherit
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            for done in as_completed([pool.submit(_write_sequence, *job) for job in jobs]):
                done.result()           # a worker's exception surfaces here
                if bar is not None:
                    bar.update(frames)
    if bar is not None:
        bar.close()
    _atomic_yaml(root / "meta.yaml", meta)
    return root


def _atomic_yaml(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(data, sort_keys=False))
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- preview

def preview(kind: str, out, seed: int = 0, size=128, frames=tuple(range(0, 500, 50))) -> Path:
    """A PNG grid over time of one sequence: colourised labels above RGB, frame index on top."""
    from PIL import Image, ImageDraw
    kind = _check_kind(kind)
    height, width = parse_size(size)
    frames = sorted(int(f) for f in frames)
    palette = np.array(KINDS[kind][2], np.uint8)
    chosen = {}
    for t, frame in enumerate(iter_sequence(kind, seed, frames[-1] + 1, (height, width))):
        if t in frames:
            chosen[t] = (palette[frame["label"]], frame["rgb"])
    gap, top = 2, 14
    grid = np.full((top + 2 * height + gap, len(frames) * (width + gap) - gap, 3), 255, np.uint8)
    for k, t in enumerate(frames):
        x = k * (width + gap)
        grid[top:top + height, x:x + width] = chosen[t][0]
        grid[top + height + gap:, x:x + width] = chosen[t][1]
    image = Image.fromarray(grid)
    draw = ImageDraw.Draw(image)
    for k, t in enumerate(frames):
        draw.text((k * (width + gap) + 3, 1), f"t={t}", fill=(0, 0, 0))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.stem + ".tmp.png")
    image.save(tmp)
    os.replace(tmp, out)
    return out


# ----------------------------------------------------------------------------- command line

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data.synthetic", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for kind in KINDS:
        p = sub.add_parser(kind, help=f"generate a synth-{kind} dataset")
        p.add_argument("--out", required=True, help="dataset root to write")
        p.add_argument("--sequences", type=int, default=40, help="training sequences")
        p.add_argument("--val", type=int, default=2, help="validation sequences")
        p.add_argument("--test", type=int, default=2, help="test sequences")
        p.add_argument("--frames", type=int, default=300, help="frames per sequence")
        p.add_argument("--size", default="64", help="N or HxW, e.g. 64 or 128x256")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--workers", type=int, default=0, help="processes, one sequence each (0: one per CPU core)")
    p = sub.add_parser("preview", help="write a PNG frame grid of one sequence")
    p.add_argument("kind", choices=sorted(KINDS))
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", default="128")
    p.add_argument("--frames", default="0,50,100,150,200,250,300,350,400,450", help="comma-separated frame indices")
    args = parser.parse_args(argv)
    try:
        if args.command == "preview":
            frames = [int(f) for f in args.frames.split(",") if f.strip()]
            if not frames or min(frames) < 0:
                raise ValueError(f"--frames {args.frames!r}: need non-negative frame indices")
            print(preview(args.kind, args.out, args.seed, args.size, frames))
        else:
            root = write_dataset(args.command, args.out, args.sequences, args.frames, args.size, args.seed,
                                 val=args.val, test=args.test, workers=args.workers)
            print(root)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
