"""The on-disk format of rollout outputs: written by rollout.py, read by evaluate.py.

    OUT/rollout.yaml                           protocol: dataset_root, split, n_past, frames, samples,
                                               clips [{sequence, start}], size [H, W], num_classes, chunk,
                                               seed, stride, modalities, complete
    OUT/clip_CCCC/context/{label,rgb}.npy      uint8 (n_past, H, W) / (n_past, H, W, 3)
    OUT/clip_CCCC/truth/{label,rgb}.npy        optional ground-truth future frames (for mIoU/CSIM/PSNR)
    OUT/clip_CCCC/sample_SSS/MODALITY/FFFFFF.npy   uint8 chunk of predicted frames [FFFFFF, FFFFFF + n)
    OUT/clip_CCCC/sample_SSS/*.mp4|*.gif       videos (rollout.py writes them)

Predicted frames are streamed in chunks of `chunk` frames (the last one may be shorter), so memory
stays flat for any horizon. Every file is written to a temporary name and renamed, so a chunk file
is complete or absent; `frames_done()` counts the frames every clip/sample/modality has without a
gap, which is where an interrupted rollout resumes.
"""
from __future__ import annotations

import collections
import os
from pathlib import Path

import numpy as np
import yaml

PROTOCOL_FILE = "rollout.yaml"
MODALITY_SHAPES = {"label": (), "rgb": (3,), "edge": ()}  # trailing dims after (n, H, W); all uint8
PROTOCOL_KEYS = ("dataset_root", "split", "n_past", "frames", "samples", "clips", "size", "num_classes",
                 "chunk", "seed", "stride", "modalities")


class RolloutError(ValueError):
    """A rollout folder is missing, incomplete or does not match; the message names the file or key."""


def clip_dir(root, clip: int) -> Path:
    return Path(root) / f"clip_{clip:04d}"


def sample_dir(root, clip: int, sample: int) -> Path:
    return clip_dir(root, clip) / f"sample_{sample:03d}"


def _save_npy(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(array))
        os.replace(tmp, path)
    except OSError as e:          # a full disk: name the chunk (a failed write() names no file), leave no partial one
        tmp.unlink(missing_ok=True)
        raise OSError(e.errno, e.strerror, str(path)) from e


def _write_protocol(root: Path, protocol: dict) -> None:
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{PROTOCOL_FILE}.{os.getpid()}.tmp"
    tmp.write_text(yaml.safe_dump(protocol, sort_keys=False))
    os.replace(tmp, root / PROTOCOL_FILE)


def _check_protocol(protocol, path: Path) -> dict:
    if not isinstance(protocol, dict):
        raise RolloutError(f"{path}: must be a mapping")
    for key in PROTOCOL_KEYS:
        if key not in protocol:
            raise RolloutError(f"{path}: missing key {key!r}")
    for key in ("n_past", "frames", "samples", "num_classes", "chunk", "stride"):
        if not isinstance(protocol[key], int) or protocol[key] < (0 if key == "n_past" else 1):
            raise RolloutError(f"{path}: {key} must be a positive integer, got {protocol[key]!r}")
    size = protocol["size"]
    if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(s, int) and s > 0 for s in size)):
        raise RolloutError(f"{path}: size must be [H, W], got {size!r}")
    clips = protocol["clips"]
    if not isinstance(clips, list) or not clips:
        raise RolloutError(f"{path}: clips must be a non-empty list of {{sequence, start}}")
    for i, clip in enumerate(clips):
        if not (isinstance(clip, dict) and "sequence" in clip and isinstance(clip.get("start"), int)):
            raise RolloutError(f"{path}: clips[{i}] must be {{sequence: NAME, start: FRAME}}, got {clip!r}")
    modalities = protocol["modalities"]
    if not isinstance(modalities, list) or not modalities or any(m not in MODALITY_SHAPES for m in modalities):
        raise RolloutError(f"{path}: modalities must be a non-empty list from {sorted(MODALITY_SHAPES)}, "
                           f"got {modalities!r}")
    return protocol


def _contiguous_frames(folder: Path, chunk: int, frames: int) -> int:
    """Frames [0, n) covered without a gap by complete chunk files in `folder`."""
    try:
        names = set(os.listdir(folder))
    except FileNotFoundError:
        return 0
    done = 0
    while done < frames and f"{done:06d}.npy" in names:
        done = min(done + chunk, frames)
    return done


class _ChunkIndex:
    """Shared by writer and reader: chunk geometry and completeness of a rollout folder."""

    def __init__(self, root: Path, protocol: dict):
        self.root, self.protocol = root, protocol
        self.num_clips = len(protocol["clips"])
        self.num_samples = protocol["samples"]
        self.num_frames = protocol["frames"]
        self.chunk = protocol["chunk"]
        self.n_past = protocol["n_past"]
        self.size = tuple(protocol["size"])
        self.modalities = list(protocol["modalities"])

    def frame_shape(self, modality: str) -> tuple:
        if modality not in MODALITY_SHAPES:
            raise RolloutError(f"unknown modality {modality!r}; known: {sorted(MODALITY_SHAPES)}")
        return self.size + MODALITY_SHAPES[modality]

    def chunk_path(self, clip: int, sample: int, modality: str, start: int) -> Path:
        return sample_dir(self.root, clip, sample) / modality / f"{start:06d}.npy"

    def chunk_length(self, start: int) -> int:
        return min(self.chunk, self.num_frames - start)

    def frames_done(self, clips=None, samples=None) -> int:
        """Frames for which every (clip, sample, modality) — of `clips` and `samples` when given — has
        complete chunks."""
        clips = range(self.num_clips) if clips is None else clips
        samples = range(self.num_samples) if samples is None else samples
        done = self.num_frames
        for c in clips:
            for s in samples:
                for m in self.modalities:
                    done = min(done, _contiguous_frames(sample_dir(self.root, c, s) / m, self.chunk, self.num_frames))
                    if done == 0:
                        return 0
        return done


def _check_same_models(path: Path, existing, models: dict) -> None:
    """A rollout folder is resumed or reused only with the checkpoints that wrote it (same file contents)."""
    def described(model):
        return f"{model['path']} (sha256 {model['sha256']}, step {model['step']})" if model else "none"

    existing = existing or {}
    for name in sorted(set(existing) | set(models)):
        old, new = existing.get(name), models.get(name)
        if (old or {}).get("sha256") != (new or {}).get("sha256"):
            raise RolloutError(f"{path}: this rollout was made with the {name} checkpoint {described(old)}; this run "
                               f"loads {described(new)}; use another output folder or delete this one")


class RolloutWriter(_ChunkIndex):
    """Create (or reopen, to resume) a rollout folder and stream predicted frames into it.

    Reopening checks that the protocol matches the one on disk and names the first key that does not.
    """

    def __init__(self, out_dir, *, dataset_root, split: str, n_past: int, frames: int, samples: int, clips,
                 size, num_classes: int, chunk: int, seed: int, stride: int = 1,
                 modalities=("label", "rgb"), models: dict | None = None, extra: dict | None = None):
        root = Path(out_dir)
        protocol = {"dataset_root": str(dataset_root), "split": split, "n_past": int(n_past), "frames": int(frames),
                    "samples": int(samples),
                    "clips": [{"sequence": str(c["sequence"]), "start": int(c["start"])} for c in clips],
                    "size": [int(s) for s in size], "num_classes": int(num_classes), "chunk": int(chunk),
                    "seed": int(seed), "stride": int(stride), "modalities": list(modalities), "complete": False}
        _check_protocol(protocol, root / PROTOCOL_FILE)
        path = root / PROTOCOL_FILE
        if path.is_file():
            existing = _check_protocol(yaml.safe_load(path.read_text()), path)
            for key in PROTOCOL_KEYS:
                if existing[key] != protocol[key]:
                    raise RolloutError(f"{path}: existing rollout has {key}={existing[key]!r}, this run has "
                                       f"{protocol[key]!r}; use another output folder or delete this one")
            _check_same_models(path, existing.get("models"), models or {})
            protocol["models"] = existing.get("models") or {}
            protocol["complete"] = bool(existing.get("complete", False))
            protocol["extra"] = existing.get("extra", extra or {})
        else:
            protocol["extra"] = extra or {}
            protocol["models"] = models or {}
            _write_protocol(root, protocol)
        super().__init__(root, protocol)

    def _check(self, name: str, array: np.ndarray, shape: tuple) -> np.ndarray:
        array = np.asarray(array)
        if array.dtype != np.uint8 or array.shape != shape:
            raise RolloutError(f"{self.root}: {name} must be uint8 {shape}, got {array.dtype} {array.shape}")
        return array

    def write_context(self, clip: int, **arrays) -> None:
        for modality, array in arrays.items():
            array = self._check(f"context {modality} of clip {clip}", array,
                                (self.n_past,) + self.frame_shape(modality))
            _save_npy(clip_dir(self.root, clip) / "context" / f"{modality}.npy", array)

    def write_truth(self, clip: int, **arrays) -> None:
        """Ground-truth future frames (any length >= 1) when the split has them."""
        for modality, array in arrays.items():
            array = np.asarray(array)
            self._check(f"truth {modality} of clip {clip}", array, (max(len(array), 1),) + self.frame_shape(modality))
            _save_npy(clip_dir(self.root, clip) / "truth" / f"{modality}.npy", array)

    def write_chunk(self, start: int, clips=None, samples=None, **arrays) -> None:
        """Predicted frames [start, start + n) for `clips` and `samples` (default all) at once:
        arrays[modality] is uint8 (len(clips), len(samples), n, H, W[, 3]) with n = the chunk's length."""
        if start % self.chunk or not 0 <= start < self.num_frames:
            raise RolloutError(f"{self.root}: chunk start {start} must be a multiple of chunk={self.chunk} "
                               f"below frames={self.num_frames}")
        if set(arrays) != set(self.modalities):
            raise RolloutError(f"{self.root}: a chunk needs exactly the modalities {self.modalities}, "
                               f"got {sorted(arrays)}")
        clips = list(range(self.num_clips)) if clips is None else list(clips)
        samples = list(range(self.num_samples)) if samples is None else list(samples)
        n = self.chunk_length(start)
        for modality, array in arrays.items():
            array = self._check(f"chunk {start} {modality}", array,
                                (len(clips), len(samples), n) + self.frame_shape(modality))
            for i, c in enumerate(clips):
                for j, s in enumerate(samples):
                    _save_npy(self.chunk_path(c, s, modality, start), array[i, j])

    def append(self, clips=None, **arrays) -> int:
        """Write the next chunk after frames_done(clips); returns its start frame."""
        start = self.frames_done(clips)
        self.write_chunk(start, clips=clips, **arrays)
        return start

    def finish(self) -> None:
        done = self.frames_done()
        if done != self.num_frames:
            raise RolloutError(f"{self.root}: cannot mark complete, {done} of {self.num_frames} frames written")
        self.protocol["complete"] = True
        _write_protocol(self.root, self.protocol)


class RolloutReader(_ChunkIndex):
    """Read a rollout folder: protocol, context, ground truth and predicted frames assembled from chunks."""

    def __init__(self, root, max_open: int = 64):
        root = Path(root)
        path = root / PROTOCOL_FILE
        if not path.is_file():
            raise RolloutError(f"{path}: missing; is {root} a rollout output folder (python rollout.py)?")
        try:
            protocol = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise RolloutError(f"{path}: not valid YAML: {e}") from None
        super().__init__(root, _check_protocol(protocol, path))
        self.complete = bool(protocol.get("complete", False))
        self._open: collections.OrderedDict = collections.OrderedDict()  # memmaps hold a descriptor each
        self._max_open = max_open
        self._done = None

    @property
    def clips(self) -> list:
        return self.protocol["clips"]

    def frames_done(self, clips=None) -> int:
        if clips is not None:
            return super().frames_done(clips)
        if self._done is None:
            self._done = super().frames_done()
        return self._done

    def _load(self, path: Path, shape: tuple) -> np.ndarray:
        if path in self._open:
            self._open.move_to_end(path)
            return self._open[path]
        if not path.is_file():
            raise RolloutError(f"{path}: missing (rollout incomplete? {self.frames_done()} of {self.num_frames} "
                               f"frames are complete everywhere)")
        try:
            array = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise RolloutError(f"{path}: unreadable ({e})") from None
        if array.dtype != np.uint8 or tuple(array.shape[1:]) != tuple(shape[1:]) or \
                (shape[0] is not None and array.shape[0] != shape[0]):
            expected = ("N" if shape[0] is None else shape[0],) + tuple(shape[1:])
            raise RolloutError(f"{path}: expected uint8 {expected}, got {array.dtype} {array.shape}")
        self._open[path] = array
        if len(self._open) > self._max_open:
            self._open.popitem(last=False)
        return array

    def _check_index(self, clip: int, sample: int = 0) -> None:
        if not 0 <= clip < self.num_clips or not 0 <= sample < self.num_samples:
            raise RolloutError(f"{self.root}: clip {clip} / sample {sample} out of range "
                               f"({self.num_clips} clips, {self.num_samples} samples)")

    def context(self, clip: int, modality: str) -> np.ndarray:
        self._check_index(clip)
        path = clip_dir(self.root, clip) / "context" / f"{modality}.npy"
        return self._load(path, (self.n_past,) + self.frame_shape(modality))

    def truth(self, clip: int, modality: str) -> np.ndarray | None:
        self._check_index(clip)
        path = clip_dir(self.root, clip) / "truth" / f"{modality}.npy"
        return self._load(path, (None,) + self.frame_shape(modality)) if path.is_file() else None

    def has_truth(self, modality: str) -> bool:
        return all((clip_dir(self.root, c) / "truth" / f"{modality}.npy").is_file() for c in range(self.num_clips))

    def frames(self, clip: int, sample: int, modality: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Predicted frames [start, stop) of one clip/sample, uint8 (n, H, W[, 3])."""
        self._check_index(clip, sample)
        if modality not in self.modalities:
            raise RolloutError(f"{self.root}: no {modality!r} frames (modalities: {self.modalities})")
        stop = self.num_frames if stop is None else stop
        if not 0 <= start <= stop <= self.num_frames:
            raise RolloutError(f"{self.root}: frames [{start}, {stop}) outside the rollout's {self.num_frames} frames")
        pieces, first = [], start - start % self.chunk
        for chunk_start in range(first, stop, self.chunk):
            n = self.chunk_length(chunk_start)
            array = self._load(self.chunk_path(clip, sample, modality, chunk_start),
                               (n,) + self.frame_shape(modality))
            pieces.append(array[max(start - chunk_start, 0): min(stop - chunk_start, n)])
        if not pieces:
            return np.zeros((0,) + self.frame_shape(modality), np.uint8)
        return np.array(pieces[0]) if len(pieces) == 1 else np.concatenate(pieces)

    def all_windows(self, modality: str, start: int, window: int) -> np.ndarray:
        """Predicted frames [start, start + window) of every clip and sample: uint8
        (clips * samples, window, H, W[, 3]), clip-major (the shots X^_{t:t+w-1} of shot-wise FVD)."""
        return np.stack([self.frames(c, s, modality, start, start + window)
                         for c in range(self.num_clips) for s in range(self.num_samples)])

    def iter_windows(self, modality: str, start: int, window: int, batch: int):
        """all_windows in batches of at most `batch` clip/sample windows, so memory stays bounded."""
        pairs = [(c, s) for c in range(self.num_clips) for s in range(self.num_samples)]
        for i in range(0, len(pairs), batch):
            yield np.stack([self.frames(c, s, modality, start, start + window) for c, s in pairs[i:i + batch]])

    def window_starts(self, window: int, stride: int = 1, frames: int | None = None) -> list[int]:
        """Start frames t of the windows [t, t + window) that fit in the first `frames` (default: all done)."""
        frames = self.frames_done() if frames is None else frames
        if window > frames:
            raise RolloutError(f"{self.root}: window of {window} frames is longer than the "
                               f"{frames} predicted frames available")
        return list(range(0, frames - window + 1, stride))


def read_rollout(root) -> RolloutReader:
    return RolloutReader(root)
