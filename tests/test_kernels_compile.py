"""Ahead-of-time GPU compilation of every Triton kernel launch, without a GPU.

The interpreter runs the kernels' arithmetic on CPU but is more permissive than the compiler (loop-
carried types, tl.dot shapes, constexpr use). This test records the launches the launchers make for
a set of inputs (GPU block sizes, no interpreter), specialises them exactly as triton.jit would, and
compiles each through Triton's CUDA pipeline down to a cubin (ptxas ships with triton) for compute
capability 8.0, the oldest the dispatcher sends to Triton. It needs no CUDA device or driver.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def record_launches():
    """Run every launcher on small CPU tensors with the kernels replaced by recorders."""
    import importlib

    import torch

    # import_module: the package attribute kernels.warp is the public function, not the module
    convlstm, warp, onehot = (importlib.import_module(f"kernels.{name}") for name in ("convlstm", "warp", "onehot"))

    launches = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.kernel, args, kwargs))

    for module in (convlstm, warp, onehot):
        for name, value in list(vars(module).items()):
            if name.endswith("_kernel"):
                setattr(module, name, Recorder(value))

    # two combinations cover both layouts and both element widths while keeping compile time down
    for dtype, channels_last, index_dtype in ((torch.float32, False, torch.uint8), (torch.bfloat16, True, torch.int64)):
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        gates = torch.randn(3, 4 * 24, 5, 7).to(dtype).contiguous(memory_format=fmt)
        c_prev = torch.randn(3, 24, 5, 7).contiguous(memory_format=fmt)
        convlstm._forward(gates, c_prev)
        convlstm._backward(gates, c_prev, torch.randn(3, 24, 5, 7).to(dtype), c_prev, need_dc_prev=True)
        convlstm._backward(gates, c_prev, None, c_prev, need_dc_prev=False)
        convlstm._backward(gates, c_prev, c_prev.to(dtype), None, need_dc_prev=True)

        prev = torch.randn(2, 3, 5, 7).to(dtype).contiguous(memory_format=fmt)
        flow = torch.randn(2, 2, 5, 7).to(dtype)
        mask = torch.rand(2, 1, 5, 7).to(dtype)
        warp._forward(prev, flow, mask, prev)
        warp._forward(prev, flow, None, None)
        warp._backward(prev, flow, mask, prev, prev, need_prev=True, need_hall=True)
        warp._backward(prev, flow, mask, prev, prev, need_prev=False, need_hall=True)
        warp._backward(prev, flow, None, None, prev, need_prev=True, need_hall=False)

        logits = torch.randn(2, 19, 5, 7).to(dtype).contiguous(memory_format=fmt)
        onehot._argmax_onehot_launch(logits, with_onehot=True)
        onehot._argmax_onehot_launch(logits, with_onehot=False)
        weight = torch.randn(64, 19, 3, 3).to(dtype)
        index = torch.randint(0, 19, (2, 5, 7), dtype=index_dtype)
        onehot._onehot_conv3x3_forward(index, weight, weight[:, 0, 0, 0].contiguous(), fmt)
        onehot._onehot_conv3x3_forward(index, weight, None, fmt)
    return launches


def compile_all(arch):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    seen, compiled = set(), 0
    for kernel, args, kwargs in record_launches():
        binder = create_function_from_signature(kernel.signature, kernel.params, backend)
        bound_args, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
        key = (kernel.__name__, repr(signature), repr(sorted(constexprs.items())), repr(sorted(attrs.items())))
        if key in seen:
            continue
        seen.add(key)
        try:
            compiled_kernel = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                                             options=options.__dict__)
        except Exception as err:
            raise RuntimeError(f"{kernel.__name__} failed to compile for sm_{arch} with {signature} "
                               f"{constexprs}: {err}") from err
        assert compiled_kernel.asm.get("cubin"), kernel.__name__
        compiled += 1
    print(f"compiled {compiled} kernel specialisations for sm_{arch}")


@pytest.mark.skipif(os.environ.get("HVP_SKIP_AOT_COMPILE") == "1", reason="HVP_SKIP_AOT_COMPILE=1")
def test_every_launch_compiles_for_sm80():
    pytest.importorskip("triton.backends.nvidia", reason="triton without its CUDA backend: nothing to compile")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=str(ROOT), TRITON_DEFAULT_FP_FUSION="1")
    result = subprocess.run([sys.executable, __file__, "80"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "compiled" in result.stdout


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    compile_all(int(sys.argv[1]) if len(sys.argv) > 1 else 80)
