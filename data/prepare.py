"""Turn the public datasets into the HVP layout (docs/design.md, "Data layout").

    python -m data.prepare kitti      --src KITTI_RAW --labels SEG_DIR | --segmenter seg.pt --out datasets/kitti64 --size 64
    python -m data.prepare cityscapes --src CITYSCAPES --labels SEG_DIR | --segmenter seg.pt --out datasets/cityscapes128x256 --size 128x256
    python -m data.prepare dance      --src DANCE_DIR --out datasets/dance64 --size 64

Label maps come from whatever semantic segmenter you have (the paper used a Cityscapes-trained
DeepLabV3+): either a folder of its outputs (uint8 trainId PNGs named like the frames, anywhere below
the folder) or a TorchScript file (or torch.export .pt2 archive) taking (B, 3, H, W) float RGB in [0, 1] and returning (B, N, H, W)
logits. Source layouts are the datasets' own:

    KITTI raw:   SRC/2011_09_26/2011_09_26_drive_0001_sync/image_03/data/0000000000.png
    Cityscapes:  SRC/leftImg8bit_sequence/{train,val,test}/CITY/CITY_SSSSSS_FFFFFF_leftImg8bit.png
    DensePose:   SRC/VIDEO/NAME.{png,jpg} with NAME_IUV.png (part index I in one channel) and optional
                 NAME_INDS.png (person index, used as instance ids), as DensePose's infer_simple writes them
"""
from __future__ import annotations

import argparse
import re
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np

from common import progress
from data.layout import DatasetError, write_frame, write_meta

CITYSCAPES_CLASSES = ["road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
                      "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
                      "motorcycle", "bicycle"]
CITYSCAPES_PALETTE = [[128, 64, 128], [244, 35, 232], [70, 70, 70], [102, 102, 156], [190, 153, 153],
                      [153, 153, 153], [250, 170, 30], [220, 220, 0], [107, 142, 35], [152, 251, 152],
                      [70, 130, 180], [220, 20, 60], [255, 0, 0], [0, 0, 142], [0, 0, 70], [0, 60, 100],
                      [0, 80, 100], [0, 0, 230], [119, 11, 32]]
DENSEPOSE_CLASSES = ["background", "torso back", "torso front", "right hand", "left hand", "left foot", "right foot",
                     "upper leg right back", "upper leg left back", "upper leg right front", "upper leg left front",
                     "lower leg right back", "lower leg left back", "lower leg right front", "lower leg left front",
                     "upper arm left inside", "upper arm right inside", "upper arm left outside",
                     "upper arm right outside", "lower arm left inside", "lower arm right inside",
                     "lower arm left outside", "lower arm right outside", "head right", "head left"]
# The release's KITTI split: these drives of 2011_09_26 are held out.
KITTI_TEST_DRIVES = ("0104", "0079", "0070")
KITTI_VAL_DRIVES = ("0005",)


def dense_palette(n: int, seed: int = 7) -> np.ndarray:
    """n well-separated colours (background black) for part labels."""
    import colorsys
    colours = [[0, 0, 0]] + [[round(255 * c) for c in colorsys.hsv_to_rgb((i * 0.618034) % 1, 0.75, 0.95)]
                             for i in range(n - 1)]
    return np.array(colours, np.uint8)


# ----------------------------------------------------------------------------- image ops

def read_image(path: Path, mode: str | None = None) -> np.ndarray:
    from PIL import Image
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert(mode) if mode else image)
    except Exception as e:
        raise DatasetError(f"{path}: unreadable image ({type(e).__name__}: {e})") from None


def resize(array: np.ndarray, height: int, width: int, nearest: bool) -> np.ndarray:
    from PIL import Image
    if array.shape[:2] == (height, width):
        return array
    resample = Image.NEAREST if nearest else Image.BILINEAR
    return np.asarray(Image.fromarray(array).resize((width, height), resample=resample))


def kitti_crop(array: np.ndarray, height: int, width: int, nearest: bool) -> np.ndarray:
    """The release's KITTI preprocessing: resize to height 128, centre-crop width 160, then resize."""
    h, w = array.shape[:2]
    scaled_w = round(w * 128 / h)
    array = resize(array, 128, scaled_w, nearest)
    left = max((scaled_w - 160) // 2, 0)
    array = array[:, left:left + 160]
    return resize(array, height, width, nearest)


def parse_size(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)(?:x(\d+))?", str(text))
    if not match:
        raise DatasetError(f"--size must be S or HxW, got {text!r}")
    height = int(match.group(1))
    return height, int(match.group(2) or height)


# ----------------------------------------------------------------------------- label sources

def load_segmenter(path, device="cpu"):
    """A user's segmenter (RGB in [0, 1], (B, 3, H, W) -> logits (B, C, H, W)): a TorchScript file or a
    torch.export archive (.pt2). Neither format runs pickled code; anything else is refused in one line."""
    import torch
    try:
        if str(path).endswith(".pt2"):
            return torch.export.load(path).module().to(device)
        return torch.jit.load(path, map_location=device).eval()
    except Exception as e:
        raise DatasetError(f"{path}: not a loadable segmenter (TorchScript, or torch.export .pt2): "
                           f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None


class LabelSource:
    """Label maps for source frames: a folder of segmenter outputs, or a TorchScript segmenter.

    `key_of(path)` names a frame (or a label file) so that the two can be matched: label files are
    indexed by the key of their own path, and a frame looks its key up."""

    def __init__(self, labels_dir: str | None, segmenter: str | None, num_classes: int, key_of):
        if bool(labels_dir) == bool(segmenter):
            raise DatasetError("give exactly one of --labels DIR (segmenter outputs) or --segmenter FILE (TorchScript)")
        self.num_classes, self.key_of, self.model, self.by_key = num_classes, key_of, None, {}
        if segmenter:
            self.model = load_segmenter(segmenter)
            return
        root = Path(labels_dir)
        if not root.is_dir():
            raise DatasetError(f"{root}: labels folder missing")
        for path in sorted(root.rglob("*.png")):
            key = key_of(path)
            if key is not None:
                self.by_key.setdefault(key, path)

    def __call__(self, rgb: np.ndarray, frame_path: Path) -> np.ndarray:
        if self.model is not None:
            import torch
            with torch.inference_mode():
                image = torch.from_numpy(np.array(rgb)).permute(2, 0, 1)[None].float() / 255
                logits = self.model(image)
            if logits.ndim != 4 or logits.shape[1] != self.num_classes:
                raise DatasetError(f"segmenter returned shape {tuple(logits.shape)}, expected (1, {self.num_classes}, H, W)")
            return logits[0].argmax(0).to(torch.uint8).numpy()
        path = self.by_key.get(self.key_of(frame_path))
        if path is None:
            raise DatasetError(f"no label map for frame {frame_path} (key {self.key_of(frame_path)}) below the labels folder")
        label = read_image(path)
        if label.ndim != 2:
            raise DatasetError(f"{path}: label maps must be single-channel class indices")
        if label.shape != rgb.shape[:2]:
            raise DatasetError(f"{path}: size {label.shape} differs from frame {frame_path}'s {rgb.shape[:2]}")
        return label


def _write_sequence(out: Path, split: str, name: str, frames: list, load) -> None:
    """Write one sequence atomically: a temp folder renamed when every frame is in."""
    final = out / split / name
    if final.is_dir():
        return
    tmp = out / split / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    for t, frame in enumerate(frames):
        for modality, array in load(frame).items():
            write_frame(tmp, modality, t, array)
    tmp.rename(final)


# ----------------------------------------------------------------------------- KITTI raw

def kitti_key(path: Path):
    """(drive, frame) from .../DRIVE/.../FRAME.png or a flat DRIVE_FRAME.png; frame names repeat across drives."""
    drive = next((part for part in path.parts[:-1] if "_drive_" in part), None)
    if drive is None and "_drive_" in path.stem:
        drive, _, frame = path.stem.rpartition("_")
        return drive, frame
    return (drive, path.stem) if drive else None


def prepare_kitti(src, out, size, labels=None, segmenter=None, stride: int = 1):
    src, out = Path(src), Path(out)
    height, width = size
    drives = sorted(p for p in src.glob("*/*_drive_*_sync") if (p / "image_03" / "data").is_dir())
    if not drives:
        raise DatasetError(f"{src}: no KITTI raw drives (expected DATE/DATE_drive_NNNN_sync/image_03/data/*.png)")
    source = LabelSource(labels, segmenter, len(CITYSCAPES_CLASSES), kitti_key)
    write_meta(out, kind="kitti", class_names=CITYSCAPES_CLASSES, palette=CITYSCAPES_PALETTE, fps=10,
               size=(height, width), source=str(src))

    def load(path):
        rgb = read_image(path, "RGB")
        return {"rgb": kitti_crop(rgb, height, width, nearest=False),
                "label": kitti_crop(source(rgb, path), height, width, nearest=True)}

    for drive in progress(drives, desc="kitti drives"):
        number = drive.name.split("_drive_")[1][:4]
        held_out = drive.name.startswith("2011_09_26")
        split = ("test" if held_out and number in KITTI_TEST_DRIVES
                 else "val" if held_out and number in KITTI_VAL_DRIVES else "train")
        _write_sequence(out, split, drive.name, sorted((drive / "image_03" / "data").glob("*.png"))[::stride], load)


# ----------------------------------------------------------------------------- Cityscapes sequences

CITYSCAPES_NAME = re.compile(r"(?P<city>[a-z_]+)_(?P<seq>\d{6})_(?P<frame>\d{6})(?:_leftImg8bit)?")


def cityscapes_key(path: Path):
    match = CITYSCAPES_NAME.match(path.stem)
    return f"{match['city']}_{match['seq']}_{match['frame']}" if match else None


def prepare_cityscapes(src, out, size, labels=None, segmenter=None, snippet: int = 30):
    src, out = Path(src), Path(out)
    height, width = size
    base = src / "leftImg8bit_sequence" if (src / "leftImg8bit_sequence").is_dir() else src
    source = LabelSource(labels, segmenter, len(CITYSCAPES_CLASSES), cityscapes_key)
    write_meta(out, kind="cityscapes", class_names=CITYSCAPES_CLASSES, palette=CITYSCAPES_PALETTE, fps=17,
               size=(height, width), source=str(src))

    def load(item):
        rgb = read_image(item[1], "RGB")
        return {"rgb": resize(rgb, height, width, nearest=False),
                "label": resize(source(rgb, item[1]), height, width, nearest=True)}

    found = False
    for split in ("train", "val", "test"):
        sequences = defaultdict(list)
        for path in sorted((base / split).glob("*/*_leftImg8bit.png")):
            match = CITYSCAPES_NAME.fullmatch(path.stem)
            if match:
                sequences[(match["city"], match["seq"])].append((int(match["frame"]), path))
        for (city, seq), frames in progress(sorted(sequences.items()), desc=f"cityscapes {split}"):
            # a sequence id can hold several 30-frame snippets: split where the numbering jumps
            snippets = [[frames[0]]]
            for item in sorted(frames)[1:]:
                if item[0] == snippets[-1][-1][0] + 1:
                    snippets[-1].append(item)
                else:
                    snippets.append([item])
            for run in snippets:
                if len(run) < snippet:
                    raise DatasetError(f"{run[0][1]}: snippet has {len(run)} consecutive frames, expected {snippet}")
                found = True
                _write_sequence(out, split, f"{city}_{seq}_{run[0][0]:06d}", run[:snippet], load)
    if not found:
        raise DatasetError(f"{base}: no leftImg8bit_sequence frames (expected SPLIT/CITY/CITY_SSSSSS_FFFFFF_leftImg8bit.png)")


# ----------------------------------------------------------------------------- DensePose dancing

def _part_channel(iuv: np.ndarray, path: Path, channel: int | None) -> np.ndarray:
    if iuv.ndim != 3 or iuv.shape[-1] != 3:
        raise DatasetError(f"{path}: IUV image must have 3 channels, got shape {iuv.shape}")
    if channel is not None:
        return iuv[..., channel]
    # DensePose writes [I, U, V] with OpenCV, i.e. I lands in the file's blue channel; I is the only
    # channel whose values stay within the 24 part indices.
    candidates = [c for c in (2, 0, 1) if iuv[..., c].max() <= 24]
    if not candidates:
        raise DatasetError(f"{path}: no channel holds part indices 0..24; pass --part-channel")
    return iuv[..., candidates[0]]


def prepare_dance(src, out, size, val: int = 1, test: int = 1, subsample: int = 2, part_channel: int | None = None):
    src, out = Path(src), Path(out)
    height, width = size
    videos = sorted(p for p in src.iterdir() if p.is_dir() and any(p.glob("*_IUV.png")))
    if not videos:
        raise DatasetError(f"{src}: no video folders with DensePose *_IUV.png files")
    if len(videos) <= val + test:
        raise DatasetError(f"{src}: {len(videos)} videos cannot fill val={val} and test={test} and a train split")
    write_meta(out, kind="dance", class_names=DENSEPOSE_CLASSES, palette=dense_palette(len(DENSEPOSE_CLASSES)),
               fps=15, size=(height, width), source=str(src))
    splits = ["train"] * (len(videos) - val - test) + ["val"] * val + ["test"] * test
    for video, split in progress(list(zip(videos, splits)), desc="dance videos"):
        iuv_paths = sorted(video.glob("*_IUV.png"))[::subsample]

        def load(iuv_path, video=video):
            name = iuv_path.name.removesuffix("_IUV.png")
            rgb_path = next((video / f"{name}{ext}" for ext in (".png", ".jpg", ".jpeg") if (video / f"{name}{ext}").is_file()), None)
            if rgb_path is None:
                raise DatasetError(f"{iuv_path}: no frame {name}.png/.jpg beside it")
            rgb = read_image(rgb_path, "RGB")
            parts = _part_channel(read_image(iuv_path, "RGB"), iuv_path, part_channel)
            if parts.shape != rgb.shape[:2]:
                raise DatasetError(f"{iuv_path}: size {parts.shape} differs from {rgb_path}'s {rgb.shape[:2]}")
            arrays = {"rgb": _square(rgb, height, width, False), "label": _square(parts, height, width, True)}
            inds_path = video / f"{name}_INDS.png"
            if inds_path.is_file():
                arrays["instance"] = _square(read_image(inds_path).astype(np.uint16), height, width, True)
            return arrays

        _write_sequence(out, split, video.name, iuv_paths, load)


def _square(array: np.ndarray, height: int, width: int, nearest: bool) -> np.ndarray:
    """Centre crop to the target aspect, then resize (vid2vid's dance preprocessing)."""
    h, w = array.shape[:2]
    crop_w = min(w, round(h * width / height))
    crop_h = min(h, round(w * height / width))
    top, left = (h - crop_h) // 2, (w - crop_w) // 2
    return resize(np.ascontiguousarray(array[top:top + crop_h, left:left + crop_w]), height, width, nearest)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="dataset", required=True)
    for name in ("kitti", "cityscapes", "dance"):
        p = sub.add_parser(name)
        p.add_argument("--src", required=True)
        p.add_argument("--out", required=True)
        p.add_argument("--size", default="64")
        if name != "dance":
            p.add_argument("--labels", help="folder of segmenter outputs (uint8 trainId PNGs)")
            p.add_argument("--segmenter", help="TorchScript segmenter file")
    sub.choices["kitti"].add_argument("--stride", type=int, default=1, help="keep every k-th frame")
    sub.choices["dance"].add_argument("--val", type=int, default=1)
    sub.choices["dance"].add_argument("--test", type=int, default=1)
    sub.choices["dance"].add_argument("--subsample", type=int, default=2, help="the paper sub-samples by two")
    sub.choices["dance"].add_argument("--part-channel", type=int, default=None, help="IUV channel holding I (default: detect)")
    args = parser.parse_args(argv)
    try:
        size = parse_size(args.size)
        if args.dataset == "kitti":
            prepare_kitti(args.src, args.out, size, args.labels, args.segmenter, args.stride)
        elif args.dataset == "cityscapes":
            prepare_cityscapes(args.src, args.out, size, args.labels, args.segmenter)
        else:
            prepare_dance(args.src, args.out, size, args.val, args.test, args.subsample, args.part_channel)
    except DatasetError as e:
        raise SystemExit(f"error: {e}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
