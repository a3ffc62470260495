"""Loader checks: each kind of bad input gets one clear error naming the problem file."""
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from data.clips import ClipDataset, ClipSampler, compose_flow, fixed_batch
from data.layout import DatasetError, load_sequence, load_sequence_modalities, read_meta, write_frame
from tests.conftest import write_random_dataset


def test_packed_cache_roundtrip_and_invalidation(random_dataset):
    seq = random_dataset / "train" / "seq_0000"
    labels = load_sequence(seq, "label")
    assert isinstance(labels, np.memmap) and labels.shape == (8, 16, 16) and labels.dtype == np.uint8
    assert (seq / ".cache" / "label.npy").is_file()
    new = np.full((16, 16), 2, np.uint8)
    write_frame(seq, "label", 3, new)  # changing a source frame must rebuild the pack
    assert (np.asarray(load_sequence(seq, "label")[3]) == 2).all()
    arrays = load_sequence_modalities(seq, ("label", "rgb", "instance", "flow"))
    assert arrays["rgb"].shape == (8, 16, 16, 3) and arrays["flow"].shape == (8, 2, 16, 16)
    assert arrays["instance"].dtype == np.uint16


def test_missing_frame(random_dataset):
    (random_dataset / "train" / "seq_0001" / "label" / "000004.png").unlink()
    with pytest.raises(DatasetError, match=r"seq_0001/label/000004\.png: frame missing"):
        load_sequence(random_dataset / "train" / "seq_0001", "label")


def test_unreadable_frame(random_dataset):
    (random_dataset / "train" / "seq_0000" / "rgb" / "000002.png").write_bytes(b"garbage")
    with pytest.raises(DatasetError, match=r"seq_0000/rgb/000002\.png: unreadable rgb frame"):
        load_sequence(random_dataset / "train" / "seq_0000", "rgb")


def test_label_out_of_range(random_dataset):
    bad = np.zeros((16, 16), np.uint8)
    bad[3, 3] = 9
    write_frame(random_dataset / "val" / "seq_0000", "label", 5, bad)
    with pytest.raises(DatasetError, match=r"val/seq_0000/label/000005\.png: class index 9 >= num_classes 4"):
        ClipDataset(random_dataset, "val", 2, 2)


def test_a_pack_checked_against_other_classes_is_checked_again(random_dataset):
    """The label range check runs when a sequence is packed: after meta.yaml's num_classes shrinks, the
    cached pack must not skip it (training would die later with an IndexError deep in the loss)."""
    assert len(ClipDataset(random_dataset, "val", 2, 2)) > 0          # packs under num_classes 4
    meta = yaml.safe_load((random_dataset / "meta.yaml").read_text())
    meta.update(num_classes=3, class_names=meta["class_names"][:3], palette=meta["palette"][:3])
    (random_dataset / "meta.yaml").write_text(yaml.safe_dump(meta))
    with pytest.raises(DatasetError, match=r"val/seq_0000/label/[0-9]+\.png: class index 3 >= num_classes 3"):
        ClipDataset(random_dataset, "val", 2, 2)


def test_a_frame_size_other_than_the_configs_is_named_when_the_data_is_opened(random_dataset):
    import common
    from data import ensure_dataset
    cfg = common.load_config(None, [f"data.root={random_dataset}", "data.num_classes=4", "data.size=[32, 32]"])
    with pytest.raises(DatasetError, match=r"meta.yaml: the frames are \[16, 16\] \(H, W\) but the config's data.size is \[32, 32\]"):
        ensure_dataset(cfg)


def test_ignore_index_is_allowed(random_dataset):
    frame = np.zeros((16, 16), np.uint8)
    frame[0, 0] = 255
    write_frame(random_dataset / "val" / "seq_0000", "label", 0, frame)
    assert len(ClipDataset(random_dataset, "val", 2, 2)) > 0


def test_size_mismatch_within_sequence(random_dataset):
    write_frame(random_dataset / "train" / "seq_0000", "label", 6, np.zeros((12, 16), np.uint8))
    with pytest.raises(DatasetError, match=r"seq_0000/label/000006\.png: size \(12, 16\) differs"):
        load_sequence(random_dataset / "train" / "seq_0000", "label")


def test_size_mismatch_between_modalities(tmp_path):
    root = write_random_dataset(tmp_path / "d", modalities=("label",))
    for t in range(8):
        write_frame(root / "train" / "seq_0000", "rgb", t, np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(DatasetError, match=r"seq_0000/rgb: frame size \(8, 8\) differs from label's \(16, 16\)"):
        ClipDataset(root, "train", 2, 2, modalities=("label", "rgb"))


def test_empty_split_and_missing_meta(random_dataset, tmp_path):
    (random_dataset / "test").mkdir()
    with pytest.raises(DatasetError, match=r"test: split 'test' is empty"):
        ClipDataset(random_dataset, "test", 2, 2)
    with pytest.raises(DatasetError, match=r"meta\.yaml: missing"):
        read_meta(tmp_path / "nowhere")


def test_sequence_shorter_than_clip(random_dataset):
    with pytest.raises(DatasetError, match=r"seq_0000: 8 frames, shorter than one clip"):
        ClipDataset(random_dataset, "train", 5, 10, stride=1)


def test_bad_meta(random_dataset):
    (random_dataset / "meta.yaml").write_text("num_classes: 3\nclass_names: [a, b]\npalette: [[0,0,0]]\n")
    with pytest.raises(DatasetError, match="class_names has 2 entries, num_classes is 3"):
        read_meta(random_dataset)


def test_clip_contents_stride_and_flip(random_dataset):
    dataset = ClipDataset(random_dataset, "train", 2, 1, stride=2, modalities=("label", "rgb", "flow"))
    assert len(dataset) == 2 * (8 - 5 + 1)
    seq = load_sequence(random_dataset / "train" / "seq_0000", "label")
    item = dataset[1]
    assert torch.equal(item["label"], torch.from_numpy(np.array(seq[1:6:2])))
    assert item["rgb"].shape == (3, 3, 16, 16) and item["flow"].shape == (3, 2, 16, 16)
    flipped = dataset[(1, True)]
    assert torch.equal(flipped["label"], item["label"].flip(-1))
    assert torch.equal(flipped["rgb"], item["rgb"].flip(-1))
    assert torch.allclose(flipped["flow"][:, 0], -item["flow"][:, 0].flip(-1))
    batch = fixed_batch(dataset, 3)
    assert batch["label"].shape == (3, 3, 16, 16)


def test_compose_flow_of_translations():
    # two constant translations compose to their sum (away from the clamped border)
    first = np.stack([np.full((9, 9), 1.0), np.full((9, 9), -0.5)])
    second = np.stack([np.full((9, 9), 2.0), np.full((9, 9), 1.0)])
    total = compose_flow(np.stack([first, second]))
    assert np.allclose(total[:, 2:7, 2:7], np.array([3.0, 0.5])[:, None, None])


def test_sampler_deterministic_resumable_and_sharded():
    full = ClipSampler(10, 3, seed=1, flip=True)
    stream = [b for _, b in zip(range(8), full)]
    resumed = [b for _, b in zip(range(4), ClipSampler(10, 3, seed=1, flip=True, start_step=4))]
    assert resumed == stream[4:]
    rank0 = [b for _, b in zip(range(4), ClipSampler(10, 3, seed=1, rank=0, world_size=2))]
    rank1 = [b for _, b in zip(range(4), ClipSampler(10, 3, seed=1, rank=1, world_size=2))]
    first_epoch = [i for b in zip(rank0, rank1) for batch in b for i, _ in batch][:10]
    assert sorted(first_epoch) == list(range(10))  # one global order, split between ranks
    assert [i for i, _ in rank0[0]] != [i for i, _ in rank1[0]]


def test_an_unwritable_cache_is_named_once(random_dataset, tmp_path, monkeypatch):
    """Read-only data and an HVP_CACHE that cannot be written: one DatasetError naming HVP_CACHE, not a raw
    traceback. (Tests may run as root, where permissions do not bite: the data is made 'read-only' through
    os.access, and HVP_CACHE is a file, which no user can mkdir under.)"""
    import os
    seq = random_dataset / "train" / "seq_0000"
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if Path(path) == seq else real_access(path, mode))
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("")
    monkeypatch.setenv("HVP_CACHE", str(blocker))
    with pytest.raises(DatasetError, match=r"not_a_folder/\w+: cannot write the packed data cache under HVP_CACHE .*"
                                           r"set HVP_CACHE to a writable folder"):
        load_sequence(seq, "label")
    assert not (seq / ".cache").exists()
    monkeypatch.setenv("HVP_CACHE", str(tmp_path / "cache"))   # a writable one: packed there, read back
    assert load_sequence(seq, "label").shape == (8, 16, 16)
    assert len(list((tmp_path / "cache").glob("*/label.npy"))) == 1
