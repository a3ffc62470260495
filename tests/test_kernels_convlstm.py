"""Fused ConvLSTM cell: Triton kernel (interpreter on CPU) against the plain-torch reference."""
import pytest
import torch

import kernels
from tests.conftest import KERNEL_DEVICE as DEVICE, KERNEL_DTYPES as DTYPES, LAYOUTS, seeded, triton_only

# (atol, rtol) for h and the gradients; c is float32 for every input dtype and compared at fp32 level
# (the inputs are the same rounded values on both sides, so only the arithmetic differs)
TOL = {torch.float32: (2e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}
C_TOL = (2e-5, 1e-5)
SHAPES = [(2, 3, 5, 7), (1, 8, 8, 8), (3, 2, 1, 9)]  # (B, C, H, W): odd sizes, one-row maps


def make(shape, dtype, layout, generator, scale=1.0):
    """A random tensor of `shape` in the given memory layout (values identical across layouts)."""
    B, C, H, W = shape
    if layout == "contiguous":
        return (torch.randn(shape, generator=generator) * scale).to(DEVICE, dtype)
    if layout == "channels_last":
        t = (torch.randn(shape, generator=generator) * scale).to(DEVICE, dtype)
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # every other column: pixels still one strided axis, read in place
        return (torch.randn((B, C, H, 2 * W), generator=generator) * scale).to(DEVICE, dtype)[..., ::2]
    if layout == "cropped":  # a crop: rows do not chain, the launcher copies
        base = (torch.randn((B, C + 1, H + 2, W + 3), generator=generator) * scale).to(DEVICE, dtype)
        return base[:, 1:, 1:H + 1, 2:W + 2]
    raise ValueError(layout)


def run_cell(fn, gates, c_prev, grad_h, grad_c):
    gates = gates.detach().requires_grad_()
    c_prev = c_prev.detach().requires_grad_()
    h, c = fn(gates, c_prev)
    d_gates, d_c_prev = torch.autograd.grad((h, c), (gates, c_prev), (grad_h, grad_c))
    return h, c, d_gates, d_c_prev


def assert_close(actual, expected, tol, what):
    atol, rtol = tol
    assert actual.shape == expected.shape, what
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


@triton_only
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_triton_matches_reference_forward_backward(shape, layout, dtype):
    g = seeded(shape, layout)
    B, C, H, W = shape
    gates = make((B, 4 * C, H, W), dtype, layout, g, scale=2.0)
    c_prev = make((B, C, H, W), torch.float32, layout, g)
    grad_h = torch.randn((B, C, H, W), generator=g).to(DEVICE, dtype)
    grad_c = torch.randn((B, C, H, W), generator=g).to(DEVICE)
    with kernels.using_backend("triton"):
        h, c, d_gates, d_c_prev = run_cell(kernels.convlstm_cell, gates, c_prev, grad_h, grad_c)
    h_ref, c_ref, d_gates_ref, d_c_prev_ref = run_cell(kernels.convlstm_cell_reference, gates, c_prev,
                                                       grad_h, grad_c)
    assert h.dtype == dtype and c.dtype == torch.float32 and d_gates.dtype == dtype
    assert_close(h, h_ref, TOL[dtype], "h")
    assert_close(c, c_ref, C_TOL, "c")
    assert_close(d_gates, d_gates_ref, TOL[dtype], "d_gates")
    assert_close(d_c_prev, d_c_prev_ref, C_TOL if dtype == torch.float32 else TOL[dtype], "d_c_prev")
    if layout == "channels_last" and C > 1 and H * W > 1:
        assert h.is_contiguous(memory_format=torch.channels_last)
        assert c.is_contiguous(memory_format=torch.channels_last)


@triton_only
@pytest.mark.parametrize("used", ["h_only", "c_only"])
def test_triton_backward_with_one_output_unused(used):
    """The unused output's gradient arrives as None (not materialised): both kernel branches."""
    g = torch.Generator().manual_seed(1)
    gates = make((2, 12, 5, 3), torch.float32, "contiguous", g, scale=2.0)
    c_prev = make((2, 3, 5, 3), torch.float32, "contiguous", g)
    weights = torch.randn((2, 3, 5, 3), generator=g).to(DEVICE)
    grads = []
    for fn in (kernels.convlstm_cell, kernels.convlstm_cell_reference):
        x, cp = gates.clone().requires_grad_(), c_prev.clone().requires_grad_()
        with kernels.using_backend("triton"):
            h, c = fn(x, cp)
        loss = ((h if used == "h_only" else c) * weights).sum()
        grads.append(torch.autograd.grad(loss, (x, cp)))
    for got, want in zip(*grads):
        assert_close(got, want, TOL[torch.float32], used)
    assert grads[0][0].abs().sum() > 0


@triton_only
def test_triton_c_prev_without_grad_and_half_c_prev():
    """c_prev not requiring grad (first step, zeros) and a float16 c_prev both work."""
    g = torch.Generator().manual_seed(2)
    gates = make((2, 8, 3, 5), torch.float16, "contiguous", g).requires_grad_()
    c_prev = make((2, 2, 3, 5), torch.float16, "contiguous", g)
    with kernels.using_backend("triton"):
        h, c = kernels.convlstm_cell(gates, c_prev)
        (d_gates,) = torch.autograd.grad(h.float().sum() + c.sum(), (gates,))
    h_ref, c_ref = kernels.convlstm_cell_reference(gates, c_prev)
    (d_ref,) = torch.autograd.grad(h_ref.float().sum() + c_ref.sum(), (gates,))
    assert_close(h, h_ref, TOL[torch.float16], "h")
    assert_close(c, c_ref, C_TOL, "c")
    assert_close(d_gates, d_ref, TOL[torch.float16], "d_gates")


@triton_only
def test_triton_zero_sized_batch():
    with kernels.using_backend("triton"):
        h, c = kernels.convlstm_cell(torch.zeros(0, 8, 3, 3, device=DEVICE), torch.zeros(0, 2, 3, 3, device=DEVICE))
    assert h.shape == (0, 2, 3, 3) and c.shape == (0, 2, 3, 3)


def test_reference_matches_formula_with_saturated_gates():
    i, f, g, o = (torch.tensor(v) for v in ([0.0, 50.0], [-50.0, 1.0], [2.0, -3.0], [0.5, -0.25]))
    gates = torch.cat((i, f, g, o)).view(1, 8, 1, 1)
    c_prev = torch.tensor([1.5, -2.0])
    h, c = kernels.convlstm_cell_reference(gates, c_prev.view(1, 2, 1, 1))
    c_expected = torch.sigmoid(f) * c_prev + torch.sigmoid(i) * torch.tanh(g)
    torch.testing.assert_close(c.view(2), c_expected)
    torch.testing.assert_close(h.view(2), torch.sigmoid(o) * torch.tanh(c_expected))
    assert abs(c[0, 0].item() - 0.5 * torch.tanh(torch.tensor(2.0)).item()) < 1e-6  # forget gate shut


@triton_only
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # numpy, interpreter only
def test_triton_saturated_gates_stay_finite():
    gates = torch.tensor([-100.0, 100.0, 100.0, -100.0, 30.0, -30.0, 100.0, -100.0]).view(1, 8, 1, 1).to(DEVICE)
    c_prev = torch.tensor([3.0, -3.0]).view(1, 2, 1, 1).to(DEVICE)
    with kernels.using_backend("triton"):
        h, c = kernels.convlstm_cell(gates, c_prev)
    h_ref, c_ref = kernels.convlstm_cell_reference(gates, c_prev)
    assert torch.isfinite(h).all() and torch.isfinite(c).all()
    assert_close(h, h_ref, TOL[torch.float32], "h")
    assert_close(c, c_ref, C_TOL, "c")


def test_reference_gradcheck_float64():
    g = torch.Generator().manual_seed(3)
    gates = torch.randn((2, 8, 3, 2), generator=g, dtype=torch.float64, requires_grad=True)
    c_prev = torch.randn((2, 2, 3, 2), generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(kernels.convlstm_cell_reference, (gates, c_prev))


def test_public_function_on_torch_backend_is_reference():
    g = torch.Generator().manual_seed(4)
    gates, c_prev = torch.randn((2, 8, 3, 3), generator=g), torch.randn((2, 2, 3, 3), generator=g)
    with kernels.using_backend("torch"):
        h, c = kernels.convlstm_cell(gates, c_prev)
    h_ref, c_ref = kernels.convlstm_cell_reference(gates, c_prev)
    assert torch.equal(h, h_ref) and torch.equal(c, c_ref)
    # half gates: c still float32
    h16, c16 = kernels.convlstm_cell(gates.half(), c_prev)
    assert h16.dtype == torch.float16 and c16.dtype == torch.float32


@pytest.mark.parametrize("gates_shape, c_shape, dtype, error, words", [
    ((2, 7, 3, 3), (2, 1, 3, 3), torch.float32, ValueError, "4*C channels"),
    ((2, 8, 3, 3), (2, 3, 3, 3), torch.float32, ValueError, "c_prev must have shape"),
    ((2, 8, 3, 3), (2, 2, 3, 4), torch.float32, ValueError, "(2, 2, 3, 3)"),
    ((2, 8, 3), (2, 2, 3), torch.float32, ValueError, "gates must be 4-D"),
    ((2, 8, 3, 3), (2, 2, 3, 3), torch.int64, TypeError, "gates must have dtype"),
])
def test_bad_inputs_raise_clear_errors(gates_shape, c_shape, dtype, error, words):
    gates = torch.zeros(gates_shape).to(dtype)
    with pytest.raises(error, match=None) as info:
        kernels.convlstm_cell(gates, torch.zeros(c_shape))
    assert words in str(info.value) and "convlstm_cell" in str(info.value)
