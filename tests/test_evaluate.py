"""Evaluation metrics against references: TF1 resize, Frechet distance (scipy's sqrtm route), the
google-research constant-video FVD example, Inception score, mIoU, PSNR/SSIM, shot-wise FVD windows
and shot counts, and the command line end to end on a tiny rollout."""
import importlib.util
import json

import numpy as np
import pytest
import scipy.linalg
import torch

import common
import evaluate as ev
import metric_nets as mn
from data.layout import write_frame, write_meta
from data.rollout_io import RolloutError, RolloutWriter, read_rollout

INSTALLED = all(importlib.util.find_spec(w.module) is not None for w in mn.ALL_WEIGHTS)
needs_weights = pytest.mark.skipif(not INSTALLED, reason=f"weight packages missing: {mn.INSTALL_ALL}")


# ----------------------------------------------------------------------------- TF1 legacy resize

def test_tf1_resize_hand_computed():
    image = torch.tensor([[0, 10], [20, 30]], dtype=torch.uint8).view(1, 2, 2, 1)
    # src = dst * in/out = 0, .5, 1, 1.5 -> the last row/column clamps to the edge (no half-pixel shift)
    expected = [[0, 5, 10, 10], [10, 15, 20, 20], [20, 25, 30, 30], [20, 25, 30, 30]]
    assert ev.tf1_resize_bilinear(image, (4, 4))[0, :, :, 0].tolist() == expected
    ramp = torch.arange(16, dtype=torch.uint8).view(1, 4, 4, 1)
    assert ev.tf1_resize_bilinear(ramp, (2, 2))[0, :, :, 0].tolist() == [[0, 2], [8, 10]]  # no antialias
    nine = torch.arange(9, dtype=torch.uint8).view(1, 3, 3, 1)
    assert ev.tf1_resize_bilinear(nine, (2, 2))[0, :, :, 0].tolist() == [[0, 1.5], [4.5, 6]]


def _resize_loop(image, out_h, out_w):
    """Direct transcription of TF's legacy kernel, one pixel at a time, in float32."""
    in_h, in_w, channels = image.shape
    out = np.zeros((out_h, out_w, channels), np.float32)
    sy, sx = np.float32(in_h) / np.float32(out_h), np.float32(in_w) / np.float32(out_w)
    for y in range(out_h):
        fy = np.float32(y) * sy
        y0, y1, ly = int(np.floor(fy)), min(int(np.ceil(fy)), in_h - 1), fy - np.floor(fy)
        for x in range(out_w):
            fx = np.float32(x) * sx
            x0, x1, lx = int(np.floor(fx)), min(int(np.ceil(fx)), in_w - 1), fx - np.floor(fx)
            top = image[y0, x0] + (image[y0, x1] - image[y0, x0]) * lx
            bottom = image[y1, x0] + (image[y1, x1] - image[y1, x0]) * lx
            out[y, x] = top + (bottom - top) * ly
    return out


def test_tf1_resize_matches_pixel_loop():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (7, 5, 3)).astype(np.uint8)
    for size in ((19, 13), (3, 4)):
        ours = ev.tf1_resize_bilinear(torch.from_numpy(image)[None], size)[0].numpy()
        np.testing.assert_allclose(ours, _resize_loop(image.astype(np.float32), *size), rtol=0, atol=1e-4)


# ----------------------------------------------------------------------------- Frechet distance

def _frechet_scipy(a, b):
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(s1 @ s2).real
    return ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s1 + s2 - 2 * root)


def test_frechet_matches_scipy_sqrtm_and_is_zero_for_identical_sets():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 24))
    b = rng.normal(size=(150, 24)) @ rng.normal(size=(24, 24)) * 0.3 + 0.5
    assert ev.frechet_distance(a, b) == pytest.approx(_frechet_scipy(a, b), rel=1e-8)
    assert ev.frechet_distance(a.astype(np.float32), a.astype(np.float32)) == pytest.approx(0, abs=1e-8)
    # fewer samples than dimensions (rank-deficient covariances), as with few clips of 400-d features
    small_a, small_b = rng.normal(size=(10, 40)), rng.normal(size=(12, 40)) + 0.1
    assert ev.frechet_distance(small_a, small_b) == pytest.approx(_frechet_scipy(small_a, small_b), rel=1e-5)
    with pytest.raises(ValueError, match="at least 2 samples"):
        ev.frechet_distance(a[:1], b)


@needs_weights
def test_google_research_constant_video_example():
    """16 black vs 16 white 15-frame 64x64 videos, documented there as 'around 131'. All videos of a
    set are identical, so each colour's embedding is computed once and repeated (exact: the
    covariances are then exactly zero, FVD = ||mu_black - mu_white||^2)."""
    black = np.zeros((2, 15, 64, 64, 3), np.uint8)
    white = np.full((1, 15, 64, 64, 3), 255, np.uint8)
    black_features = ev.i3d_features(black, batch_size=2)
    np.testing.assert_array_equal(black_features[0], black_features[1])  # batching cannot split them
    white_features = ev.i3d_features(white)
    value = ev.frechet_distance(np.repeat(black_features[:1], 16, 0), np.repeat(white_features, 16, 0))
    assert value == pytest.approx(133.908, abs=0.02)  # this port; other ports of the TF-Hub net report ~134
    assert abs(value - 131) < 4  # within 3.1% of the documented "around 131"


def test_i3d_needs_nine_frames_and_uint8():
    with pytest.raises(ValueError, match="at least 9"):
        ev.i3d_features(np.zeros((1, 8, 16, 16, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        ev.i3d_features(np.zeros((1, 16, 16, 16, 3), np.float32))


# ----------------------------------------------------------------------------- scores on hand-made inputs

def test_inception_score_extremes():
    assert ev.inception_score(np.eye(5)) == pytest.approx(5.0)  # confident and diverse: number of classes
    assert ev.inception_score(np.tile([[0.7, 0.2, 0.1]], (8, 1))) == pytest.approx(1.0)  # no diversity
    assert ev.inception_score(np.full((4, 10), 0.1)) == pytest.approx(1.0)


def test_miou_on_hand_made_maps():
    truth = np.array([[0, 0, 1, 1],
                      [0, 0, 1, 1],
                      [2, 2, 255, 255]])
    pred = np.array([[0, 1, 1, 1],
                     [0, 0, 1, 1],
                     [2, 7, 3, 0]])  # 7 is outside the 4 classes; the ignored pixels never count
    conf = ev.confusion_matrix(pred, truth, num_classes=4, ignore_index=255)
    iou = ev.iou_per_class(conf)
    # class 0: tp 3, fn 1, fp 0 -> 3/4; class 1: tp 4, fp 1 -> 4/5; class 2: tp 1, fn 1 -> 1/2; class 3 absent
    np.testing.assert_allclose(iou[:3], [0.75, 0.8, 0.5])
    assert np.isnan(iou[3])
    assert ev.mean_iou(conf) == pytest.approx((0.75 + 0.8 + 0.5) / 3)
    assert ev.mean_iou(conf, classes=[1, 2]) == pytest.approx(0.65)
    assert ev.CITYSCAPES_MOVING == (11, 12, 13, 14, 15, 16, 17, 18)


def _ssim_naive(x, y):
    """Wang et al. with an explicit 11x11 Gaussian window loop, float64, one channel."""
    g = np.exp(-((np.arange(11) - 5) ** 2) / (2 * 1.5 ** 2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    values = []
    for i in range(x.shape[0] - 10):
        for j in range(x.shape[1] - 10):
            px, py = x[i:i + 11, j:j + 11], y[i:i + 11, j:j + 11]
            mx, my = (w * px).sum(), (w * py).sum()
            vx, vy = (w * px * px).sum() - mx ** 2, (w * py * py).sum() - my ** 2
            cov = (w * px * py).sum() - mx * my
            values.append((2 * mx * my + c1) * (2 * cov + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2)))
    return np.mean(values)


def test_psnr_and_ssim_against_direct_formulas():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (2, 14, 13, 3)).astype(np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-20, 21, a.shape), 0, 255).astype(np.uint8)
    mse = ((a.astype(float) - b) ** 2).reshape(2, -1).mean(1)
    np.testing.assert_allclose(ev.psnr(a, b), 10 * np.log10(255 ** 2 / mse))
    expected = [np.mean([_ssim_naive(a[n, :, :, c].astype(float), b[n, :, :, c].astype(float)) for c in range(3)])
                for n in range(2)]
    np.testing.assert_allclose(ev.ssim(a, b), expected, rtol=1e-10)
    np.testing.assert_allclose(ev.ssim(a, a), 1.0)


# ----------------------------------------------------------------------------- shot-wise FVD

def _tiny_dataset(root, lengths=(20, 12), size=(8, 8)):
    write_meta(root, kind="test", class_names=["a", "b", "c", "d"], palette=[[0, 0, 0]] * 4, fps=10, size=size)
    rng = np.random.default_rng(0)
    for i, length in enumerate(lengths):
        for t in range(length):
            write_frame(root / "train" / f"seq_{i}", "rgb", t, rng.integers(0, 256, size + (3,), dtype=np.uint8))
            write_frame(root / "train" / f"seq_{i}", "label", t, rng.integers(0, 4, size, dtype=np.uint8))
    return root


def test_training_shot_counts_and_sampling(tmp_path):
    root = _tiny_dataset(tmp_path / "ds")
    assert len(ev.training_shots(root, "train", window=4)) == 17 + 9  # every overlapping 4-frame shot
    assert len(ev.training_shots(root, "train", window=4, stride=2)) == 14 + 6  # shots span 7 frames
    shots = ev.training_shots(root, "train", window=4, shot_stride=3)
    assert [s for _, s in shots] == [0, 3, 6, 9, 12, 15, 0, 3, 6]
    capped = ev.training_shots(root, "train", window=4, max_shots=5, seed=1)
    assert len(capped) == 5 and capped == ev.training_shots(root, "train", window=4, max_shots=5, seed=1)
    assert capped != ev.training_shots(root, "train", window=4, max_shots=5, seed=2)
    assert len(ev.training_shots(root, "train", window=13)) == 8  # only the 20-frame sequence fits
    from data.layout import DatasetError
    with pytest.raises(DatasetError, match="no sequence has 21 frames"):
        ev.training_shots(root, "train", window=21)


def _tiny_rollout(root, frames=12, clips=2, samples=2, size=(16, 16), truth=0, seed=0):
    writer = RolloutWriter(root, dataset_root="unused", split="val", n_past=3, frames=frames, samples=samples,
                           clips=[{"sequence": f"s{c}", "start": 0} for c in range(clips)], size=size,
                           num_classes=19, chunk=5, seed=0)
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 19, (clips, samples, frames) + size, dtype=np.uint8)
    rgbs = rng.integers(0, 256, (clips, samples, frames) + size + (3,), dtype=np.uint8)
    for c in range(clips):
        writer.write_context(c, label=labels[c, 0, :3], rgb=rgbs[c, 0, :3])
        if truth:
            writer.write_truth(c, label=labels[c, 0, :truth], rgb=rgbs[c, 0, :truth])
    for start in range(0, frames, 5):
        writer.write_chunk(start, label=labels[:, :, start:start + 5], rgb=rgbs[:, :, start:start + 5])
    writer.finish()
    return read_rollout(root), labels, rgbs


def test_shotwise_fvd_windows(tmp_path, monkeypatch):
    """FVD(t) is computed on exactly the windows [t, t+w) of every clip/sample, t on the stride grid."""
    reader, _, rgbs = _tiny_rollout(tmp_path / "rollout")
    seen = []

    def fake_features(videos, *args, **kwargs):  # cheap stand-in for I3D: colour means per frame
        seen.append(np.array(videos))
        return np.asarray(videos, np.float64).mean((2, 3)).reshape(len(videos), -1)[:, :20]

    monkeypatch.setattr(ev, "i3d_features", fake_features)
    real = np.random.default_rng(1).normal(size=(30, 20)) * 30 + 128
    result = ev.shotwise_fvd(reader, real, window=9, time_stride=2)
    assert result["t"] == [0, 2]
    assert len(result["fvd"]) == 2 and all(v > 0 for v in result["fvd"])
    np.testing.assert_array_equal(seen[1], rgbs.reshape(4, 12, 16, 16, 3)[:, 2:11])
    assert result["fvd"][1] == pytest.approx(ev.frechet_distance(fake_features(seen[1]), real))
    with pytest.raises(RolloutError, match="shorter than the shot-wise FVD window"):
        ev.shotwise_fvd(reader, real, window=13)
    with pytest.raises(ValueError, match="at least 9"):
        ev.shotwise_fvd(reader, real, window=4)


def test_fid_over_time_embeds_each_frame_once_and_scores_its_windows(tmp_path, monkeypatch):
    """FID(t) is the Frechet distance of exactly the frames [t, t+w) of every clip/sample; overlapping windows
    embed each frame once."""
    reader, _, rgbs = _tiny_rollout(tmp_path / "rollout")
    embedded = []

    def fake_features(frames, *args, **kwargs):  # cheap stand-in for InceptionV3: colour statistics per frame
        frames = np.asarray(frames, np.float64)
        embedded.append(len(frames))
        return np.concatenate([frames.mean((1, 2)), frames.std((1, 2)), frames[:, ::4, ::4, 0].reshape(len(frames), -1)], 1)

    monkeypatch.setattr(ev, "inception_features", fake_features)
    real = np.random.default_rng(2).normal(size=(40, 22)) * 30 + 128
    result = ev.fid_over_time(reader, real, window=4, time_stride=2)
    assert result["t"] == [0, 2, 4, 6, 8] and result["frames_per_t"] == 4 * 4
    assert sum(embedded) == 4 * 12, "every predicted frame of every clip/sample embedded once"
    window = rgbs.reshape(4, 12, 16, 16, 3)[:, 4:8].reshape(-1, 16, 16, 3)
    assert result["fid"][2] == pytest.approx(ev.frechet_distance(fake_features(window), real))


# ----------------------------------------------------------------------------- label dynamics

def test_label_dynamics_on_hand_made_rollouts(tmp_path):
    """Change per step, class mix, its distance from the data's and sample difference, against counts made by
    hand: sample 0 of each clip moves one 4x4 block of class 1 one column per step, then stops at frame 6;
    sample 1 is sample 0 with one more pixel of class 2 until frame 7. At frame 9 a 2x2 block of class 3 is born in clip 1,
    sample 0 (a class absent within 3 pixels the frame before), and stays: 4 births, then nothing."""
    frames, size = 12, (16, 16)
    writer = RolloutWriter(tmp_path / "rollout", dataset_root="unused", split="val", n_past=1, frames=frames,
                           samples=2, clips=[{"sequence": "s0", "start": 0}, {"sequence": "s1", "start": 0}],
                           size=size, num_classes=4, chunk=5, seed=0, modalities=("label",))
    labels = np.zeros((2, 2, frames) + size, np.uint8)
    for t in range(frames):
        x = min(t, 6)
        labels[:, :, t, 2:6, x:x + 4] = 1
    labels[:, 1, :8, 15, 15] = 2
    labels[1, 0, 9:, 10:12, 10:12] = 3
    for c in range(2):
        writer.write_context(c, label=labels[c, 0, :1])
    for start in range(0, frames, 5):
        writer.write_chunk(start, label=labels[:, :, start:start + 5])
    reader = read_rollout(tmp_path / "rollout")
    reference = {"change_per_step": 0.01, "births_per_step": 0.001, "class_mix": [0.5, 0.5, 0.0, 0.0]}
    assert ev.label_dynamics(reader, reference, window=4, time_stride=4)["mix_distance_late_own"] is None
    for c in range(2):    # kept truth: two empty frames after the context
        writer.write_truth(c, label=np.zeros((2,) + size, np.uint8))
    writer.finish()
    reader = read_rollout(tmp_path / "rollout")
    d = ev.label_dynamics(reader, reference, window=4, time_stride=4)
    # each clip's own mix (context + truth) has 16 of 768 pixels of class 1; in frames 8-11 clip 0 has 16 of 256
    # per frame, clip 1 as well plus class 3 born in sample 0 (4 pixels x 3 frames of 2048)
    own_class_1 = 16 / 768
    assert d["mix_distance_late_own"] == pytest.approx(
        ((16 / 256 - own_class_1) + (128 / 2048 - own_class_1 + 12 / 2048)) / 2)
    assert d["t"] == [0, 4, 8]
    # a block moving one column changes 8 of 256 pixels per step: 3 moving steps in [0, 4), 2 of 3 in [4, 8), then
    # only the birth: 4 pixels of 4 videos x 3 steps x 256 pixels; a block that moves by 1 pixel is never born
    assert d["change_per_step"] == pytest.approx([8 / 256, 2 * 8 / 256 / 3, 4 / 3072])
    assert d["births_per_step"] == pytest.approx([0.0, 0.0, 4 / 3072])
    assert d["births_late"] == pytest.approx(4 / 3072) and d["births_late_vs_data"] == pytest.approx(4 / 3072 / 0.001)
    mix = np.array([256 - 16 - 0.5, 16, 0.5, 0]) / 256   # sample 1's extra class-2 pixel, averaged over 2 samples
    np.testing.assert_allclose(d["class_mix"][0], mix)
    assert d["mix_distance"][0] == pytest.approx(0.5 * np.abs(mix - np.array([0.5, 0.5, 0, 0])).sum())
    assert d["largest_class_share"][1] == pytest.approx(mix[0])
    assert d["sample_difference"] == pytest.approx([1 / 256, 1 / 256, 0.0])
    assert d["change_late"] == pytest.approx(4 / 3072) and d["change_late_vs_data"] == pytest.approx(4 / 3072 / 0.01)
    late_mix = np.array(d["class_mix"][2])
    assert d["class_excess_late"] == pytest.approx(late_mix[0] - 0.5) and d["classes_lost_late"] == []
    # class 2 (the extra pixel) is gone from frame 8 on: lost when the data has at least 1% of it
    assert ev.label_dynamics(reader, {**reference, "class_mix": [0.5, 0.3, 0.2, 0.0]}, 4, 4)["classes_lost_late"] == [2]
    assert ev.label_dynamics(reader, {**reference, "class_mix": [0.5, 0.49, 0.01, 0.0]}, 4, 4)["classes_lost_late"] == [2]
    assert ev.label_dynamics(reader, {**reference, "class_mix": [0.5, 0.491, 0.009, 0.0]}, 4, 4)["classes_lost_late"] == []
    path = ev.plot_label_dynamics(d, {"palette": [[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255]],
                                      "class_names": ["a", "b", "c", "d"]}, tmp_path / "dyn.png")
    assert path.stat().st_size > 1000


def test_dynamics_of_a_rollout_without_label_maps_is_refused(tmp_path, capsys):
    writer = RolloutWriter(tmp_path / "rollout", dataset_root="unused", split="val", n_past=1, frames=4, samples=1,
                           clips=[{"sequence": "s0", "start": 0}], size=(8, 8), num_classes=4, chunk=4, seed=0,
                           modalities=("rgb",))
    writer.write_context(0, rgb=np.zeros((1, 8, 8, 3), np.uint8))
    writer.write_chunk(0, rgb=np.zeros((1, 1, 4, 8, 8, 3), np.uint8))
    writer.finish()
    with pytest.raises(SystemExit):
        ev.main([f"--evaluate.rollout_dir={tmp_path / 'rollout'}", "--dynamics"])
    assert "has no label maps" in capsys.readouterr().err


def test_a_rollout_shorter_than_the_window_is_refused_before_any_feature_is_extracted(tmp_path, capsys, monkeypatch):
    _tiny_rollout(tmp_path / "rollout", frames=12)

    def no_features(*args, **kwargs):
        raise AssertionError("training-shot features were extracted before the length check")

    monkeypatch.setattr(ev, "cached_shot_features", no_features)
    with pytest.raises(SystemExit):
        ev.main([f"--evaluate.rollout_dir={tmp_path / 'rollout'}", "--shotwise", "--evaluate.window=16"])
    assert "12 frames are fewer than the window of 16 (evaluate.window)" in capsys.readouterr().err


def test_a_segmenter_that_is_not_one_is_refused_before_any_metric(tmp_path, monkeypatch):
    """--evaluate.segmenter: a file that is not TorchScript is refused in one line before any metric runs; a
    segmenter whose logits do not have the rollout's classes is named with the shape it returned."""
    from data.layout import DatasetError
    _tiny_rollout(tmp_path / "rollout", frames=4, truth=4)
    garbage = tmp_path / "seg.pt"
    garbage.write_bytes(b"not a model")

    def no_metric(*args, **kwargs):
        raise AssertionError("a metric ran before the segmenter was checked")

    with monkeypatch.context() as patch:
        patch.setattr(ev, "vgg_csim", no_metric)
        with pytest.raises(DatasetError, match=r"seg\.pt: not a loadable segmenter \(TorchScript, or torch.export"):
            ev.run(common.load_config(None, [f"evaluate.rollout_dir={tmp_path / 'rollout'}", "evaluate.short=true",
                                             f"evaluate.segmenter={garbage}"]))

    class FourClasses(torch.nn.Module):
        def forward(self, image):
            return image.new_zeros(image.shape[0], 4, image.shape[2], image.shape[3])

    torch.jit.script(FourClasses()).save(str(garbage))
    reader = read_rollout(tmp_path / "rollout")
    monkeypatch.setattr(ev, "vgg_csim", lambda p, t, *a: np.zeros(len(p)))
    with pytest.raises(RolloutError, match=r"returned logits of shape \(4, 4, 16, 16\) for 4 frames; expected \(4, 19, H, W\)"):
        ev.short_term(reader, segmenter=torch.jit.load(str(garbage)))


def test_data_label_dynamics_counts_changes_at_the_stride(tmp_path):
    """The data's change per step at stride 1 and 2, and its class mix, from frames made by hand."""
    root = tmp_path / "ds"
    write_meta(root, kind="test", class_names=["a", "b"], palette=[[0, 0, 0], [255, 255, 255]], fps=10, size=(4, 4))
    for t in range(5):   # frame t has t pixels of class 1 (in reading order): one new pixel per frame
        label = np.zeros(16, np.uint8)
        label[:t] = 1
        write_frame(root / "train" / "seq_0", "label", t, label.reshape(4, 4))
    one = ev.data_label_dynamics(root, "train", stride=1, num_classes=2)
    assert one["change_per_step"] == pytest.approx(1 / 16)
    assert one["births_per_step"] == pytest.approx(1 / 4 / 16)   # class 1 is absent from frame 0 only: 1 birth
    assert one["class_mix"] == pytest.approx([1 - 10 / 80, 10 / 80])
    assert ev.data_label_dynamics(root, "train", stride=2, num_classes=2)["change_per_step"] == pytest.approx(2 / 16)
    from data.layout import DatasetError
    with pytest.raises(DatasetError, match="no sequence has two label frames 5 apart"):
        ev.data_label_dynamics(root, "train", stride=5, num_classes=2)


@needs_weights
def test_cli_end_to_end(tmp_path, monkeypatch):
    """evaluate.py on a tiny rollout with ground truth: every metric, metrics.json and plots."""
    dataset = _tiny_dataset(tmp_path / "ds", lengths=(12,), size=(16, 16))
    _tiny_rollout(tmp_path / "rollout", frames=10, truth=10)
    argv = [f"--evaluate.rollout_dir={tmp_path / 'rollout'}", f"--evaluate.dataset_root={dataset}",
            f"--evaluate.cache_dir={tmp_path / 'cache'}", "--evaluate.window=9", "--evaluate.time_stride=4",
            "--evaluate.max_shots=3", "--evaluate.fvd_frames=9", "--evaluate.batch_size=4", "--evaluate.device=cpu"]
    report = ev.main(argv)
    out = tmp_path / "rollout" / "eval"
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["metrics"].keys() == {"shotwise_fvd", "inception_score", "fid", "short_term", "label_dynamics"}
    assert saved["protocol"]["fid_training_frames"]["num_frames"] == 12 and saved["metrics"]["fid"]["t"] == [0]
    assert saved["metrics"]["fid"]["fid"][0] > 0 and saved["metrics"]["fid"]["frames_per_t"] == 4 * 9
    assert saved["protocol"]["weights"]["i3d"]["sha256"] == mn.I3D_WEIGHTS.sha256
    assert saved["protocol"]["training_shots"]["num_shots"] == 3 and not saved["protocol"]["training_shots"]["cached"]
    assert saved["metrics"]["shotwise_fvd"]["t"] == [0]
    assert "NOT the paper's" in saved["metrics"]["inception_score"]["note"]
    short = saved["metrics"]["short_term"]
    assert short["horizon"] == 10 and len(short["csim"]["per_frame"]) == 10
    assert short["fvd"]["frames"] == 9 and short["fvd"]["fake_videos"] == 4
    assert 0 <= short["miou"]["mean"] <= 1 and "mean_moving" in short["miou"]
    # sample 0 is the ground truth (the rollout wrote truth from it): best-of-N finds it
    assert short["psnr"]["mean"] > 140 and short["ssim"]["mean"] == pytest.approx(1.0)
    assert short["csim"]["mean"] == pytest.approx(1.0, abs=1e-5) and short["miou"]["mean"] == pytest.approx(1.0)
    for name in ("shotwise_fvd.png", "inception_score.png", "fid.png", "short_term.png", "label_dynamics.png"):
        assert (out / name).stat().st_size > 1000
    assert report["metrics"]["short_term"]["psnr"]["mean"] == short["psnr"]["mean"]
    again = ev.main(argv + ["--shotwise"])  # training-shot features come from the cache now
    assert again["protocol"]["training_shots"]["cached"]
    assert json.loads((out / "metrics.json").read_text())["metrics"].keys() == saved["metrics"].keys()
