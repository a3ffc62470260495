"""The one on-disk layout every dataset uses, its checks, and the packed memory-mapped cache.

    ROOT/meta.yaml                            num_classes, class_names, palette, ignore_index, fps, kind
    ROOT/SPLIT/SEQUENCE/label/NNNNNN.png      uint8 class index per pixel (grey or palette PNG)
    ROOT/SPLIT/SEQUENCE/rgb/NNNNNN.png        RGB uint8 (absent for structure-only data)
    ROOT/SPLIT/SEQUENCE/instance/NNNNNN.png   uint16 instance ids (optional)
    ROOT/SPLIT/SEQUENCE/flow/NNNNNN.npy       float16 (2, H, W) backward flow in pixels (optional, synthetic data)

Decoding PNGs every step is too slow for training, so each (sequence, modality) is packed once into
one .npy that later reads memory-map. The pack records a fingerprint of its source files and is
rebuilt when they change. Every check that can fail names the file that failed it.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import yaml

import common

MODALITIES = {
    # name: (file suffix, packed dtype)
    "label": (".png", np.uint8),
    "rgb": (".png", np.uint8),
    "instance": (".png", np.uint16),
    "flow": (".npy", np.float16),
}
SPLITS = ("train", "val", "test")
CACHE_VERSION = 1


class DatasetError(ValueError):
    """Bad or missing data; the message names the file or folder."""


# ----------------------------------------------------------------------------- meta

def read_meta(root) -> dict:
    path = Path(root) / "meta.yaml"
    if not path.is_file():
        hint = " (generate one with: python -m data.synthetic drive --out DIR)" if not Path(root).exists() else ""
        raise DatasetError(f"{path}: missing; every dataset root needs a meta.yaml{hint}")
    try:
        meta = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise DatasetError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(meta, dict):
        raise DatasetError(f"{path}: must be a mapping")
    for key in ("num_classes", "class_names", "palette"):
        if key not in meta:
            raise DatasetError(f"{path}: missing key {key!r}")
    n = meta["num_classes"]
    if not isinstance(n, int) or not 1 <= n <= 255:
        raise DatasetError(f"{path}: num_classes must be an integer in [1, 255], got {n!r}")
    if len(meta["class_names"]) != n:
        raise DatasetError(f"{path}: class_names has {len(meta['class_names'])} entries, num_classes is {n}")
    palette = np.asarray(meta["palette"])
    if palette.shape != (n, 3) or palette.min() < 0 or palette.max() > 255:
        raise DatasetError(f"{path}: palette must be {n} [r, g, b] triples in 0..255, got shape {palette.shape}")
    meta.setdefault("ignore_index", 255)
    meta.setdefault("fps", 10)
    meta.setdefault("kind", "unknown")
    meta["palette"] = palette.astype(np.uint8)
    return meta


def list_sequences(root, split: str) -> list[Path]:
    split_dir = Path(root) / split
    if not split_dir.is_dir():
        raise DatasetError(f"{split_dir}: split folder missing")
    sequences = sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not sequences:
        raise DatasetError(f"{split_dir}: split {split!r} is empty (no sequence folders)")
    return sequences


# ----------------------------------------------------------------------------- frame reading

def frame_paths(seq_dir: Path, modality: str) -> list[Path]:
    """The frames of one modality, checked to be numbered 0..T-1 without gaps."""
    suffix = MODALITIES[modality][0]
    folder = seq_dir / modality
    if not folder.is_dir():
        raise DatasetError(f"{folder}: missing (sequence has no {modality!r} frames)")
    paths = sorted(folder.glob(f"*{suffix}"))
    if not paths:
        raise DatasetError(f"{folder}: no {suffix} frames")
    for expected, path in enumerate(paths):
        if not path.stem.isdigit():
            raise DatasetError(f"{path}: frame names must be zero-padded numbers like 000000{suffix}")
        if int(path.stem) != expected:
            missing = folder / f"{expected:0{len(path.stem)}d}{suffix}"
            raise DatasetError(f"{missing}: frame missing (sequence jumps to {path.name})")
    return paths


def read_frame(path: Path, modality: str) -> np.ndarray:
    try:
        if modality == "flow":
            frame = np.load(path)
            if frame.ndim != 3 or frame.shape[0] != 2:
                raise DatasetError(f"{path}: flow must be (2, H, W), got {frame.shape}")
            return frame.astype(np.float16)
        from PIL import Image
        with Image.open(path) as image:
            if modality == "rgb":
                return np.asarray(image.convert("RGB"))
            if image.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L"):
                raise DatasetError(f"{path}: {modality} PNG must be single-channel (grey or palette), got mode {image.mode}")
            frame = np.asarray(image)
    except DatasetError:
        raise
    except Exception as e:  # PIL/numpy raise many kinds for truncated or foreign files
        raise DatasetError(f"{path}: unreadable {modality} frame ({type(e).__name__}: {e})") from None
    if modality == "label" and frame.max(initial=0) > 255:
        raise DatasetError(f"{path}: label values must fit uint8")
    return frame


# ----------------------------------------------------------------------------- packed cache

def _fingerprint(paths: list[Path]) -> str:
    digest = hashlib.sha1(str(CACHE_VERSION).encode())
    for path in paths:
        stat = path.stat()
        digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return digest.hexdigest()


def _cache_dir(seq_dir: Path) -> Path:
    """Beside the data when writable; else under HVP_CACHE (default ~/.cache/hvp)."""
    local = seq_dir / ".cache"
    if os.access(seq_dir, os.W_OK):
        return local
    base = Path(os.environ.get("HVP_CACHE", Path.home() / ".cache" / "hvp"))
    return base / hashlib.sha1(str(seq_dir.resolve()).encode()).hexdigest()[:16]


def _pack(paths: list[Path], modality: str, meta: dict | None) -> np.ndarray:
    first = read_frame(paths[0], modality)
    packed = np.empty((len(paths),) + first.shape, MODALITIES[modality][1])
    for t, path in enumerate(paths):
        frame = first if t == 0 else read_frame(path, modality)
        if frame.shape != first.shape:
            raise DatasetError(f"{path}: size {frame.shape} differs from the sequence's first frame {first.shape}")
        if modality == "label" and meta is not None:
            _check_label_range(frame, path, meta)
        packed[t] = frame
    return packed


def _check_label_range(frame: np.ndarray, path: Path, meta: dict) -> None:
    bad = (frame >= meta["num_classes"]) & (frame != meta["ignore_index"])
    if bad.any():
        value = int(frame[bad][0])
        raise DatasetError(f"{path}: class index {value} >= num_classes {meta['num_classes']} "
                           f"(and not ignore_index {meta['ignore_index']})")


def load_sequence(seq_dir, modality: str, meta: dict | None = None) -> np.ndarray:
    """One modality of one sequence as a memory-mapped array: label (T,H,W) uint8, rgb (T,H,W,3) uint8,
    instance (T,H,W) uint16, flow (T,2,H,W) float16. Packs on first use; label ranges are checked then
    against `meta` (read from the dataset root when not given)."""
    seq_dir = Path(seq_dir)
    if modality not in MODALITIES:
        raise DatasetError(f"unknown modality {modality!r}; known: {', '.join(MODALITIES)}")
    paths = frame_paths(seq_dir, modality)
    if modality == "label" and meta is None:
        meta = read_meta(seq_dir.parent.parent)
    # the label range check runs when packing, so a pack is only valid for the meta it was checked against
    checked_against = {k: meta[k] for k in ("num_classes", "ignore_index")} if modality == "label" else None
    fingerprint = _fingerprint(paths) + f"|{json.dumps(checked_against, sort_keys=True)}"
    cache = _cache_dir(seq_dir)
    packed_path, key_path = cache / f"{modality}.npy", cache / f"{modality}.json"
    if packed_path.is_file() and key_path.is_file():
        try:
            if json.loads(key_path.read_text()).get("fingerprint") == fingerprint:
                return np.load(packed_path, mmap_mode="r")
        except (OSError, ValueError):
            pass  # a damaged cache is rebuilt below
    packed = _pack(paths, modality, meta)
    try:
        cache.mkdir(parents=True, exist_ok=True)
        with common.atomic_path(packed_path) as tmp:
            np.save(tmp, packed)
        key = {"fingerprint": fingerprint, "shape": list(packed.shape)}
        common.atomic_write_bytes(key_path, json.dumps(key).encode())
    except OSError as e:
        if e.errno in common.DISK_FULL:
            raise
        where = ("beside the data" if cache.parent == seq_dir
                 else f"under HVP_CACHE ({cache.parent}), as {seq_dir} is read-only")
        raise DatasetError(f"{cache}: cannot write the packed data cache {where}: {e.strerror}; "
                           f"set HVP_CACHE to a writable folder") from None
    return np.load(packed_path, mmap_mode="r")


def load_sequence_modalities(seq_dir, modalities, meta: dict | None = None) -> dict:
    """Several modalities of one sequence, checked to agree in frame count and size."""
    seq_dir = Path(seq_dir)
    arrays = {m: load_sequence(seq_dir, m, meta) for m in modalities}
    reference = None
    for modality, array in arrays.items():
        length = array.shape[0]
        size = array.shape[-2:] if modality == "flow" else array.shape[1:3]
        if reference is None:
            reference = (modality, length, size)
            continue
        ref_modality, ref_length, ref_size = reference
        if length != ref_length:
            raise DatasetError(f"{seq_dir}: {modality} has {length} frames but {ref_modality} has {ref_length}")
        if tuple(size) != tuple(ref_size):
            raise DatasetError(f"{seq_dir / modality}: frame size {tuple(size)} differs from "
                               f"{ref_modality}'s {tuple(ref_size)}")
    return arrays


# ----------------------------------------------------------------------------- writing

def write_frame(seq_dir, modality: str, t: int, frame: np.ndarray) -> None:
    """One frame in the layout: PNG (label uint8 grey, rgb, instance uint16 grey) or .npy (flow float16)."""
    suffix = MODALITIES[modality][0]
    folder = Path(seq_dir) / modality
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{t:06d}{suffix}"
    if modality == "flow":
        np.save(path, np.asarray(frame, np.float16))
        return
    from PIL import Image
    frame = np.ascontiguousarray(frame)
    dtype = np.uint16 if modality == "instance" else np.uint8
    Image.fromarray(frame.astype(dtype)).save(path, compress_level=1)


def write_meta(root, *, kind: str, class_names, palette, fps: int, size, ignore_index: int = 255, **extra) -> None:
    meta = {"kind": kind, "num_classes": len(class_names), "class_names": list(class_names),
            "palette": np.asarray(palette, int).tolist(), "ignore_index": ignore_index, "fps": fps,
            "size": [int(s) for s in size], **extra}
    Path(root).mkdir(parents=True, exist_ok=True)
    tmp = Path(root) / ".meta.yaml.tmp"
    tmp.write_text(yaml.safe_dump(meta, sort_keys=False))
    os.replace(tmp, Path(root) / "meta.yaml")
