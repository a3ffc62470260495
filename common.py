"""What every HVP script shares: config, checkpoints, distributed set-up, signals, video and plot writing.

Kept deliberately small; each top-level script owns its model and its loop.
"""
from __future__ import annotations

import contextlib
import copy
import errno
import fcntl
import fnmatch
import functools
import hashlib
import io
import os
import pickle
import random
import re
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parent
CONFIG_DIR = ROOT / "configs"
DEFAULTS_DIR = CONFIG_DIR / "defaults"
DEFAULT_CONFIG = "synth_scroll.yaml"


class ConfigError(ValueError):
    """A config file, key or value is wrong; the message names it."""


# ----------------------------------------------------------------------------- config

class Config(dict):
    """A nested dict with attribute access: cfg.structure.lr == cfg["structure"]["lr"]."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"config has no key {name!r}") from None

    def to_dict(self) -> dict:
        return {k: v.to_dict() if isinstance(v, Config) else copy.deepcopy(v) for k, v in self.items()}

    def get_path(self, dotted: str):
        return _lookup(self, dotted)

    @staticmethod
    def from_dict(tree: dict) -> "Config":
        return _to_config(copy.deepcopy(tree))


def _to_config(tree):
    return Config({k: _to_config(v) for k, v in tree.items()}) if isinstance(tree, dict) else tree


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping: PyYAML would keep the last silently,
    so a second `edge:` block in a config would quietly replace the first."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def _read_yaml(path: Path) -> dict:
    try:
        with open(path) as f:
            tree = yaml.load(f, Loader=_UniqueKeyLoader)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(tree).__name__}")
    return tree


def load_schema() -> dict:
    """Every known key and its default, one file per top-level section in configs/defaults/."""
    schema = {}
    for path in sorted(DEFAULTS_DIR.glob("*.yaml")):
        schema[path.stem] = _read_yaml(path)
    return schema


def _type_name(value) -> str:
    return "null" if value is None else type(value).__name__


def _check_value(key: str, value, default, origin: str):
    """Return value coerced to the default's type, or raise naming the key."""
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(default, str):
        if isinstance(value, str):
            return value
    elif isinstance(default, list):
        if isinstance(value, list):
            return value
    elif isinstance(default, dict):
        if isinstance(value, dict):
            return value
    raise ConfigError(f"config key {key!r} expects {_type_name(default)}, got {_type_name(value)} {value!r} ({origin})")


def _merge(base: dict, update: dict, schema: dict, prefix: str, origin: str) -> dict:
    for key, value in update.items():
        dotted = f"{prefix}{key}"
        if key not in schema:
            known = ", ".join(sorted(schema)) or "none"
            raise ConfigError(f"unknown config key {dotted!r} ({origin}); known keys here: {known}")
        if isinstance(schema[key], dict) and schema[key] and isinstance(value, dict):
            _merge(base[key], value, schema[key], dotted + ".", origin)
        else:
            base[key] = _check_value(dotted, value, schema[key], origin)
    return base


def resolve_config_path(name_or_path: str | os.PathLike | None) -> Path:
    name = str(name_or_path or DEFAULT_CONFIG)
    for candidate in (Path(name), CONFIG_DIR / name, CONFIG_DIR / f"{name}.yaml"):
        if candidate.is_file():
            return candidate
    available = ", ".join(sorted(p.name for p in CONFIG_DIR.glob("*.yaml")))
    raise ConfigError(f"config {name!r} not found as a path or in {CONFIG_DIR}; available: {available}")


def _file_layers(path: Path, seen=()) -> list[tuple[Path, dict]]:
    """A config may name a parent with `inherit: other.yaml`; parents apply first."""
    tree = _read_yaml(path)
    tree.pop("config_file", None)  # recorded by load_config; present in configs saved beside checkpoints
    parent = tree.pop("inherit", None)
    if parent is None:
        return [(path, tree)]
    if path in seen:
        raise ConfigError(f"{path}: inherit cycle")
    return _file_layers(resolve_config_path(parent), seen + (path,)) + [(path, tree)]


_FLOAT_LITERAL = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def parse_override(token: str) -> tuple[str, object]:
    """'--a.b=3' -> ('a.b', 3). Values are parsed as YAML scalars so types come out right."""
    body = token[2:] if token.startswith("--") else token
    if "=" not in body:
        raise ConfigError(f"override {token!r} must look like --key=value")
    key, raw = body.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) and _FLOAT_LITERAL.fullmatch(raw.strip()):
        value = float(raw)  # YAML 1.1 reads '1e-5' (no dot) as a string; on a command line it is a number
    return key, value


# Allowed ranges of the numeric keys, first matching pattern wins; an integer key no pattern names must be
# >= 0 and a float key >= 0 (sizes, counts, weights, seeds). Lists of numbers are checked element-wise.
_RANGES = [
    (("*.lr", "*.width", "*.d_width", "*.width_mult", "*.lstm_mult", "edge.d_lr_ratio"), "> 0"),
    (("*.beta1", "*.beta2", "structure.adam_betas", "structure.kl_balance", "*.context_dropout"), "in [0, 1)"),
    (("*.threshold", "structure.own_inputs", "structure.false_birth_weight"), "in [0, 1]"),
    (("data.num_classes", "data.size", "data.synth_sequences", "data.synth_frames", "*.batch_size", "*_every",
      "*.n_past", "*.n_future", "*.frames", "*.samples", "*.clips", "*.chunk", "*.window", "*.time_stride",
      "*.shot_stride", "*.max_shots", "*.fvd_frames", "*.tau", "*.tau_d", "*.ngf", "*.ndf", "*.num_d",
      "*.n_layers_d", "*.d_layers", "*.dilation", "*.stride", "*.lstm_width", "*.h_channels",
      "*.z_channels", "*.posterior_layers", "*.predictor_layers", "*.prior_components", "*.z_pool", "*.val_clips",
      "*.val_frames", "*.val_future", "*.sample_clips", "*.sample_frames", "*.sample_future", "*.frames_start",
      "*.frames_max", "*.double_every", "*.video_scale", "rollout.batch"), ">= 1"),
    (("run.num_workers",), ">= -1"),
]


def _range_rule(key: str) -> str:
    for patterns, rule in _RANGES:
        if any(fnmatch.fnmatchcase(key, pattern) for pattern in patterns):
            return rule
    return ">= 0"


def _in_range(value, rule: str) -> bool:
    if rule == "> 0":
        return value > 0
    if rule == ">= 1":
        return value >= 1
    if rule == ">= 0":
        return value >= 0
    if rule == ">= -1":
        return value >= -1
    if rule == "in [0, 1)":
        return 0 <= value < 1
    return 0 <= value <= 1                                                      # in [0, 1]


def check_ranges(tree: dict, prefix: str = "") -> None:
    """Refuse a numeric value outside its key's range with one line naming the key (not torch's error later)."""
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            check_ranges(value, dotted + ".")
            continue
        numbers = value if isinstance(value, list) else [value]
        if not numbers or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in numbers):
            continue
        rule = _range_rule(dotted)
        for number in numbers:
            if not _in_range(number, rule):
                raise ConfigError(f"{dotted} must be {rule}, got {value!r}")


def load_config(name_or_path=None, overrides=()) -> Config:
    """Schema defaults <- YAML file (and its parents) <- overrides ('key=value' strings or (key, value) pairs)."""
    schema = load_schema()
    cfg = copy.deepcopy(schema)
    path = resolve_config_path(name_or_path)
    for layer_path, tree in _file_layers(path):
        _merge(cfg, tree, schema, "", f"from {layer_path}")
    for item in overrides:
        key, value = parse_override(item) if isinstance(item, str) else item
        *parents, leaf = key.split(".")
        nested = {leaf: value}
        for parent in reversed(parents):
            nested = {parent: nested}
        _merge(cfg, nested, schema, "", f"from --{key}")
    check_ranges(cfg)
    cfg = _to_config(cfg)
    cfg["config_file"] = str(path)
    return cfg


def describe_schema(schema: dict, prefix: str = "") -> list[str]:
    lines = []
    for key, value in schema.items():
        if isinstance(value, dict) and value:
            lines += describe_schema(value, f"{prefix}{key}.")
        else:
            lines.append(f"  --{prefix}{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}")
    return lines


@dataclass
class Args:
    cfg: str | None = None
    resume: str | None = None  # None: start fresh; "auto": the run's latest checkpoint; else a path


def parse_args(argv=None, aliases: dict | None = None, description: str = "") -> tuple[Config, Args]:
    """Command line: --cfg NAME.yaml, --resume[=PATH], -h, and --key=value / --key value overrides.

    `aliases` maps short flags to config keys (e.g. {"frames": "rollout.frames"}); an alias or key
    whose default is a bool may be given bare (--shotwise) to mean true.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    aliases = aliases or {}
    schema = load_schema()
    args, overrides = Args(), []
    i = 0
    while i < len(argv):
        token = argv[i]
        if token in ("-h", "--help"):
            print(description.strip() + "\n\nusage: --cfg NAME.yaml [--resume[=CKPT]] [--key=value ...]\n")
            if aliases:
                print("short flags: " + ", ".join(f"--{a} -> {k}" for a, k in aliases.items()) + "\n")
            print("keys and defaults (configs/defaults/*.yaml):")
            print("\n".join(describe_schema(schema)))
            raise SystemExit(0)
        if not token.startswith("--"):
            raise ConfigError(f"unexpected argument {token!r}; use --key=value")
        name, has_value, value = token[2:].partition("=")
        if not has_value and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            value, has_value = argv[i + 1], True
            i += 1
        i += 1
        if name == "cfg":
            args.cfg = value if has_value else None
            if not has_value:
                raise ConfigError("--cfg needs a config name, e.g. --cfg kitti64.yaml")
            continue
        if name == "resume":
            args.resume = value if has_value else "auto"
            continue
        key = aliases.get(name, name)
        if not has_value:
            try:
                default = _lookup(schema, key)
            except KeyError:
                raise ConfigError(f"unknown config key {key!r} (from --{name})") from None
            if not isinstance(default, bool):
                raise ConfigError(f"--{name} needs a value (config key {key!r})")
            overrides.append((key, True))
        else:
            overrides.append(f"{key}={value}")
    return load_config(args.cfg, overrides), args


def _lookup(tree: dict, dotted: str):
    for part in dotted.split("."):
        tree = tree[part]
    return tree


def save_config(cfg: Config, path) -> None:
    atomic_write_bytes(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False).encode())


# ----------------------------------------------------------------------------- atomic files

def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_read_umask()  # what open() would give a new file: mkstemp's 0600 would hide outputs from a lab


def temp_file(directory, prefix: str = "", suffix: str = ".tmp") -> tuple[int, str]:
    """mkstemp in `directory`, with the mode a plain open() would give (0644 under umask 022)."""
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=prefix, suffix=suffix)
    os.fchmod(fd, FILE_MODE)
    return fd, tmp


def atomic_write_bytes(path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file(path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.filename is None:   # a failed write() names no file: name the target
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        if e.filename is None:
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


class FolderError(RuntimeError):
    """A run or rollout folder is locked by another live process (the message names its pid) or cannot be written."""


_HELD_LOCKS: dict[Path, int] = {}


def lock_folder(folder) -> Path:
    """Take an exclusive lock on a run or rollout folder for the life of this process (flock on
    `folder/.lock`, released by the kernel when the process ends however it ends), so that a second run
    into the same folder stops at once instead of clobbering the first's checkpoints, logs or chunks.
    Holding the lock proves no live writer is in the folder: temporary files left there by killed writers
    (`.name.*.tmp`, `.name.pid.tmp.mp4`) are removed. Re-entrant within a process; rank 0 only under DDP."""
    folder = Path(folder).resolve()
    if not _DIST.is_main or folder in _HELD_LOCKS:
        return folder
    try:  # before any work: a folder that cannot be written fails here, not after the last training step
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, FILE_MODE)
    except OSError as e:
        raise FolderError(f"{folder} cannot be written ({e.strerror or type(e).__name__}); choose another folder "
                         f"(run.dir / rollout.out)") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise FolderError(f"{folder} is in use by another run (pid {holder}); wait for it, or choose another "
                         f"folder (run.dir / rollout.out)") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _HELD_LOCKS[folder] = fd
    for stale in folder.rglob(".*.tmp*"):          # .name.XXXX.tmp, .name.pid.tmp.mp4
        with contextlib.suppress(OSError):
            stale.unlink()
    return folder


def unlock_folder(folder) -> None:
    fd = _HELD_LOCKS.pop(Path(folder).resolve(), None)
    if fd is not None:
        os.close(fd)


def releases_folder_locks(fn):
    """Decorator of a script's main(): the folder locks it took are released when it returns or raises, so
    a caller in the same process (a test, a notebook) does not keep a folder locked after an error."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        before = set(_HELD_LOCKS)
        try:
            return fn(*args, **kwargs)
        finally:
            for folder in set(_HELD_LOCKS) - before:
                unlock_folder(folder)
    return wrapper


def file_sha256(path, block: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


# ----------------------------------------------------------------------------- seeding and RNG state

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every RNG's state in tensors and plain containers, so a checkpoint loads with weights_only=True."""
    kind, keys, position, has_gauss, cached_gauss = np.random.get_state()
    numpy_state = {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                   "has_gauss": int(has_gauss), "cached_gauss": float(cached_gauss)}
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["position"], n["has_gauss"], n["cached_gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- distributed

@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_DIST = Dist()


def pick_device(preference: str = "auto", local_rank: int = 0) -> torch.device:
    if preference == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if preference.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"run.device={preference!r} but no CUDA device is available")
    if preference == "cuda":
        return torch.device(f"cuda:{local_rank}")
    return torch.device(preference)


def setup_distributed(device_preference: str = "auto") -> Dist:
    """Initialise torch.distributed when launched by torchrun (nccl on GPU, gloo on CPU)."""
    global _DIST
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_preference, local_rank)
    if device.type == "cuda":  # with one rank too: Triton launches and CUDA-graph streams use the current device
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True   # every hot loop has static shapes: pick the fastest algorithms once
    if world_size > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    _DIST = Dist(rank=rank, world_size=world_size, local_rank=local_rank, device=device)
    return _DIST


def loader_workers(requested: int, device: torch.device) -> int:
    """run.num_workers, -1 resolved: on CUDA 4 worker processes per rank (at most the CPUs each rank has), so
    that decoding and collation overlap the GPU's step; on CPU none, since workers would take the cores the
    step runs on."""
    if requested >= 0:
        return requested
    if device.type != "cuda":
        return 0
    per_rank = (os.cpu_count() or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(0, min(4, per_rank - 1))


def cleanup_distributed(failed: bool = False) -> None:
    """Leave the process group; after a failure without the closing barrier, which the ranks that did not
    fail would never reach (the job would hang instead of exiting)."""
    if torch.distributed.is_initialized():
        if not failed:
            torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def log(*parts) -> None:
    """Print on rank 0 only, without breaking tqdm bars."""
    if _DIST.is_main:
        from tqdm import tqdm
        tqdm.write(" ".join(str(p) for p in parts))


# seconds between redraws of a progress bar whose stream is not a terminal (a log file, CI): tqdm's 0.1 s
# default writes a line per training step there, megabytes over a long run
LOG_REDRAW_SECONDS = 30.0


def progress(iterable=None, **kwargs):
    """tqdm on stderr, redrawn every 0.1 s on a terminal and every LOG_REDRAW_SECONDS in a log; the start,
    the end and the iterations/s stay. Keyword arguments go to tqdm (disable=..., desc=...)."""
    from tqdm import tqdm
    stream = kwargs.setdefault("file", sys.stderr)
    terminal = hasattr(stream, "isatty") and stream.isatty()
    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("mininterval", 0.1 if terminal else LOG_REDRAW_SECONDS)
    if not terminal:  # tqdm's monitor thread would otherwise force a redraw every 10 s
        kwargs.setdefault("maxinterval", LOG_REDRAW_SECONDS)
    return tqdm(iterable, **kwargs)


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    if _DIST.enabled:
        tensor = tensor.detach().clone()
        torch.distributed.all_reduce(tensor)
        tensor /= _DIST.world_size
    return tensor


def barrier() -> None:
    if _DIST.enabled:
        torch.distributed.barrier()


def main_rank_first(fn, *args):
    """fn(*args) on rank 0, then, after a barrier, on the other ranks; returns its result on every rank.
    Opening a dataset can generate synthetic data and pack caches: rank 0 writes them once, and the
    others read what it wrote instead of writing the same files at once."""
    if _DIST.is_main:
        result = fn(*args)
    barrier()
    if not _DIST.is_main:
        result = fn(*args)
    return result


# ----------------------------------------------------------------------------- precision

@functools.lru_cache(maxsize=None)
def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX-BF16 among the CPU's flags (Linux /proc/cpuinfo); False where it cannot be read.
    Without them bf16 is emulated and slower than fp32."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


@functools.lru_cache(maxsize=None)
def _cuda_has_native_bf16(index: int) -> bool:
    with torch.cuda.device(index):
        return torch.cuda.is_bf16_supported(including_emulation=False)


def resolve_precision(precision: str, device: torch.device) -> str:
    """run.precision=auto -> bf16 where the device computes it natively (a CUDA GPU with bf16 tensor cores;
    a CPU with AVX512-BF16 or AMX), fp32 elsewhere. Other values pass through. The device queries are
    cached: autocast calls this on every training and rollout step."""
    if precision != "auto":
        return precision
    device = torch.device(device)
    if device.type == "cuda":
        native = _cuda_has_native_bf16(device.index if device.index is not None else torch.cuda.current_device())
    else:
        native = device.type == "cpu" and cpu_has_native_bf16()
    return "bf16" if native else "fp32"


def autocast(device: torch.device, precision: str):
    """fp32 | bf16 | fp16 | auto autocast; recurrent state stays fp32 inside the models by design."""
    precision = resolve_precision(precision, device)
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is None:
        raise ConfigError(f"run.precision must be auto, fp32, bf16 or fp16, got {precision!r}")
    if dtype is torch.float16 and device.type != "cuda":
        raise ConfigError("precision=fp16 needs a CUDA device; use bf16 or fp32 on CPU")
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(device: torch.device, precision: str):
    return torch.amp.GradScaler(device.type, enabled=(precision == "fp16"))


# ----------------------------------------------------------------------------- checkpoints

CHECKPOINT_FORMAT = 2  # 2: RNG states as tensors and plain values, loadable with weights_only=True


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or does not match the config; the message says why."""


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    return module.module if hasattr(module, "module") else module


def save_checkpoint(path, *, step: int, cfg: Config, modules: dict, optimizers: dict | None = None,
                    schedulers: dict | None = None, scalers: dict | None = None, extra: dict | None = None) -> None:
    """Full training state, written atomically with the merged config beside it. Call on every rank:
    ranks' RNG states are gathered so that a resumed DDP run continues each rank's stream."""
    states = [rng_state()]
    if _DIST.enabled:
        states = [None] * _DIST.world_size
        torch.distributed.all_gather_object(states, rng_state())
    if not _DIST.is_main:
        return
    payload = {
        "format": CHECKPOINT_FORMAT,
        "step": step,
        "config": cfg.to_dict(),
        "modules": {k: unwrap(m).state_dict() for k, m in modules.items()},
        "optimizers": {k: o.state_dict() for k, o in (optimizers or {}).items()},
        "schedulers": {k: s.state_dict() for k, s in (schedulers or {}).items()},
        "scalers": {k: s.state_dict() for k, s in (scalers or {}).items()},
        "rng": states,
        "extra": extra or {},
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    path = Path(path)
    atomic_write_bytes(path, buffer.getvalue())
    save_config(cfg, path.with_suffix(".yaml"))


def read_checkpoint(path) -> dict:
    """A checkpoint's payload on the CPU. Weights-only unpickling: a file that holds anything but tensors and
    plain containers (a pickle that would run code, or an older format) is refused, never executed. The
    caller's load_state_dict moves what belongs on the device; RNG states must stay on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        if found:  # a pickle that names a function or class: it could run code, so it is never executed
            raise CheckpointError(f"checkpoint {path} is refused: it holds a {found.group(1)} object, and HVP loads "
                                  f"weights only (tensors and plain containers)") from None
        raise CheckpointError(f"checkpoint {path} cannot be read (not a torch file, or truncated)") from None
    except Exception as e:  # torch raises many kinds for truncated or foreign files
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"checkpoint {path} is not an HVP checkpoint of format {CHECKPOINT_FORMAT}")
    return payload


# keys renamed since checkpoints were first written: (section, old name) -> new name
RENAMED_KEYS = {("structure", "iterations"): "steps", ("structure", "ckpt_every"): "save_every"}
# options removed since (they did not help; docs/ keeps the record): (section, name) -> the value the code still
# implements, which a checkpoint may carry; any other value names a model this code cannot rebuild
RETIRED_KEYS = {("structure", "prior_weights"): "learnt"}


def saved_config(payload: dict, path="checkpoint") -> Config:
    """A checkpoint's config over the schema defaults: a key added to the schema after the checkpoint was
    written reads as its default, which is what the checkpoint was trained with; a renamed key reads under
    its new name; a retired key is dropped when it holds the behaviour kept, refused otherwise."""
    def overlay(base, saved):
        for key, value in saved.items():
            base[key] = overlay(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
        return base
    saved = copy.deepcopy(payload["config"])
    for (section, old), new in RENAMED_KEYS.items():
        if old in saved.get(section, {}):
            saved[section][new] = saved[section].pop(old)
    for (section, key), kept in RETIRED_KEYS.items():
        value = saved.get(section, {}).pop(key, kept)
        if value != kept:
            raise CheckpointError(f"{path} was trained with {section}.{key}={value!r}, an option since removed "
                                  f"(only {kept!r} is built)")
    return Config.from_dict(overlay(load_schema(), saved))


def check_compatible(payload: dict, cfg: Config, keys: list[str], path="checkpoint") -> None:
    """Refuse a checkpoint whose architecture-defining keys (classes, resolution, widths) differ."""
    saved = saved_config(payload, path)
    for key in keys:
        try:
            old = saved.get_path(key)
        except KeyError:
            raise CheckpointError(f"{path}: saved config lacks {key!r}") from None
        new = cfg.get_path(key)
        if old != new:
            raise CheckpointError(f"{path} was trained with {key}={old!r} but the config says {key}={new!r}")


def _restore(payload: dict, path, **groups: dict) -> None:
    """load_state_dict of every object in groups (modules=..., optimizers=...) from the payload's group of
    the same name; a missing or ill-fitting entry is a CheckpointError naming it."""
    for group_name, group in groups.items():
        for name, obj in group.items():
            if name not in payload[group_name]:
                raise CheckpointError(f"{path} has no {group_name[:-1]} {name!r}")
            target = unwrap(obj) if group_name == "modules" else obj
            try:
                target.load_state_dict(payload[group_name][name])
            except (RuntimeError, ValueError, KeyError) as e:
                raise CheckpointError(f"{path}: {group_name[:-1]} {name!r} does not fit: {str(e).splitlines()[0]}") from None


def load_checkpoint(path, *, modules: dict, optimizers: dict | None = None, schedulers: dict | None = None,
                    scalers: dict | None = None, cfg: Config | None = None, check_keys=(),
                    restore_rng: bool = True) -> dict:
    """Restore state in place; returns the payload (step, extra, config)."""
    payload = read_checkpoint(path)
    if cfg is not None:
        check_compatible(payload, cfg, list(check_keys), path)
    _restore(payload, path, modules=modules, optimizers=optimizers or {}, schedulers=schedulers or {},
             scalers=scalers or {})
    if restore_rng:
        states = payload["rng"]
        set_rng_state(states[_DIST.rank] if len(states) == _DIST.world_size else states[0])
    return payload


DATA_KEYS = ("data.num_classes", "data.size")


def load_trained(path, module: str, build, cfg: Config | None = None, check_keys=DATA_KEYS,
                 device="cpu") -> torch.nn.Module:
    """The network `module` of a training checkpoint, rebuilt by `build` (a model file's build_model) from the
    config saved with it, so its architecture always fits, in eval mode on `device`. With `cfg`, a
    checkpoint whose `check_keys` differ from it (classes, frame size) is refused with the key. The model
    carries `trained_config` and `checkpoint_identity` (sha256 prefix, step, path: what a rollout records)."""
    payload = read_checkpoint(path)
    if cfg is not None:
        check_compatible(payload, cfg, list(check_keys), path)
    if module not in payload["modules"]:   # before building a model from the config of something else
        raise CheckpointError(f"{path} holds {sorted(payload['modules'])}, not a {module!r} network")
    trained_config = saved_config(payload, path)
    model = build(trained_config)
    _restore(payload, path, modules={module: model})
    model.trained_config = trained_config
    model.checkpoint_identity = {"sha256": file_sha256(path)[:16], "step": int(payload["step"]), "path": str(path)}
    return model.to(device).eval()


def resume_path(args: Args, run_dir: Path) -> Path | None:
    if args.resume is None:
        return None
    path = run_dir / "last.pt" if args.resume == "auto" else Path(args.resume)
    if not path.is_file():
        raise CheckpointError(f"--resume: no checkpoint at {path}")
    return path


# ----------------------------------------------------------------------------- signals and non-finite losses

class StopSignal:
    """SIGINT/SIGTERM set a flag the loop checks so it can checkpoint and exit cleanly.
    A second SIGINT interrupts at once."""

    signalled = False  # any instance, this process: main_guard then exits with EXIT_STOPPED

    def __init__(self, every: int = 1):
        self.requested = False
        self.every = every  # under torchrun, steps between the ranks' comparisons of their flags
        self._previous = {}

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        StopSignal.signalled = True
        log(f"received {signal.Signals(signum).name}: saving a checkpoint and stopping")

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False

    def should_stop(self, step: int | None = None) -> bool:
        """All ranks stop together if any rank was signalled. Under torchrun the flags are compared (an
        all-reduce read on the host) only at steps that are multiples of `every`; other steps answer False."""
        if not _DIST.enabled:
            return self.requested
        if step is not None and step % self.every:
            return False
        flag = torch.tensor([float(self.requested)], device=_DIST.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())


class NonFiniteLoss(RuntimeError):
    pass


def _finite_on_all_ranks(finite: torch.Tensor) -> bool:
    if _DIST.enabled:
        flag = finite.float().reshape(1)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        finite = flag.bool()[0]
    return bool(finite)


def _nonfinite_hint() -> str:
    return "last checkpoint kept; set run.on_nonfinite=skip to skip such steps"


def loss_is_finite(loss: torch.Tensor, step: int, policy: str) -> bool:
    """policy 'stop' raises (the last good checkpoint stays intact); 'skip' returns False to skip the step."""
    if _finite_on_all_ranks(torch.isfinite(loss.detach())):
        return True
    if policy == "skip":
        log(f"step {step}: non-finite loss, skipping the update")
        return False
    raise NonFiniteLoss(f"step {step}: loss is {loss.item()}; stopping ({_nonfinite_hint()})")


class FiniteLosses:
    """run.on_nonfinite for a training loop without a host synchronisation per loss. `stop`: the losses'
    finiteness is gathered on the device and read every run.sync_every steps (`check(step, due_only=True)`)
    and before every checkpoint (`check(step)`), so the run stops within sync_every steps of a non-finite loss
    and its weights never reach a checkpoint. `skip`: each loss is read at once (`ok`), since skipping its
    update needs the answer."""

    def __init__(self, cfg):
        self.policy, self.every = cfg.run.on_nonfinite, cfg.run.sync_every
        self.pending, self.steps = None, None  # the unread flag and the first and last step it covers

    def ok(self, loss: torch.Tensor, step: int) -> bool:
        """Whether to apply this loss's update."""
        if self.policy == "skip":
            return loss_is_finite(loss, step, "skip")
        finite = torch.isfinite(loss.detach())
        if self.pending is None:
            self.pending, self.steps = finite, (step, step)
        else:
            self.pending, self.steps = self.pending & finite, (self.steps[0], step)
        return True

    def check(self, step: int, due_only: bool = False) -> None:
        """Raise NonFiniteLoss if a loss since the last check was not finite (on any rank); with due_only, only
        at multiples of run.sync_every."""
        if self.pending is None or (due_only and step % self.every):
            return
        finite, self.pending = self.pending, None
        if not _finite_on_all_ranks(finite):
            first, last = self.steps
            raise NonFiniteLoss(f"a non-finite loss at a step in {first}..{last}; stopping ({_nonfinite_hint()})")


# ----------------------------------------------------------------------------- videos, images and plots

def colorize(labels, palette) -> np.ndarray:
    """uint8 class indices (..., H, W) -> RGB (..., H, W, 3); indices outside the palette become black."""
    labels = np.asarray(labels)
    lut = np.zeros((256, 3), np.uint8)
    palette = np.asarray(palette, np.uint8).reshape(-1, 3)
    lut[: len(palette)] = palette
    return lut[labels.astype(np.uint8)]


def boundary_to_rgb(edges) -> np.ndarray:
    """Boundary probability (..., H, W) in [0, 1] -> grey RGB."""
    grey = (np.clip(np.asarray(edges, np.float32), 0, 1) * 255).round().astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)


def to_uint8_rgb(images: torch.Tensor) -> np.ndarray:
    """(..., 3, H, W) in [-1, 1] -> (..., H, W, 3) uint8."""
    images = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return images.movedim(-3, -1).cpu().numpy()


def tile(videos: list, columns: int | None = None, pad: int = 2) -> np.ndarray:
    """Videos (T, H, W, 3) of one size -> one (T, H', W', 3) grid, row-major, white gutters."""
    videos = [np.asarray(v) for v in videos]
    frames, height, width, _ = videos[0].shape
    for v in videos:
        if v.shape != videos[0].shape:
            raise ValueError(f"tile: all videos must share one shape, got {v.shape} and {videos[0].shape}")
    columns = columns or len(videos)
    rows = -(-len(videos) // columns)
    grid = np.full((frames, rows * (height + pad) + pad, columns * (width + pad) + pad, 3), 255, np.uint8)
    for i, v in enumerate(videos):
        r, c = divmod(i, columns)
        y, x = pad + r * (height + pad), pad + c * (width + pad)
        grid[:, y:y + height, x:x + width] = v
    return grid


def real_time_fps(meta: dict, stride: int) -> float:
    """Frames per second at which frames taken every `stride`-th frame of a dataset (meta.yaml's fps) play in real time."""
    return float(meta.get("fps", 10)) / stride


def write_video(path, frames, fps: float = 10, scale: int = 1) -> Path:
    """(T, H, W, 3) uint8 -> .mp4 (H.264 via imageio-ffmpeg) or .gif, written atomically."""
    frames = np.asarray(frames, np.uint8)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"write_video({path}): frames must be (T, H, W, 3), got {frames.shape}")
    return write_video_stream(path, iter(frames), fps, scale)


def write_video_stream(path, frames, fps: float = 10, scale: int = 1) -> Path:
    """Frames (H, W, 3) uint8 from any iterable -> .mp4 or .gif without holding the video in memory
    (MP4 streams to ffmpeg); the file appears only when complete."""
    import imageio.v2 as imageio
    path = Path(path)
    if path.suffix not in (".mp4", ".gif"):
        raise ValueError(f"write_video({path}): use .mp4 or .gif")
    options = (dict(fps=fps, codec="libx264", macro_block_size=1, quality=None, pixelformat="yuv420p",
                    output_params=["-crf", "18"], ffmpeg_log_level="error") if path.suffix == ".mp4"
               else dict(duration=1000 / fps, loop=0))
    with atomic_path(path) as tmp:
        with imageio.get_writer(tmp, format="FFMPEG" if path.suffix == ".mp4" else "GIF", mode="I", **options) as writer:
            for frame in frames:
                frame = np.asarray(frame, np.uint8)
                if scale > 1:
                    frame = frame.repeat(scale, axis=0).repeat(scale, axis=1)
                if path.suffix == ".mp4":  # H.264 with yuv420p needs even sides
                    frame = np.pad(frame, ((0, frame.shape[0] % 2), (0, frame.shape[1] % 2), (0, 0)), mode="edge")
                writer.append_data(frame)
    return path


def write_image(path, image) -> Path:
    import imageio.v3 as iio
    path = Path(path)
    with atomic_path(path) as tmp:
        iio.imwrite(tmp, np.asarray(image, np.uint8), extension=path.suffix)
    return path


def plot_curves(curves: dict, path, title: str = "", xlabel: str = "step", logy: bool = False) -> Path:
    """curves: name -> list of (x, y). One panel per name so scales do not fight."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = [n for n, pts in curves.items() if len(pts)]
    fig, axes = plt.subplots(1, max(len(names), 1), figsize=(3.6 * max(len(names), 1), 3.0), squeeze=False)
    for ax, name in zip(axes[0], names):
        xs, ys = zip(*curves[name])
        ax.plot(xs, ys, lw=1.2)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        if logy and min(ys) > 0:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format=path.suffix.lstrip("."))
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- misc

def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def fail(message: str, code: int = 2):
    """End a command-line run with one clear line instead of a traceback."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
EXIT_STOPPED = 75  # SIGINT/SIGTERM: stopped early after saving a checkpoint; --resume continues (EX_TEMPFAIL)


def main_guard(fn):
    """Run a script's main(): the errors users cause (config, data, checkpoint, a busy folder) and a full
    disk print one line; a run stopped by a signal exits with EXIT_STOPPED once its checkpoint is saved, so
    schedulers and scripts can tell it from a finished one (exit 0)."""
    from data.layout import DatasetError
    from data.rollout_io import RolloutError
    failed = True
    try:
        result = fn()
        failed = False
    except (ConfigError, CheckpointError, DatasetError, RolloutError, NonFiniteLoss, FolderError) as e:
        fail(str(e))
    except OSError as e:
        if e.errno not in DISK_FULL:
            raise
        fail(f"{e.filename or 'a file'}: {e.strerror or 'disk full'}. Nothing written before is damaged: every "
             f"checkpoint, chunk and video is written under a temporary name and renamed only when complete, so the "
             f"previous checkpoint and the finished rollout chunks are intact. Free space and rerun the same command "
             f"(training: with --resume)")
    finally:
        cleanup_distributed(failed)
    if StopSignal.signalled:
        log(f"stopped by a signal; exit code {EXIT_STOPPED} (resume with the same command and --resume)")
        raise SystemExit(EXIT_STOPPED)
    return result


def count_parameters(module: torch.nn.Module) -> int:
    """Parameters of a model (of the model inside a DDP wrapper)."""
    return sum(p.numel() for p in unwrap(module).parameters())


def assert_ranks_identical(module: torch.nn.Module, what: str = "parameters") -> None:
    """Under DDP, check every rank holds the same weights (the release silently did not average)."""
    if not _DIST.enabled:
        return
    with torch.no_grad():
        fingerprint = torch.stack([p.detach().double().sum() + (p.detach().double() ** 2).sum()
                                   for p in unwrap(module).parameters()]).to(_DIST.device)
    gathered = [torch.zeros_like(fingerprint) for _ in range(_DIST.world_size)]
    torch.distributed.all_gather(gathered, fingerprint)
    for rank, other in enumerate(gathered):
        if not torch.equal(other, gathered[0]):
            raise RuntimeError(f"rank {rank}'s {what} differ from rank 0's: gradients were not averaged")
    log(f"checked: {what} identical on all {_DIST.world_size} ranks")
