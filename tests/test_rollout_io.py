"""Rollout output format: chunked streaming, resume bookkeeping, atomicity, reading back."""
import numpy as np
import pytest
import yaml

from data.rollout_io import RolloutError, RolloutReader, RolloutWriter, read_rollout, sample_dir

CLIPS = [{"sequence": "seq_a", "start": 0}, {"sequence": "seq_b", "start": 7}]


def make_writer(root, **overrides):
    kwargs = dict(dataset_root="datasets/x", split="val", n_past=2, frames=10, samples=3, clips=CLIPS,
                  size=[6, 5], num_classes=4, chunk=4, seed=1, stride=2, modalities=("label", "rgb"))
    kwargs.update(overrides)
    return RolloutWriter(root, **kwargs)


def predicted(seed=0, clips=2, samples=3, frames=10, size=(6, 5)):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 4, (clips, samples, frames) + size, dtype=np.uint8),
            rng.integers(0, 256, (clips, samples, frames) + size + (3,), dtype=np.uint8))


def test_roundtrip_chunks_context_truth(tmp_path):
    writer = make_writer(tmp_path)
    labels, rgbs = predicted()
    for c in range(2):
        writer.write_context(c, label=labels[c, 0, :2], rgb=rgbs[c, 0, :2])
        writer.write_truth(c, rgb=rgbs[c, 1, :5])
    assert writer.frames_done() == 0
    for start in (0, 4, 8):  # chunks of 4, 4, 2
        assert writer.append(label=labels[:, :, start:start + 4], rgb=rgbs[:, :, start:start + 4]) == start
    assert writer.frames_done() == 10
    writer.finish()

    reader = read_rollout(tmp_path)
    assert reader.complete and reader.frames_done() == 10
    assert (reader.num_clips, reader.num_samples, reader.size, reader.protocol["stride"]) == (2, 3, (6, 5), 2)
    np.testing.assert_array_equal(reader.frames(1, 2, "rgb", 3, 9), rgbs[1, 2, 3:9])  # spans three chunks
    np.testing.assert_array_equal(reader.frames(0, 1, "label"), labels[0, 1])
    np.testing.assert_array_equal(reader.context(1, "label"), labels[1, 0, :2])
    np.testing.assert_array_equal(reader.truth(0, "rgb"), rgbs[0, 1, :5])
    assert reader.truth(0, "label") is None and reader.has_truth("rgb") and not reader.has_truth("label")
    windows = reader.all_windows("rgb", 5, 4)
    assert windows.shape == (6, 4, 6, 5, 3)
    np.testing.assert_array_equal(windows[4], rgbs[1, 1, 5:9])  # clip-major order
    assert reader.window_starts(4, stride=3) == [0, 3, 6]
    assert not list(tmp_path.rglob("*.tmp"))


def test_resume_counts_only_complete_chunks_everywhere(tmp_path):
    writer = make_writer(tmp_path)
    labels, rgbs = predicted()
    writer.write_chunk(0, label=labels[:, :, :4], rgb=rgbs[:, :, :4])
    writer.write_chunk(4, clips=[0], label=labels[:1, :, 4:8], rgb=rgbs[:1, :, 4:8])  # clip 1 interrupted
    (sample_dir(tmp_path, 1, 0) / "rgb" / ".000004.npy.123.tmp").write_bytes(b"half a file")
    assert writer.frames_done() == 4 and writer.frames_done(clips=[0]) == 8
    # a sample missing one modality of a chunk holds the count back too
    (sample_dir(tmp_path, 0, 2) / "label" / "000004.npy").unlink()
    assert writer.frames_done(clips=[0]) == 4

    reopened = make_writer(tmp_path)  # same protocol: resume
    assert reopened.frames_done() == 4
    with pytest.raises(RolloutError, match="samples"):
        make_writer(tmp_path, samples=4)
    with pytest.raises(RolloutError, match="finish|cannot mark complete"):
        reopened.finish()
    assert yaml.safe_load((tmp_path / "rollout.yaml").read_text())["complete"] is False


def test_a_full_disk_names_the_chunk_and_leaves_no_part_of_it(tmp_path, monkeypatch):
    """ENOSPC while a chunk is written: the error names the chunk (common.main_guard turns it into one line),
    the chunks before it stay whole and counted, and no partial file is left."""
    import errno
    writer = make_writer(tmp_path)
    labels, rgbs = predicted()
    writer.write_chunk(0, label=labels[:, :, :4], rgb=rgbs[:, :, :4])

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(np, "save", full)
    with pytest.raises(OSError, match=r"No space left on device: '.*clip_0000/sample_000/label/000004\.npy'") as e:
        writer.write_chunk(4, label=labels[:, :, 4:8], rgb=rgbs[:, :, 4:8])
    assert e.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert writer.frames_done() == 4 and not list(tmp_path.rglob("*.tmp"))


def test_bad_chunks_are_refused_and_named(tmp_path):
    writer = make_writer(tmp_path)
    labels, rgbs = predicted()
    with pytest.raises(RolloutError, match="multiple of chunk"):
        writer.write_chunk(2, label=labels[:, :, :4], rgb=rgbs[:, :, :4])
    with pytest.raises(RolloutError, match="uint8"):
        writer.write_chunk(0, label=labels[:, :, :3], rgb=rgbs[:, :, :3])  # 3 frames where the chunk has 4
    with pytest.raises(RolloutError, match="modalities"):
        writer.write_chunk(0, label=labels[:, :, :4])
    writer.write_chunk(0, label=labels[:, :, :4], rgb=rgbs[:, :, :4])
    bad = sample_dir(tmp_path, 0, 0) / "rgb" / "000000.npy"
    np.save(bad, np.zeros((4, 6, 5), np.uint8))  # wrong shape written behind the writer's back
    reader = RolloutReader(tmp_path)
    with pytest.raises(RolloutError, match="000000.npy"):
        reader.frames(0, 0, "rgb", 0, 2)
    with pytest.raises(RolloutError, match="000004.npy"):
        reader.frames(0, 1, "rgb", 0, 6)  # the second chunk was never written
    with pytest.raises(RolloutError, match="longer than"):
        reader.window_starts(16)


def test_missing_or_malformed_protocol(tmp_path):
    with pytest.raises(RolloutError, match="rollout.yaml: missing"):
        read_rollout(tmp_path)
    (tmp_path / "rollout.yaml").write_text("frames: 3\n")
    with pytest.raises(RolloutError, match="missing key"):
        read_rollout(tmp_path)
