"""Argmax-onehot and the one-hot 3x3 convolution as a gather: Triton (interpreter on CPU) vs reference."""
import pytest
import torch
import torch.nn.functional as F

import kernels
from tests.conftest import KERNEL_DEVICE as DEVICE, KERNEL_DTYPES as DTYPES, LAYOUTS, seeded, triton_only

# conv output: at most 9 weights + bias summed in fp32, rounded once to the dtype (atol, rtol)
CONV_TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}
# weight gradient: sums of the upstream gradient over up to B*H*W pixels
GRAD_TOL = {torch.float32: (1e-4, 1e-5), torch.float16: (1e-2, 2e-3), torch.bfloat16: (1e-1, 1e-2)}


def make_logits(shape, dtype, layout, generator, ties=False):
    B, N, H, W = shape
    full = {"strided": (B, N, H, 2 * W), "cropped": (B, N + 1, H + 2, W + 3)}.get(layout, shape)
    if ties:  # few distinct values: many ties, which the lowest class must win
        base = torch.randint(0, 3, full, generator=generator).float()
    else:
        base = torch.randn(full, generator=generator)
    base = base.to(DEVICE, dtype)
    if layout == "channels_last":
        return base.contiguous(memory_format=torch.channels_last)
    if layout == "strided":
        return base[..., ::2]
    if layout == "cropped":
        return base[:, 1:, 1:H + 1, 2:W + 2]
    return base


def make_index(shape, n_classes, layout, generator, dtype=torch.uint8, ignore=255):
    """Class map with about a tenth of the pixels set to the ignore value."""
    B, H, W = shape
    full = {"strided": (B, H, 2 * W), "cropped": (B, H + 2, W + 3), "transposed": (B, W, H)}.get(layout, shape)
    index = torch.randint(0, n_classes, full, generator=generator)
    index[torch.rand(full, generator=generator) < 0.1] = ignore
    index = index.to(DEVICE, dtype)
    if layout == "strided":
        return index[..., ::2]
    if layout == "cropped":
        return index[:, 1:H + 1, 2:W + 2]
    if layout == "transposed":
        return index.transpose(1, 2)
    return index


# ----------------------------------------------------------------------------- argmax_onehot

@triton_only
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(2, 19, 5, 7), (1, 25, 8, 9), (2, 3, 1, 5)], ids=str)
def test_argmax_onehot_triton_matches_reference(shape, layout, dtype):
    logits = make_logits(shape, dtype, layout, seeded(shape, layout), ties=shape[1] == 25)
    with kernels.using_backend("triton"):
        index, onehot = kernels.argmax_onehot(logits)
    index_ref, onehot_ref = kernels.argmax_onehot_reference(logits)
    assert index.dtype == torch.uint8 and index.shape == (shape[0], shape[2], shape[3])
    assert onehot.dtype == dtype and onehot.shape == shape
    assert torch.equal(index, index_ref)
    assert torch.equal(onehot, onehot_ref)
    assert torch.equal(index.long(), logits.argmax(dim=1))
    if layout == "channels_last":
        assert onehot.is_contiguous(memory_format=torch.channels_last)


@triton_only
def test_argmax_ties_nan_and_inf_follow_torch_argmax():
    logits = torch.zeros(1, 6, 1, 5, device=DEVICE)
    logits[0, :, 0, 0] = torch.tensor([1.0, 3.0, 3.0, 2.0, 3.0, -1.0])      # tie: class 1
    logits[0, :, 0, 1] = float("-inf")                                        # all -inf: class 0
    logits[0, :, 0, 2] = torch.tensor([1.0, float("nan"), 5.0, float("nan"), 0.0, 0.0])  # first NaN
    logits[0, :, 0, 3] = torch.tensor([float("-inf"), -5.0, float("inf"), float("inf"), 0.0, 0.0])
    logits[0, :, 0, 4] = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 7.0])        # last class
    with kernels.using_backend("triton"):
        index, onehot = kernels.argmax_onehot(logits)
    assert index.view(-1).tolist() == logits.argmax(dim=1).view(-1).tolist() == [1, 0, 1, 2, 5]
    assert torch.equal(onehot.sum(dim=1), torch.ones(1, 1, 5, device=DEVICE))


@triton_only
def test_argmax_256_classes_and_index_only():
    logits = make_logits((1, 256, 3, 4), torch.float32, "contiguous", seeded("256"))
    logits[0, 255, 1, 2] = 100.0
    with kernels.using_backend("triton"):
        index, onehot = kernels.argmax_onehot(logits, with_onehot=False)
    assert onehot is None
    assert torch.equal(index.long(), logits.argmax(dim=1)) and index[0, 1, 2].item() == 255


def test_argmax_onehot_bad_inputs():
    with pytest.raises(ValueError, match=r"argmax_onehot: logits must be 4-D, got shape \(19, 4, 4\)"):
        kernels.argmax_onehot(torch.zeros(19, 4, 4))
    with pytest.raises(ValueError, match="1..256 classes"):
        kernels.argmax_onehot(torch.zeros(1, 300, 2, 2))
    with pytest.raises(TypeError, match="logits must have dtype"):
        kernels.argmax_onehot(torch.zeros(1, 3, 2, 2, dtype=torch.int32))


# ----------------------------------------------------------------------------- onehot_conv3x3

def conv_inputs(c_out, n_classes, dtype, generator, bias=True):
    weight = torch.randn((c_out, n_classes, 3, 3), generator=generator).to(DEVICE, dtype)
    b = torch.randn((c_out,), generator=generator).to(DEVICE, dtype) if bias else None
    return weight, b


def run_conv(fn, index, weight, bias, grad_out, memory_format):
    weight = weight.detach().requires_grad_()
    params = [weight] + ([bias.detach().requires_grad_()] if bias is not None else [])
    out = fn(index, *params, memory_format=memory_format) if bias is not None else fn(
        index, weight, None, memory_format=memory_format)
    return out, torch.autograd.grad(out, params, grad_out)


@triton_only
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("index_layout, out_format", [
    ("contiguous", torch.contiguous_format), ("contiguous", torch.channels_last),
    ("strided", torch.contiguous_format), ("cropped", torch.channels_last), ("transposed", torch.contiguous_format)])
@pytest.mark.parametrize("shape, c_out, n_classes", [((2, 5, 7), 16, 19), ((1, 9, 4), 20, 25), ((2, 1, 6), 8, 3)],
                         ids=str)
def test_onehot_conv3x3_triton_matches_conv2d(shape, c_out, n_classes, index_layout, out_format, dtype):
    g = seeded(shape, index_layout, str(out_format))
    index = make_index(shape, n_classes, index_layout, g)
    weight, bias = conv_inputs(c_out, n_classes, dtype, g)
    grad_out = torch.randn((shape[0], c_out) + shape[1:], generator=g).to(DEVICE, dtype)
    with kernels.using_backend("triton"):
        out, (d_weight, d_bias) = run_conv(kernels.onehot_conv3x3, index, weight, bias, grad_out, out_format)
    out_ref, (d_weight_ref, d_bias_ref) = run_conv(kernels.onehot_conv3x3_reference, index, weight, bias,
                                                   grad_out, out_format)
    assert out.dtype == dtype and out.shape == (shape[0], c_out) + shape[1:]
    assert out.is_contiguous(memory_format=out_format)
    torch.testing.assert_close(out.float(), out_ref.float(), atol=CONV_TOL[dtype][0], rtol=CONV_TOL[dtype][1])
    torch.testing.assert_close(d_weight.float(), d_weight_ref.float(), atol=GRAD_TOL[dtype][0], rtol=GRAD_TOL[dtype][1])
    torch.testing.assert_close(d_bias.float(), d_bias_ref.float(), atol=GRAD_TOL[dtype][0], rtol=GRAD_TOL[dtype][1])
    # the reference itself is the convolution of the explicit one-hot
    explicit = F.conv2d(F.one_hot(index.long().clamp(max=n_classes), n_classes + 1)[..., :n_classes]
                        .permute(0, 3, 1, 2).double(), weight.double(), bias.double(), padding=1)
    torch.testing.assert_close(out_ref.double(), explicit, atol=CONV_TOL[dtype][0], rtol=CONV_TOL[dtype][1])


@triton_only
@pytest.mark.parametrize("index_dtype, ignore", [(torch.uint8, 255), (torch.int64, -1), (torch.int32, 19),
                                                 (torch.int16, 1000)])
def test_ignore_values_contribute_nothing(index_dtype, ignore):
    """Values outside [0, N) are an all-zero one-hot: an all-ignore map gives the bias everywhere."""
    weight, bias = conv_inputs(8, 19, torch.float32, seeded("ignore"))
    all_ignored = torch.full((2, 5, 6), ignore, dtype=index_dtype, device=DEVICE)
    index = make_index((2, 5, 6), 19, "contiguous", seeded("ignore", 2), dtype=index_dtype, ignore=ignore)
    assert (index == ignore).any()
    with kernels.using_backend("triton"):
        out = kernels.onehot_conv3x3(all_ignored, weight, bias)
        mixed = kernels.onehot_conv3x3(index, weight, bias)
        no_bias = kernels.onehot_conv3x3(all_ignored, weight)
    assert torch.equal(out, bias.view(1, 8, 1, 1).expand(2, 8, 5, 6))
    assert torch.equal(no_bias, torch.zeros_like(no_bias))
    torch.testing.assert_close(mixed, kernels.onehot_conv3x3_reference(index, weight, bias), atol=1e-5, rtol=1e-5)


@triton_only
def test_without_bias_and_under_inference_mode():
    g = seeded("inference")
    index = make_index((2, 7, 5), 19, "contiguous", g)
    weight, _ = conv_inputs(16, 19, torch.float32, g, bias=False)
    with torch.inference_mode(), kernels.using_backend("triton"):
        out = kernels.onehot_conv3x3(index, weight)
    torch.testing.assert_close(out, kernels.onehot_conv3x3_reference(index, weight), atol=1e-5, rtol=1e-5)


@triton_only
def test_matches_conv_on_argmax_onehot_end_to_end():
    """The rollout path: logits -> (index, onehot); conv(onehot) == onehot_conv3x3(index)."""
    logits = make_logits((2, 19, 6, 7), torch.float32, "contiguous", seeded("e2e"))
    weight, bias = conv_inputs(12, 19, torch.float32, seeded("e2e", 1))
    with kernels.using_backend("triton"):
        index, onehot = kernels.argmax_onehot(logits)
        fused = kernels.onehot_conv3x3(index, weight, bias)
    torch.testing.assert_close(fused, F.conv2d(onehot, weight, bias, padding=1), atol=1e-5, rtol=1e-5)


def test_reference_gradcheck_float64():
    g = seeded("gradcheck")
    index = make_index((1, 4, 5), 3, "contiguous", g).cpu()
    weight = torch.randn((2, 3, 3, 3), generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn((2,), generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda w, b: kernels.onehot_conv3x3_reference(index, w, b), (weight, bias))


@pytest.mark.parametrize("index_shape, weight_shape, bias_shape, index_dtype, error, words", [
    ((2, 4, 4), (8, 5, 5, 5), (8,), torch.uint8, ValueError, "weight must have shape (C_out, N, 3, 3)"),
    ((2, 4, 4), (8, 5, 3, 3), (7,), torch.uint8, ValueError, "bias must have shape (C_out,) = (8,)"),
    ((2, 1, 4, 4), (8, 5, 3, 3), (8,), torch.uint8, ValueError, "index must be 3-D, got shape (2, 1, 4, 4)"),
    ((2, 4, 4), (8, 5, 3, 3), (8,), torch.float32, TypeError, "index must have dtype"),
])
def test_onehot_conv3x3_bad_inputs(index_shape, weight_shape, bias_shape, index_dtype, error, words):
    with pytest.raises(error) as info:
        kernels.onehot_conv3x3(torch.zeros(index_shape, dtype=index_dtype), torch.zeros(weight_shape),
                               torch.zeros(bias_shape))
    assert words in str(info.value) and "onehot_conv3x3" in str(info.value)


def test_onehot_conv3x3_bias_dtype_and_memory_format_checked():
    index, weight = torch.zeros(1, 3, 3, dtype=torch.uint8), torch.zeros(4, 2, 3, 3)
    with pytest.raises(TypeError, match="bias must have the weight's dtype"):
        kernels.onehot_conv3x3(index, weight, torch.zeros(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="memory_format"):
        kernels.onehot_conv3x3(index, weight, None, memory_format=torch.preserve_format)
