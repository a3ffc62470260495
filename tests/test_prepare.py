"""Preparation scripts on tiny files written in each dataset's own layout."""
import numpy as np
import pytest
import torch
from PIL import Image

from data.layout import DatasetError, list_sequences, load_sequence, read_meta
from data.prepare import kitti_crop, main, prepare_cityscapes, prepare_dance, prepare_kitti


def _png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _kitti(tmp_path, drives=("2011_09_26_drive_0001_sync", "2011_09_26_drive_0005_sync", "2011_09_26_drive_0070_sync"),
           frames=4):
    rng = np.random.default_rng(0)
    src, labels = tmp_path / "kitti_raw", tmp_path / "kitti_labels"
    for drive in drives:
        for t in range(frames):
            _png(src / "2011_09_26" / drive / "image_03" / "data" / f"{t:010d}.png",
                 rng.integers(0, 256, (75, 248, 3), dtype=np.uint8))
            _png(labels / drive / f"{t:010d}.png", rng.integers(0, 19, (75, 248), dtype=np.uint8))
    return src, labels


def test_kitti_layout_splits_and_crop(tmp_path):
    src, labels = _kitti(tmp_path)
    out = tmp_path / "out"
    main(["kitti", "--src", str(src), "--labels", str(labels), "--out", str(out), "--size", "32"])
    meta = read_meta(out)
    assert meta["num_classes"] == 19 and meta["size"] == [32, 32]
    assert [p.name for p in list_sequences(out, "test")] == ["2011_09_26_drive_0070_sync"]
    assert [p.name for p in list_sequences(out, "val")] == ["2011_09_26_drive_0005_sync"]
    labels_out = load_sequence(out / "train" / "2011_09_26_drive_0001_sync", "label")
    rgb_out = load_sequence(out / "train" / "2011_09_26_drive_0001_sync", "rgb")
    assert labels_out.shape == (4, 32, 32) and rgb_out.shape == (4, 32, 32, 3)
    source_label = np.asarray(Image.open(labels / "2011_09_26_drive_0001_sync" / "0000000000.png"))
    assert np.array_equal(labels_out[0], kitti_crop(source_label, 32, 32, nearest=True))
    assert set(np.unique(labels_out)) <= set(np.unique(source_label))  # NEAREST never invents classes


def test_kitti_crop_geometry():
    image = np.zeros((375, 1242), np.uint8)
    image[:, 621 - 5:621 + 5] = 1  # a centre stripe survives the centre crop
    crop = kitti_crop(image, 128, 160, nearest=True)
    assert crop.shape == (128, 160) and crop[:, 78:82].all() and not crop[:, :10].any()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_kitti_torchscript_segmenter(tmp_path):
    src, _ = _kitti(tmp_path, drives=("2011_09_26_drive_0001_sync",), frames=2)

    class Segmenter(torch.nn.Module):
        def forward(self, image):
            logits = torch.zeros(image.shape[0], 19, image.shape[2], image.shape[3])
            logits[:, 13] = image[:, 0]  # red-ish pixels are cars
            logits[:, 0] = 0.5
            return logits

    model_path = tmp_path / "seg.pt"
    torch.jit.script(Segmenter()).save(str(model_path))
    out = tmp_path / "out"
    prepare_kitti(src, out, (16, 16), segmenter=str(model_path))
    labels = load_sequence(out / "train" / "2011_09_26_drive_0001_sync", "label")
    assert set(np.unique(labels)) <= {0, 13} and len(np.unique(labels)) == 2


def test_kitti_missing_label_names_frame(tmp_path):
    src, labels = _kitti(tmp_path, drives=("2011_09_26_drive_0001_sync",), frames=2)
    (labels / "2011_09_26_drive_0001_sync" / "0000000001.png").unlink()
    with pytest.raises(DatasetError, match=r"no label map for frame .*0000000001\.png"):
        prepare_kitti(src, tmp_path / "out", (16, 16), labels=str(labels))


def test_cityscapes_snippets(tmp_path):
    rng = np.random.default_rng(1)
    src, labels = tmp_path / "cs", tmp_path / "cs_labels"
    for split, city in (("train", "aachen"), ("val", "frankfurt")):
        for start in (0, 100):  # two 30-frame snippets in one sequence id
            for frame in range(start, start + 30):
                name = f"{city}_000001_{frame:06d}"
                _png(src / "leftImg8bit_sequence" / split / city / f"{name}_leftImg8bit.png",
                     rng.integers(0, 256, (16, 32, 3), dtype=np.uint8))
                _png(labels / split / city / f"{name}_pred.png", rng.integers(0, 19, (16, 32), dtype=np.uint8))
    out = tmp_path / "out"
    prepare_cityscapes(src, out, (8, 16), labels=str(labels))
    assert [p.name for p in list_sequences(out, "train")] == ["aachen_000001_000000", "aachen_000001_000100"]
    assert load_sequence(out / "val" / "frankfurt_000001_000100", "label").shape == (30, 8, 16)


def test_cityscapes_short_snippet(tmp_path):
    src = tmp_path / "cs" / "train" / "aachen"
    labels = tmp_path / "labels"
    for frame in range(10):
        _png(src / f"aachen_000001_{frame:06d}_leftImg8bit.png", np.zeros((8, 8, 3), np.uint8))
        _png(labels / f"aachen_000001_{frame:06d}.png", np.zeros((8, 8), np.uint8))
    with pytest.raises(DatasetError, match="snippet has 10 consecutive frames, expected 30"):
        prepare_cityscapes(tmp_path / "cs", tmp_path / "out", (8, 8), labels=str(labels))


def test_dance_iuv(tmp_path):
    rng = np.random.default_rng(2)
    src = tmp_path / "dance"
    for video in ("v0", "v1", "v2"):
        for t in range(6):
            _png(src / video / f"frame{t:04d}.png", rng.integers(0, 256, (20, 30, 3), dtype=np.uint8))
            iuv = np.zeros((20, 30, 3), np.uint8)
            iuv[..., 2] = rng.integers(0, 25, (20, 30))  # I in the blue channel, as OpenCV writes it
            iuv[..., :2] = rng.integers(0, 256, (20, 30, 2))
            _png(src / video / f"frame{t:04d}_IUV.png", iuv)
            _png(src / video / f"frame{t:04d}_INDS.png", (iuv[..., 2] > 0).astype(np.uint8))
    out = tmp_path / "out"
    prepare_dance(src, out, (16, 16), val=1, test=1, subsample=2)
    assert read_meta(out)["num_classes"] == 25
    seq = out / "train" / "v0"
    labels = load_sequence(seq, "label")
    assert labels.shape == (3, 16, 16) and labels.max() <= 24
    assert load_sequence(seq, "instance").max() == 1
    source = np.asarray(Image.open(src / "v0" / "frame0002_IUV.png"))[..., 2]
    assert set(np.unique(labels[1])) <= set(np.unique(source))


def test_dance_missing_rgb(tmp_path):
    src = tmp_path / "dance"
    for video in ("v0", "v1", "v2"):
        _png(src / video / "a_IUV.png", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(DatasetError, match=r"a_IUV\.png: no frame a\.png/\.jpg beside it"):
        prepare_dance(src, tmp_path / "out", (8, 8))


def test_cli_error_is_one_line(tmp_path):
    with pytest.raises(SystemExit, match="error: .*no KITTI raw drives"):
        main(["kitti", "--src", str(tmp_path), "--labels", str(tmp_path), "--out", str(tmp_path / "o")])
