"""Backend switch shared by the fused kernels: auto | triton | torch.

The backend is chosen, in order of precedence, by `set_backend(name)` (scripts call it with their
config value `kernel_backend`; "auto" there defers to the environment), the environment variable
HVP_KERNEL_BACKEND, and the default "auto".

- "torch":  always the plain-torch reference.
- "triton": always the Triton kernels; a clear RuntimeError when that cannot work (triton missing or
            broken, a CPU tensor without TRITON_INTERPRET=1, a GPU older than compute capability 8.0,
            float64 inputs).
- "auto":   Triton on CUDA devices of compute capability >= 8.0 and, under TRITON_INTERPRET=1, on
            CPU; torch everywhere else. If a Triton launch, forward or backward, fails under "auto" (a
            broken install typically fails at the first compile, not at import) the failure is reported
            once as a warning and the process continues on the torch path.

Kernel files import `triton` and `tl` from here. When triton cannot be imported they get stand-ins
that let the `@triton.jit` definitions be evaluated (so every module imports) and raise a clear error
if a kernel is ever launched.
"""

import contextlib
import os
import warnings

import torch

BACKENDS = ("auto", "triton", "torch")
ENV_VAR = "HVP_KERNEL_BACKEND"
# float64 exists for gradcheck on the references; the Triton kernels are written for these.
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FLOAT_DTYPES = TRITON_DTYPES + (torch.float64,)


class _MissingTriton:
    """Stand-in for the triton modules when they cannot be imported."""

    constexpr = object  # only evaluated as an annotation in kernel signatures

    def __init__(self, reason):
        self.reason = reason

    def jit(self, fn=None, **kwargs):
        if fn is None:
            return lambda f: _UnavailableKernel(f.__name__, self.reason)
        return _UnavailableKernel(fn.__name__, self.reason)

    def __getattr__(self, name):
        raise RuntimeError(f"triton is not usable ({self.reason}); cannot use triton.{name}")


class _UnavailableKernel:
    def __init__(self, name, reason):
        self.name, self.reason = name, reason

    def __getitem__(self, grid):
        raise RuntimeError(f"cannot launch Triton kernel {self.name}: triton is not usable ({self.reason})")


try:
    import triton
    import triton.language as tl

    TRITON_ERROR = None
    # triton.jit decides at decoration time whether a kernel is interpreted, so what counts is the
    # environment when the kernel modules (imported right after this one) are first imported.
    INTERPRET = bool(triton.knobs.runtime.interpret) if hasattr(triton, "knobs") else (
        os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes"))
except Exception as err:  # missing or broken install: everything still imports, torch path only
    TRITON_ERROR = f"{type(err).__name__}: {err}"
    triton = tl = _MissingTriton(TRITON_ERROR)
    INTERPRET = False

HAS_TRITON = TRITON_ERROR is None
_backend_override = None
_auto_failure = None  # set when a Triton launch failed under "auto"


def _check_name(name, source):
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(f"kernel backend {name!r} from {source} is not one of {', '.join(BACKENDS)}")
    return name.lower()


def set_backend(name):
    """Select the kernel backend for this process: "auto", "triton" or "torch". Scripts pass their
    config value; "auto" there leaves the choice to $HVP_KERNEL_BACKEND when that is set."""
    global _backend_override
    name = _check_name(name, "set_backend()")
    _backend_override = None if name == "auto" else name


def get_backend():
    """The backend in force: set_backend("triton" | "torch") if called, else $HVP_KERNEL_BACKEND,
    else "auto"."""
    if _backend_override is not None:
        return _backend_override
    env = os.environ.get(ENV_VAR)
    if env is None or env == "":
        return "auto"
    return _check_name(env, f"environment variable {ENV_VAR}")


@contextlib.contextmanager
def using_backend(name):
    """Temporarily select a backend (tests and benchmarks)."""
    global _backend_override
    previous = _backend_override
    set_backend(name)
    try:
        yield
    finally:
        _backend_override = previous


def _triton_blocker(tensor):
    """Why the Triton path cannot run for this tensor, or None if it can."""
    if not HAS_TRITON:
        return f"triton is not usable ({TRITON_ERROR})"
    if tensor.is_floating_point() and tensor.dtype not in TRITON_DTYPES:
        return f"the Triton kernels take float32/float16/bfloat16, got {tensor.dtype}"
    if tensor.device.type == "cuda":
        if INTERPRET:
            return None
        major, minor = torch.cuda.get_device_capability(tensor.device)
        if major < 8:
            return f"device {tensor.device} has compute capability {major}.{minor}; Triton needs 8.0+"
        return None
    if tensor.device.type == "cpu":
        if INTERPRET:
            return None
        return "CPU tensors need TRITON_INTERPRET=1 set before triton is imported"
    return f"no Triton support for device type {tensor.device.type}"


def use_triton(op, *tensors):
    """Whether `op` should launch its Triton kernel for these inputs (dtype, device)."""
    backend = get_backend()
    if backend == "torch":
        return False
    reasons = [_triton_blocker(t) for t in tensors if t is not None]
    reason = next((r for r in reasons if r is not None), None)
    if backend == "triton":
        if reason is not None:
            raise RuntimeError(f"{op}: kernel backend 'triton' was requested but {reason}")
        return True
    return reason is None and _auto_failure is None


def triton_failed(op, err):
    """Called when a launch raised under a backend; re-raises unless the backend is "auto"."""
    global _auto_failure
    if get_backend() != "auto":
        raise err
    _auto_failure = f"{type(err).__name__}: {err}"
    warnings.warn(f"{op}: Triton kernel failed ({_auto_failure}); kernel backend 'auto' falls back to "
                  f"torch for the rest of this process", RuntimeWarning, stacklevel=3)


def reference_backward(op, err, reference, inputs, grads_out, needs):
    """The gradients of `reference(*inputs)` for a backward whose Triton launch raised `err`: under "auto"
    the failure is reported as for a forward launch and training continues on the torch path (the
    reference is recomputed and differentiated); under "triton" the error is raised. `needs`: which
    inputs want a gradient (ctx.needs_input_grad); grads_out: the incoming gradients, None for unused
    outputs. Returns one gradient or None per input."""
    triton_failed(op, err)
    with torch.enable_grad():
        leaves = [x.detach().requires_grad_(bool(need)) if isinstance(x, torch.Tensor) and x.is_floating_point()
                  else x for x, need in zip(inputs, needs)]
        outputs = reference(*leaves)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        pairs = [(o, g) for o, g in zip(outputs, grads_out) if g is not None and o.requires_grad]
        wanted = [i for i, (x, need) in enumerate(zip(leaves, needs)) if need and isinstance(x, torch.Tensor)
                  and x.requires_grad]
        grads = torch.autograd.grad([o for o, _ in pairs], [leaves[i] for i in wanted], [g for _, g in pairs],
                                    allow_unused=True) if pairs and wanted else [None] * len(wanted)
    result = [None] * len(inputs)
    for i, grad in zip(wanted, grads):
        result[i] = grad
    return tuple(result)


def check_tensor(op, name, tensor, ndim, dtypes=FLOAT_DTYPES):
    """Clear TypeError/ValueError for a wrong argument of a public kernel function."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{op}: {name} must have dtype in ({allowed}), got {tensor.dtype}")
    if tensor.dim() != ndim:
        raise ValueError(f"{op}: {name} must be {ndim}-D, got shape {tuple(tensor.shape)}")


def check_same_device(op, **tensors):
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{name} on {device}" for name, device in devices.items())
        raise ValueError(f"{op}: all inputs must be on one device, got {listed}")


def opmath_dtype(dtype):
    """Arithmetic dtype of the references: float32 for the 16-bit types, else the dtype itself."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def pixel_stride(tensor):
    """Stride of the flattened pixel index p = y * W + x of the last two dims, or None when H and W
    cannot be walked as one strided axis (then the launcher makes the tensor contiguous)."""
    h, w = tensor.shape[-2], tensor.shape[-1]
    if w == 1:
        return tensor.stride(-2)
    if h == 1 or tensor.stride(-2) == w * tensor.stride(-1):
        return tensor.stride(-1)
    return None


def walkable(tensor):
    """The tensor itself if its pixels form one strided axis, else a contiguous copy."""
    return tensor if pixel_stride(tensor) is not None else tensor.contiguous()


def tile_shape(n_pixels, n_channels, channels_inner):
    """(BLOCK_P, BLOCK_C) of a 2-D pixel x channel tile, longest along the unit-stride axis. The
    interpreter runs one numpy pass per program, so it gets bigger tiles (fewer programs)."""
    elements = 4096 if INTERPRET else 1024
    if channels_inner:
        block_c = max(2, min(triton.next_power_of_2(n_channels), elements))
        block_p = max(2, min(elements // block_c, triton.next_power_of_2(n_pixels)))
    else:
        block_p = max(2, min(triton.next_power_of_2(n_pixels), elements))
        block_c = max(2, min(elements // block_p, triton.next_power_of_2(n_channels)))
    return block_p, block_c


def is_channels_last(tensor):
    return (tensor.dim() == 4 and tensor.is_contiguous(memory_format=torch.channels_last)
            and not tensor.is_contiguous())


def output_format(tensor):
    return torch.channels_last if is_channels_last(tensor) else torch.contiguous_format
