"""Fused flow warp + blend: Triton kernel (interpreter on CPU) against the grid_sample reference."""
import zlib

import pytest
import torch
import torch.nn.functional as F

import kernels
from tests.conftest import KERNEL_DEVICE as DEVICE, KERNEL_DTYPES as DTYPES, LAYOUTS, triton_only

# (atol, rtol). The reference goes through grid_sample's normalised grid and back, so sample
# positions differ by float32 rounding (~1e-6 px): fp32 tolerances sit a little above fp32 epsilon.
# The flow gradient sums over channels of value differences.
TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (3e-3, 3e-3), torch.bfloat16: (3e-2, 3e-2)}
FLOW_TOL = {torch.float32: (5e-4, 1e-4), torch.float16: (1e-2, 5e-3), torch.bfloat16: (1e-1, 5e-2)}
SHAPES = [(2, 3, 5, 7), (1, 4, 9, 16), (2, 3, 1, 6)]  # (B, C, H, W): odd sizes, a single row


def make(shape, dtype, layout, generator, scale=1.0, uniform=False):
    B, C, H, W = shape
    draw = torch.rand if uniform else torch.randn
    if layout == "contiguous":
        return (draw(shape, generator=generator) * scale).to(DEVICE, dtype)
    if layout == "channels_last":
        t = (draw(shape, generator=generator) * scale).to(DEVICE, dtype)
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "strided":
        return (draw((B, C, H, 2 * W), generator=generator) * scale).to(DEVICE, dtype)[..., ::2]
    if layout == "cropped":
        base = (draw((B, C + 1, H + 2, W + 3), generator=generator) * scale).to(DEVICE, dtype)
        return base[:, 1:, 1:H + 1, 2:W + 2]
    raise ValueError(layout)


def inputs(shape, dtype, layout, seed, flow_scale=3.0):
    g = torch.Generator().manual_seed(seed)
    B, C, H, W = shape
    prev = make(shape, dtype, layout, g)
    # flows of a few pixels, so that many samples land outside and get clamped to the border
    flow = make((B, 2, H, W), dtype, layout, g, scale=flow_scale)
    mask = make((B, 1, H, W), dtype, layout, g, uniform=True)
    hallucinated = make(shape, dtype, layout, g)
    grad_out = torch.randn(shape, generator=g).to(DEVICE, dtype)
    return prev, flow, mask, hallucinated, grad_out


def run(fn, tensors, grad_out, need=None):
    tensors = [t.detach().requires_grad_(need is None or n) for t, n in zip(tensors, need or [True] * len(tensors))]
    out = fn(*tensors)
    wanted = [t for t in tensors if t.requires_grad]
    return out, torch.autograd.grad(out, wanted, grad_out)


def assert_close(actual, expected, tol, what):
    atol, rtol = tol
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, what
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


@triton_only
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_warp_blend_triton_matches_reference(shape, layout, dtype):
    prev, flow, mask, hallucinated, grad_out = inputs(shape, dtype, layout, zlib.crc32(repr((shape, layout)).encode()))
    with kernels.using_backend("triton"):
        out, grads = run(kernels.warp_blend, (prev, flow, mask, hallucinated), grad_out)
    out_ref, grads_ref = run(kernels.warp_blend_reference, (prev, flow, mask, hallucinated), grad_out)
    assert_close(out, out_ref, TOL[dtype], "out")
    for name, got, want in zip(("prev", "flow", "mask", "hallucinated"), grads, grads_ref):
        assert_close(got, want, FLOW_TOL[dtype] if name in ("flow", "mask") else TOL[dtype], f"d_{name}")
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last) or shape[2] * shape[3] == 1


@triton_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "cropped"])
def test_warp_triton_matches_reference(layout, dtype):
    prev, flow, _, _, grad_out = inputs((2, 3, 7, 5), dtype, layout, 11)
    with kernels.using_backend("triton"):
        out, (d_prev, d_flow) = run(kernels.warp, (prev, flow), grad_out)
    out_ref, (d_prev_ref, d_flow_ref) = run(kernels.warp_reference, (prev, flow), grad_out)
    assert_close(out, out_ref, TOL[dtype], "out")
    assert_close(d_prev, d_prev_ref, TOL[dtype], "d_prev")
    assert_close(d_flow, d_flow_ref, FLOW_TOL[dtype], "d_flow")


@triton_only
def test_detached_prev_skips_scatter_but_keeps_other_gradients():
    """vid2vid detaches the previous frame: only flow, mask, hallucinated need gradients."""
    prev, flow, mask, hallucinated, grad_out = inputs((2, 3, 6, 5), torch.float32, "contiguous", 5)
    need = [False, True, True, True]
    with kernels.using_backend("triton"):
        _, grads = run(kernels.warp_blend, (prev, flow, mask, hallucinated), grad_out, need)
    _, grads_ref = run(kernels.warp_blend_reference, (prev, flow, mask, hallucinated), grad_out, need)
    assert len(grads) == 3
    for got, want in zip(grads, grads_ref):
        assert_close(got, want, FLOW_TOL[torch.float32], "grad")


@triton_only
def test_zero_flow_is_identity_and_large_flow_clamps_to_border():
    prev, flow, _, _, _ = inputs((1, 2, 4, 6), torch.float32, "contiguous", 6)
    with kernels.using_backend("triton"):
        assert torch.equal(kernels.warp(prev, torch.zeros_like(flow)), prev)
        # every sample far to the right and below: the bottom-right pixel everywhere
        far = torch.full_like(flow, 100.0)
        out = kernels.warp(prev, far)
        assert torch.equal(out, prev[:, :, -1:, -1:].expand_as(out))
        # a one-pixel shift to the right: column x reads column x + 1, the last column repeats
        shift = torch.zeros_like(flow)
        shift[:, 0] = 1.0
        out = kernels.warp(prev, shift)
        assert torch.equal(out[..., :-1], prev[..., 1:]) and torch.equal(out[..., -1], prev[..., -1])


@triton_only
def test_many_outputs_sampling_one_pixel_accumulate_prev_gradient():
    """All outputs sample the same source point: the atomics must add every contribution."""
    prev = torch.randn(1, 2, 5, 5, device=DEVICE, requires_grad=True)
    ys, xs = torch.meshgrid(torch.arange(5.0), torch.arange(5.0), indexing="ij")
    flow = torch.stack((2.25 - xs, 1.5 - ys)).unsqueeze(0).to(DEVICE)  # everyone samples (2.25, 1.5)
    with kernels.using_backend("triton"):
        (d_prev,) = torch.autograd.grad(kernels.warp(prev, flow).sum(), (prev,))
    expected = torch.zeros(5, 5)
    expected[1, 2], expected[1, 3], expected[2, 2], expected[2, 3] = 0.75 * 0.5, 0.25 * 0.5, 0.75 * 0.5, 0.25 * 0.5
    torch.testing.assert_close(d_prev.cpu(), (25 * expected).expand(1, 2, 5, 5))


def test_reference_matches_explicit_bilinear_formula():
    prev = torch.arange(20.0).view(1, 1, 4, 5)  # value = 5 * y + x: bilinear reproduces it exactly
    flow = torch.zeros(1, 2, 4, 5)
    flow[0, 0, 1, 1], flow[0, 1, 1, 1] = 0.25, 1.5  # (1, 1) samples (1.25, 2.5)
    flow[0, 0, 0, 0] = -3.0  # clamped to x = 0
    out = kernels.warp_reference(prev, flow)
    assert abs(out[0, 0, 1, 1].item() - (5 * 2.5 + 1.25)) < 1e-5
    assert out[0, 0, 0, 0].item() == 0.0
    mask = torch.full((1, 1, 4, 5), 0.25)
    blended = kernels.warp_blend_reference(prev, flow, mask, torch.full_like(prev, 8.0))
    torch.testing.assert_close(blended, 0.75 * out + 0.25 * 8.0)


def test_reference_gradcheck_float64():
    g = torch.Generator().manual_seed(7)
    prev = torch.randn((1, 2, 4, 5), generator=g, dtype=torch.float64, requires_grad=True)
    flow = (torch.randn((1, 2, 4, 5), generator=g, dtype=torch.float64) * 1.3).requires_grad_()
    mask = torch.rand((1, 1, 4, 5), generator=g, dtype=torch.float64, requires_grad=True)
    hallucinated = torch.randn((1, 2, 4, 5), generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(kernels.warp_blend_reference, (prev, flow, mask, hallucinated))
    assert torch.autograd.gradcheck(kernels.warp_reference, (prev, flow))


def test_torch_backend_matches_vid2vid_style_grid_sample():
    """The public function on the torch path is the usual normalised-grid grid_sample."""
    prev, flow, _, _, _ = inputs((2, 3, 6, 8), torch.float32, "contiguous", 9)
    H, W = 6, 8
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, H, device=prev.device), torch.linspace(-1, 1, W, device=prev.device),
                            indexing="ij")
    grid = torch.stack((xs + flow[:, 0] * 2 / (W - 1), ys + flow[:, 1] * 2 / (H - 1)), dim=-1)
    expected = F.grid_sample(prev, grid, mode="bilinear", padding_mode="border", align_corners=True)
    with kernels.using_backend("torch"):
        torch.testing.assert_close(kernels.warp(prev, flow), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fn, args, error, words", [
    ("warp", ((2, 3, 4, 5), (2, 3, 4, 5)), ValueError, "flow must have shape (B, 2, H, W) = (2, 2, 4, 5)"),
    ("warp", ((2, 3, 4, 5), (2, 2, 4, 6)), ValueError, "got (2, 2, 4, 6)"),
    ("warp", ((3, 4, 5), (2, 4, 5)), ValueError, "prev must be 4-D"),
    ("warp_blend", ((2, 3, 4, 5), (2, 2, 4, 5), (2, 3, 4, 5), (2, 3, 4, 5)), ValueError, "mask must have shape"),
    ("warp_blend", ((2, 3, 4, 5), (2, 2, 4, 5), (2, 1, 4, 5), (2, 1, 4, 5)), ValueError, "hallucinated must have"),
])
def test_bad_shapes_raise_clear_errors(fn, args, error, words):
    with pytest.raises(error) as info:
        getattr(kernels, fn)(*(torch.zeros(shape) for shape in args))
    assert words in str(info.value) and fn in str(info.value)


def test_bad_dtypes_raise_clear_errors():
    prev, flow = torch.zeros(1, 3, 4, 4), torch.zeros(1, 2, 4, 4)
    with pytest.raises(TypeError, match="flow must have dtype"):
        kernels.warp(prev, flow.long())
    with pytest.raises(TypeError, match="hallucinated must have prev's dtype"):
        kernels.warp_blend(prev, flow, torch.zeros(1, 1, 4, 4), prev.half())


@triton_only
def test_mixed_dtypes_flow_and_mask_half_frames_float32():
    """Under autocast the flow/mask branch may come out in half precision while frames stay fp32."""
    prev, flow, mask, hallucinated, grad_out = inputs((2, 3, 5, 6), torch.float32, "contiguous", 13)
    flow, mask = flow.half(), mask.half()
    with kernels.using_backend("triton"):
        out, grads = run(kernels.warp_blend, (prev, flow, mask, hallucinated), grad_out)
    out_ref, grads_ref = run(kernels.warp_blend_reference, (prev, flow, mask, hallucinated), grad_out)
    assert out.dtype == torch.float32 and grads[1].dtype == torch.float16 and grads[2].dtype == torch.float16
    assert_close(out, out_ref, TOL[torch.float32], "out")
    for got, want in zip(grads, grads_ref):
        assert_close(got, want, FLOW_TOL[torch.float16], "grad")
