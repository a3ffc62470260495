"""The kernel backend switch: names, environment, fallbacks, and life without a usable triton."""
import os
import subprocess
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import pytest  # noqa: E402

import kernels  # noqa: E402
from kernels import _dispatch, convlstm  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
triton_usable = kernels.HAS_TRITON and (DEVICE == "cuda" or _dispatch.INTERPRET)


@pytest.fixture(autouse=True)
def clean_switch(monkeypatch):
    monkeypatch.delenv(_dispatch.ENV_VAR, raising=False)
    monkeypatch.setattr(_dispatch, "_backend_override", None)
    monkeypatch.setattr(_dispatch, "_auto_failure", None)


def test_default_env_and_set_backend_precedence(monkeypatch):
    assert kernels.get_backend() == "auto"
    monkeypatch.setenv(_dispatch.ENV_VAR, "torch")
    assert kernels.get_backend() == "torch"
    kernels.set_backend("TRITON")
    assert kernels.get_backend() == "triton"  # an explicit config value beats the environment
    kernels.set_backend("auto")
    assert kernels.get_backend() == "torch"  # config "auto" leaves it to the environment
    with kernels.using_backend("triton"):
        assert kernels.get_backend() == "triton"
    assert kernels.get_backend() == "torch"


def test_unknown_names_are_refused(monkeypatch):
    with pytest.raises(ValueError, match="'cuda' from set_backend"):
        kernels.set_backend("cuda")
    monkeypatch.setenv(_dispatch.ENV_VAR, "fast")
    with pytest.raises(ValueError, match="HVP_KERNEL_BACKEND"):
        kernels.get_backend()


def test_torch_backend_never_launches_triton(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("Triton launcher called on the torch backend")
    monkeypatch.setattr(convlstm, "_forward", boom)
    kernels.set_backend("torch")
    h, c = kernels.convlstm_cell(torch.randn(1, 8, 3, 3), torch.randn(1, 2, 3, 3))
    assert h.shape == (1, 2, 3, 3)


def test_forced_triton_refuses_float64():
    with kernels.using_backend("triton"), pytest.raises(RuntimeError, match="float64"):
        kernels.convlstm_cell(torch.randn(1, 8, 3, 3, dtype=torch.float64), torch.randn(1, 2, 3, 3))


@pytest.mark.skipif(not triton_usable, reason="needs a usable Triton path (GPU or interpreter)")
def test_auto_uses_triton_and_falls_back_with_a_warning_when_a_launch_fails(monkeypatch):
    calls = []
    real_forward = convlstm._forward
    monkeypatch.setattr(convlstm, "_forward", lambda *a: calls.append(1) or real_forward(*a))
    gates, c_prev = torch.randn(1, 8, 3, 3, device=DEVICE), torch.randn(1, 2, 3, 3, device=DEVICE)
    kernels.convlstm_cell(gates, c_prev)
    assert calls == [1]  # auto picked Triton

    def broken(*args):
        raise RuntimeError("simulated compiler failure")
    monkeypatch.setattr(convlstm, "_forward", broken)
    with pytest.warns(RuntimeWarning, match="simulated compiler failure"):
        h, c = kernels.convlstm_cell(gates, c_prev)
    h_ref, c_ref = kernels.convlstm_cell_reference(gates, c_prev)
    assert torch.equal(h, h_ref) and torch.equal(c, c_ref)
    with kernels.using_backend("triton"), pytest.raises(RuntimeError, match="simulated compiler failure"):
        kernels.convlstm_cell(gates, c_prev)  # a forced backend never hides the failure


def _failing_backward_cases():
    import importlib
    warp = importlib.import_module("kernels.warp")  # the module: kernels.warp is the public function
    generator = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=generator).to(DEVICE).requires_grad_()

    return [
        ("convlstm_cell", convlstm, "_backward", [rand(2, 8, 5, 5), rand(2, 2, 5, 5)],
         lambda gates, c: sum(kernels.convlstm_cell(gates, c)), lambda gates, c: sum(kernels.convlstm_cell_reference(gates, c))),
        ("warp", warp, "_backward", [rand(2, 3, 5, 5), rand(2, 2, 5, 5)],
         kernels.warp, kernels.warp_reference),
        ("warp_blend", warp, "_backward", [rand(2, 3, 5, 5), rand(2, 2, 5, 5), rand(2, 1, 5, 5).sigmoid().detach().requires_grad_(),
                                           rand(2, 3, 5, 5)],
         kernels.warp_blend, kernels.warp_blend_reference),
    ]


@pytest.mark.skipif(not triton_usable, reason="needs Triton (a GPU, or the interpreter on CPU)")
@pytest.mark.parametrize("case", range(3))
def test_a_failing_backward_launch_falls_back_to_the_reference_gradients_under_auto(monkeypatch, case):
    """A Triton backward that raises: under "auto" the gradients are the torch reference's (tolerance 1e-5),
    with the fallback warning; under "triton" the error is raised."""
    op, module, launcher, inputs, fused, reference = _failing_backward_cases()[case]

    def broken(*args, **kwargs):
        raise RuntimeError("simulated backward compiler failure")
    monkeypatch.setattr(module, launcher, broken)
    expected = torch.autograd.grad(reference(*inputs).square().sum(), inputs)
    with pytest.warns(RuntimeWarning, match=f"{op}: Triton kernel failed.*simulated backward"):
        got = torch.autograd.grad(fused(*inputs).square().sum(), inputs)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(_dispatch, "_auto_failure", None)
    with kernels.using_backend("triton"), pytest.raises(RuntimeError, match="simulated backward"):
        torch.autograd.grad(fused(*inputs).square().sum(), inputs)


def run_python(code, **env):
    full_env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", _dispatch.ENV_VAR)}
    full_env.update(env, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=full_env, capture_output=True, text=True,
                          timeout=120)


def test_everything_works_without_triton():
    code = """
import sys
sys.modules["triton"] = None  # import triton now raises ImportError, as on a machine without it
import torch, kernels
assert not kernels.HAS_TRITON
g = torch.randn(2, 8, 4, 5); c = torch.randn(2, 2, 4, 5)
h, c1 = kernels.convlstm_cell(g, c)
out = kernels.warp_blend(torch.randn(1, 3, 4, 5), torch.randn(1, 2, 4, 5), torch.rand(1, 1, 4, 5), torch.randn(1, 3, 4, 5))
index, onehot = kernels.argmax_onehot(torch.randn(1, 19, 4, 5))
y = kernels.onehot_conv3x3(index, torch.randn(8, 19, 3, 3), torch.randn(8))
kernels.set_backend("triton")
try:
    kernels.convlstm_cell(g, c)
except RuntimeError as err:
    print("ERR", err)
"""
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert "ERR convlstm_cell: kernel backend 'triton' was requested but triton is not usable" in result.stdout


def test_cpu_without_interpreter_uses_torch_and_forced_triton_explains():
    code = """
import torch, kernels
h, c = kernels.convlstm_cell(torch.randn(1, 8, 2, 2), torch.randn(1, 2, 2, 2))  # auto -> torch on CPU
kernels.set_backend("triton")
try:
    kernels.argmax_onehot(torch.randn(1, 3, 2, 2))
except RuntimeError as err:
    print("ERR", err)
"""
    result = run_python(code, TRITON_INTERPRET="0", CUDA_VISIBLE_DEVICES="")
    assert result.returncode == 0, result.stderr
    assert "TRITON_INTERPRET=1" in result.stdout
