"""The synthetic generators: determinism, formats, exact flow, scene change, on-disk layout."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from data import synthetic
from data.synthetic import (DANCE_CLASSES, DANCE_PALETTE, DRIVE_CLASSES, DRIVE_PALETTE, LANES_CLASSES, LANES_PALETTE,
                            RAIN_CLASSES, RAIN_PALETTE, SCROLL_CLASSES, SCROLL_PALETTE, generate_sequence, parse_size,
                            write_dataset)
from evaluate import born_mask

KINDS = {"drive": len(DRIVE_CLASSES), "dance": len(DANCE_CLASSES), "scroll": len(SCROLL_CLASSES),
         "lanes": len(LANES_CLASSES), "rain": len(RAIN_CLASSES)}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_deterministic_per_seed(kind):
    a = generate_sequence(kind, 5, 12, 32)
    b = generate_sequence(kind, 5, 12, 32)
    c = generate_sequence(kind, 6, 12, 32)
    for m in ("label", "rgb", "instance", "flow"):
        np.testing.assert_array_equal(a[m], b[m], err_msg=m)
    assert not np.array_equal(a["rgb"], c["rgb"])
    assert not np.array_equal(a["label"], c["label"])


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_shapes_dtypes_ranges(kind):
    seq = generate_sequence(kind, 1, 6, (24, 40))
    assert seq["label"].shape == (6, 24, 40) and seq["label"].dtype == np.uint8
    assert seq["rgb"].shape == (6, 24, 40, 3) and seq["rgb"].dtype == np.uint8
    assert seq["instance"].shape == (6, 24, 40) and seq["instance"].dtype == np.uint16
    assert seq["flow"].shape == (6, 2, 24, 40) and seq["flow"].dtype == np.float32
    assert seq["label"].max() < KINDS[kind]
    assert np.isfinite(seq["flow"]).all()
    assert not seq["flow"][0].any(), "frame 0 has no previous frame: its flow is zero"
    assert np.abs(seq["flow"][1:]).max() > 0.05
    background = 10 if kind == "drive" else 0     # sky / background / sky / grass are stuff: no instance
    assert (seq["instance"][seq["label"] == background] == 0).all()
    assert seq["rgb"].std() > 10


def test_constants():
    assert len(DRIVE_CLASSES) == len(DRIVE_PALETTE) == 19 and DRIVE_CLASSES[13] == "car"
    assert DRIVE_PALETTE[0] == (128, 64, 128) and DRIVE_CLASSES[10] == "sky"
    assert len(DANCE_CLASSES) == len(DANCE_PALETTE) == 25 and DANCE_CLASSES[0] == "background"
    assert len(set(DANCE_PALETTE)) == 25, "dance part colours must be distinguishable"
    assert len(SCROLL_CLASSES) == len(set(SCROLL_PALETTE)) == 9 and SCROLL_CLASSES[0] == "sky"
    assert len(LANES_CLASSES) == len(set(LANES_PALETTE)) == 7 and LANES_CLASSES[3] == "car"
    assert len(RAIN_CLASSES) == len(set(RAIN_PALETTE)) == 8 and RAIN_CLASSES[3] == "drop"


def _warp(image, flow):
    """Bilinear backward warp, align_corners=True: out(x, y) = image(x + dx, y + dy)."""
    height, width = image.shape[:2]
    gy, gx = np.mgrid[0:height, 0:width].astype(np.float32)
    sx, sy = gx + flow[0], gy + flow[1]
    grid = torch.from_numpy(np.stack([2 * sx / (width - 1) - 1, 2 * sy / (height - 1) - 1], -1))[None]
    x = torch.from_numpy(image.astype(np.float32)).permute(2, 0, 1)[None]
    return F.grid_sample(x, grid, mode="bilinear", align_corners=True)[0].permute(1, 2, 0).numpy(), sx, sy


@pytest.mark.parametrize("kind,seed,frames", [("drive", 1, 40), ("dance", 3, 60), ("scroll", 2, 60), ("lanes", 0, 60),
                                              ("rain", 0, 60)])
def test_flow_warps_previous_frame_onto_current(kind, seed, frames):
    """Warping RGB frame t-1 by flow[t] reproduces frame t where nothing is disoccluded.

    Pixels compared: the source lies inside the image, the pixel's 3x3 neighbourhood at t is one
    object (same label and instance) and the four bilinear taps at t-1 show that same object, and
    the pixel moves by >= 1 px. Thresholds: >= 85 % of them within 8 grey levels (sensor noise is
    sigma 1.5; the rest is resampling of sharp texture such as windows and lane marks), and where
    not warping is wrong by > 8 levels, warping removes >= 60 % of the error."""
    seq = generate_sequence(kind, seed, frames, 64)
    keys = seq["label"].astype(np.int64) * 70000 + seq["instance"]
    close, count, err_warp, err_still = 0, 0, 0.0, 0.0
    for t in range(1, frames):
        warped, sx, sy = _warp(seq["rgb"][t - 1], seq["flow"][t])
        height, width = keys.shape[1:]
        ok = (sx >= 0) & (sx <= width - 1) & (sy >= 0) & (sy <= height - 1) & (np.hypot(*seq["flow"][t]) >= 1)
        padded = np.pad(keys[t], 1, mode="edge")
        for dy in range(3):
            for dx in range(3):
                ok &= padded[dy:dy + height, dx:dx + width] == keys[t]
        x0 = np.clip(np.floor(sx).astype(int), 0, width - 1)
        y0 = np.clip(np.floor(sy).astype(int), 0, height - 1)
        for yy, xx in ((y0, x0), (y0, np.minimum(x0 + 1, width - 1)), (np.minimum(y0 + 1, height - 1), x0),
                       (np.minimum(y0 + 1, height - 1), np.minimum(x0 + 1, width - 1))):
            ok &= keys[t - 1][yy, xx] == keys[t]
        e_warp = np.abs(warped - seq["rgb"][t]).mean(-1)
        e_still = np.abs(seq["rgb"][t - 1].astype(np.float32) - seq["rgb"][t]).mean(-1)
        close += int((e_warp[ok] < 8).sum())
        count += int(ok.sum())
        moved = ok & (e_still > 8)
        err_warp += float(e_warp[moved].sum())
        err_still += float(e_still[moved].sum())
    assert count > 500, f"too few comparable pixels ({count})"
    assert close / count >= 0.85, f"only {close / count:.3f} of pixels within 8 levels after warping"
    assert err_warp <= 0.4 * err_still, f"warping keeps {err_warp / err_still:.2f} of the error of not warping"


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_flow_moves_objects_with_their_labels(kind):
    """Nearest-neighbour warping of the label+instance map by the flow explains most pixels whose
    label changed between frames (boundaries of moving things), far more than not warping."""
    seq = generate_sequence(kind, 2, 40, 64)
    keys = seq["label"].astype(np.int64) * 70000 + seq["instance"]
    height, width = keys.shape[1:]
    gy, gx = np.mgrid[0:height, 0:width]
    fixed = changed = 0
    for t in range(1, 40):
        flow = seq["flow"][t]
        sx = np.rint(gx + flow[0]).astype(int)
        sy = np.rint(gy + flow[1]).astype(int)
        inside = (sx >= 0) & (sx < width) & (sy >= 0) & (sy < height)
        moved = inside & (np.hypot(*flow) >= 1.5) & (keys[t - 1] != keys[t])
        fixed += int((keys[t - 1][np.clip(sy, 0, height - 1), np.clip(sx, 0, width - 1)] == keys[t])[moved].sum())
        changed += int(moved.sum())
    assert changed > 100
    assert fixed / changed >= 0.6, f"warping explains only {fixed / changed:.2f} of the changed labels"


def test_drive_scene_changes_over_hundreds_of_frames():
    seq = generate_sequence("drive", 0, 300, 32)
    labels = seq["label"]
    present = set(np.unique(labels).tolist())
    assert {0, 10, 13} <= present, f"road, sky and car must appear; found {sorted(present)}"
    assert len(present) >= 8
    early = np.bincount(labels[:50].ravel(), minlength=19) / labels[:50].size
    late = np.bincount(labels[250:].ravel(), minlength=19) / labels[250:].size
    assert 0.5 * np.abs(early - late).sum() > 0.15, "the class mix must change over 250 frames"
    assert all((seq["rgb"][t] != seq["rgb"][t + 1]).any() for t in range(299))
    moving = np.abs(seq["flow"][1:]).max(axis=(1, 2, 3))
    assert (moving > 0.3).all(), "the camera always moves"


def test_dance_moves_and_turns():
    seq = generate_sequence("dance", 0, 300, 32)
    labels = seq["label"]
    assert (seq["instance"] == (labels > 0)).all(), "instance 1 is the person, 0 the background"
    assert len(np.unique(labels)) >= 20
    # front and back views both occur: the figure turns around
    assert (labels == 2).any(axis=(1, 2)).any() and (labels == 1).any(axis=(1, 2)).any()
    early = np.bincount(labels[:50].ravel(), minlength=25)
    late = np.bincount(labels[250:].ravel(), minlength=25)
    assert not np.array_equal(early, late)
    assert all((labels[t] != labels[t + 1]).any() for t in range(0, 299, 7))


def test_scroll_is_exact_motion_plus_births_at_the_edges():
    """Every label change is its layer's whole-pixel shift (flow) or a disocclusion behind a moving object,
    except objects that enter at the left or right edge; those births come at irregular times, in every
    kind of object, and the stream does not repeat."""
    seq = generate_sequence("scroll", 0, 400, 32)
    labels, flow = seq["label"], seq["flow"]
    assert set(np.unique(flow[1:, 0]).tolist()) <= {-1.0, 0.0, 1.0, 2.0, 3.0} and not flow[:, 1].any()
    born = born_mask(labels, len(SCROLL_CLASSES))
    columns = born.any(axis=(0, 1))
    assert not columns[3:-3].any(), f"births away from the edges, columns {np.flatnonzero(columns)}"
    ground_births = np.flatnonzero(born[:, :, -3:].any(axis=(1, 2)))
    assert len(ground_births) >= 30
    assert len(set(np.diff(ground_births).tolist())) >= 5, "births at a fixed period would be predictable"
    born_classes = set(labels[1:][born].tolist())
    assert {1, 5, 6, 8} <= born_classes, f"clouds, houses, trees and cars are born; found {sorted(born_classes)}"
    mix = np.bincount(labels.ravel(), minlength=9) / labels.size
    assert (mix > 0).all() and mix.max() < 0.5
    assert not any(np.array_equal(labels[0], labels[t]) for t in range(1, 400))


def test_lanes_births_only_upstream_and_speeds_vary_by_sequence():
    """Cars, trucks and logs are born only at a lane's upstream edge (the 2 px a lane moves at most per frame),
    at irregular times; other births are lily pads and lane surface uncovered behind them. Each sequence draws
    its own lane speeds and directions."""
    speeds = set()
    for seed in range(3):
        seq = generate_sequence("lanes", seed, 400, 32)
        labels = seq["label"]
        movers = born_mask(labels, len(LANES_CLASSES)) & np.isin(labels[1:], [3, 4, 5])
        columns = np.flatnonzero(movers.any(axis=(0, 1)))
        assert ((columns < 2) | (columns >= 30)).all(), f"seed {seed}: movers born in columns {columns}"
        birth_frames = np.flatnonzero(movers.any(axis=(1, 2)))
        assert len(birth_frames) >= 40 and len(set(np.diff(birth_frames).tolist())) >= 5
        speeds.add(tuple(sorted(set(np.unique(seq["flow"][1:, 0]).tolist()) - {0.0})))
        assert not seq["flow"][:, 1].any()
    assert len(speeds) == 3, f"lane speeds repeat across sequences: {speeds}"


def test_rain_moves_vertically_births_drops_at_the_top_boxes_at_the_bottom_and_changes_in_place():
    """Drops are born only in the top rows and boxes in the bottom rows (the 2 px they move at most per frame),
    at irregular times; ice (a drop that froze) and lit lamps appear in place, away from the edges. Each
    sequence draws its own chute speeds; nothing moves sideways."""
    speeds = set()
    for seed in range(3):
        seq = generate_sequence("rain", seed, 400, 32)
        labels = seq["label"]
        born = born_mask(labels, len(RAIN_CLASSES))
        drop_rows = np.flatnonzero((born & (labels[1:] == 3)).any(axis=(0, 2)))
        box_rows = np.flatnonzero((born & (labels[1:] == 5)).any(axis=(0, 2)))
        assert (drop_rows < 2).all() and (box_rows >= 30).all(), f"seed {seed}: drops {drop_rows}, boxes {box_rows}"
        births = np.flatnonzero((born & np.isin(labels[1:], [3, 5])).any(axis=(1, 2)))
        assert len(births) >= 40 and len(set(np.diff(births).tolist())) >= 5
        in_place = born & np.isin(labels[1:], [4, 7])
        in_place[:, :3] = in_place[:, -3:] = False
        assert in_place.sum() >= 10, f"seed {seed}: ice and lit lamps appear away from the edges"
        assert not seq["flow"][:, 0].any()
        speeds.add(tuple(sorted(set(np.unique(seq["flow"][1:, 1]).tolist()) - {0.0})))
    assert len(speeds) >= 2, f"chute speeds repeat across sequences: {speeds}"


def test_drive_instances_are_stable_objects():
    seq = generate_sequence("drive", 2, 60, 48)
    ids, labels = seq["instance"], seq["label"]
    pairs = np.unique(ids.astype(np.int64) * 256 + labels)
    per_id = np.bincount((pairs // 256).astype(np.int64))
    assert per_id[1:].max() == 1, "an instance id always belongs to one class"
    assert (ids[labels == 0] == 0).all(), "road is stuff"
    things = labels == 13
    assert (ids[things] > 0).all(), "every car pixel belongs to a car instance"
    kept = [len(set(np.unique(ids[t])) & set(np.unique(ids[t + 1]))) / len(np.unique(ids[t])) for t in range(59)]
    assert np.mean(kept) > 0.9, "objects keep their id from frame to frame"


def test_parse_size_and_bad_input():
    assert parse_size(64) == (64, 64) and parse_size("128x256") == (128, 256) and parse_size([32, 48]) == (32, 48)
    with pytest.raises(ValueError, match="size"):
        parse_size("64xA")
    with pytest.raises(ValueError, match="kind"):
        generate_sequence("ballet", 0, 2, 32)
    with pytest.raises(ValueError, match="frames"):
        generate_sequence("drive", 0, 0, 32)


def _snapshot(root):
    return {p.relative_to(root): p.stat().st_mtime_ns for p in sorted(root.rglob("*")) if p.is_file()}


def test_cli_writes_layout_and_rerun_skips(tmp_path, capsys):
    root = tmp_path / "drive"
    args = ["drive", "--out", str(root), "--sequences", "2", "--val", "1", "--test", "1", "--frames", "5",
            "--size", "16x24", "--seed", "7"]
    assert synthetic.main(args) == 0
    meta = yaml.safe_load((root / "meta.yaml").read_text())
    assert meta["kind"] == "synth-drive" and meta["num_classes"] == 19 and meta["ignore_index"] == 255
    assert meta["class_names"] == list(DRIVE_CLASSES) and meta["palette"][13] == [0, 0, 142]
    assert meta["size"] == [16, 24] and isinstance(meta["fps"], int)
    assert meta["generator"]["seed"] == 7 and meta["generator"]["frames"] == 5
    assert meta["generator"]["sequences"] == {"train": 2, "val": 1, "test": 1}
    for split, n in (("train", 2), ("val", 1), ("test", 1)):
        assert sorted(p.name for p in (root / split).iterdir()) == [f"seq_{i:04d}" for i in range(n)]
    seq = root / "train" / "seq_0001"
    for m, suffix in (("label", ".png"), ("rgb", ".png"), ("instance", ".png"), ("flow", ".npy")):
        assert sorted(p.name for p in (seq / m).iterdir()) == [f"{t:06d}{suffix}" for t in range(5)]
    with Image.open(seq / "label" / "000003.png") as im:
        assert im.mode == "L" and im.size == (24, 16)
    with Image.open(seq / "rgb" / "000003.png") as im:
        assert im.mode == "RGB"
    with Image.open(seq / "instance" / "000003.png") as im:
        assert im.mode.startswith("I") and np.asarray(im).max() > 0
    flow = np.load(seq / "flow" / "000003.npy")
    assert flow.dtype == np.float16 and flow.shape == (2, 16, 24)
    # the files are exactly what the API generates for that sequence's seed
    expected = generate_sequence("drive", synthetic.sequence_seed(7, "train", 1), 5, (16, 24))
    with Image.open(seq / "label" / "000003.png") as im:
        np.testing.assert_array_equal(np.asarray(im), expected["label"][3])
    np.testing.assert_allclose(flow, expected["flow"][3], atol=2e-2, rtol=1e-3)

    before = _snapshot(root)
    assert synthetic.main(args) == 0
    after = _snapshot(root)
    assert {k: v for k, v in after.items() if k.name != "meta.yaml" and k.name != ".generator.yaml"} == \
        {k: v for k, v in before.items() if k.name != "meta.yaml" and k.name != ".generator.yaml"}, \
        "a rerun must skip complete sequences"
    # an interrupted sequence (missing frames) is regenerated, the others are kept
    (root / "val" / "seq_0000" / "rgb" / "000004.png").unlink()
    assert synthetic.main(args) == 0
    assert (root / "val" / "seq_0000" / "rgb" / "000004.png").is_file()
    assert _snapshot(root)[seq.relative_to(root) / "rgb" / "000000.png"] == before[seq.relative_to(root) / "rgb" / "000000.png"]
    # other arguments into the same folder are refused with a message naming the folder
    capsys.readouterr()
    assert synthetic.main(args[:-1] + ["8"]) == 2
    assert str(root) in capsys.readouterr().err


def test_generates_only_into_a_new_folder_or_its_own(tmp_path):
    """A folder of the user's (here a sequence and a notes file, no meta.yaml) is never generated into: the
    scripts stop with one line naming data.root, and every file stays as it was. An empty folder is fine."""
    import common
    import data
    from data.layout import DatasetError
    tiny = ["data.synth=scroll", "data.size=[32, 32]", "data.num_classes=9", "data.synth_sequences=1",
            "data.synth_frames=4", "data.synth_val=1", "data.synth_test=1", "data.synth_workers=1"]
    user = tmp_path / "mine"
    (user / "train" / "seq_0000" / "label").mkdir(parents=True)
    (user / "train" / "seq_0000" / "label" / "000000.png").write_bytes(b"the user's frame")
    (user / "notes.txt").write_text("do not delete")
    before = _snapshot(user)
    with pytest.raises(DatasetError, match=f"data.root={user}: .*did not write"):
        data.ensure_dataset(common.load_config(None, [f"data.root={user}", *tiny]))
    assert _snapshot(user) == before and not (user / "meta.yaml").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    cfg = common.load_config(None, [f"data.root={empty}", *tiny])
    assert data.ensure_dataset(cfg)["num_classes"] == 9
    assert data.ensure_dataset(cfg)["num_classes"] == 9      # and a rerun into its own folder


def test_sequences_do_not_depend_on_how_many_are_generated(tmp_path):
    small = write_dataset("dance", tmp_path / "a", sequences=1, frames=3, size=16, seed=4, val=0, test=1, progress=False)
    large = write_dataset("dance", tmp_path / "b", sequences=3, frames=3, size=16, seed=4, val=1, test=1, progress=False)
    for rel in ("train/seq_0000/rgb/000002.png", "test/seq_0000/label/000001.png"):
        np.testing.assert_array_equal(np.asarray(Image.open(small / rel)), np.asarray(Image.open(large / rel)))
    assert not np.array_equal(np.asarray(Image.open(large / "train/seq_0000/rgb/000002.png")),
                              np.asarray(Image.open(large / "train/seq_0001/rgb/000002.png")))


def test_parallel_generation_writes_the_same_files(tmp_path):
    """Sequences are generated one per process; the bytes do not depend on how many processes."""
    serial = write_dataset("drive", tmp_path / "serial", sequences=2, frames=4, size=16, seed=3, val=1, test=0,
                           progress=False, workers=1)
    parallel = write_dataset("drive", tmp_path / "parallel", sequences=2, frames=4, size=16, seed=3, val=1, test=0,
                             progress=False, workers=3)
    def contents(root):
        return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
    files = contents(serial)
    assert len(files) == 3 * 4 * 4 + 2 and files == contents(parallel)  # 3 sequences x 4 frames x 4 modalities + 2 yaml
    with pytest.raises(ValueError, match="workers must be >= 0"):
        write_dataset("drive", tmp_path / "bad", sequences=1, frames=2, size=16, workers=-1)


def test_preview_png(tmp_path):
    out = synthetic.preview("dance", tmp_path / "p.png", seed=0, size=32, frames=[0, 5, 10])
    with Image.open(out) as im:
        assert im.size[0] == 3 * 32 + 2 * 2 and im.size[1] > 2 * 32
