"""Argmax-discretise-onehot of the structure generator's rollout, and the encoder's first convolution
evaluated straight from the class-index map.

argmax_onehot(logits): logits (B, N, H, W) -> index (B, H, W) uint8, the argmax over classes with the
lowest class winning ties and NaN counting as the maximum (both as torch.argmax), and the one-hot
(B, N, H, W) in the logits' dtype and memory format. No gradient exists, so there is no backward.

onehot_conv3x3(index, weight, bias): conv2d(one_hot(index), weight, bias, padding=1) for a 3x3 weight
(C_out, N, 3, 3) without materialising the one-hot: each output is the bias plus at most nine
gathered weights weight[:, index[y + dy, x + dx], dy + 1, dx + 1]. The result is the same sum the
convolution computes (it only skips the products with zero), accumulated in float32. Ignore values:
an index outside [0, N) (e.g. 255 for "void") stands for an all-zero one-hot pixel and contributes
nothing, exactly as it does in the reference. Gradients reach weight and bias (not index); the
weight's is torch's convolution gradient of the materialised one-hot, which is faster on a GPU than
the kernel we had for it (see _onehot_conv3x3_weight_grad).
"""

import torch
import torch.nn.functional as F

from . import _dispatch
from ._dispatch import tl, triton

INDEX_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


# ----------------------------------------------------------------------------- references (spec, CPU path)

def argmax_onehot_reference(logits, with_onehot=True):
    index = logits.argmax(dim=1)
    onehot = None
    if with_onehot:
        # zeros_like keeps the logits' memory format (contiguous or channels-last)
        onehot = torch.zeros_like(logits).scatter_(1, index.unsqueeze(1), 1.0)
    return index.to(torch.uint8), onehot


def onehot_reference(index, n_classes, dtype):
    """One-hot (B, N, H, W) of an index map; values outside [0, N) give an all-zero pixel."""
    classes = torch.arange(n_classes, device=index.device).view(1, n_classes, 1, 1)
    return (index.unsqueeze(1).long() == classes).to(dtype)


def onehot_conv3x3_reference(index, weight, bias=None, memory_format=torch.contiguous_format):
    dtype = _dispatch.opmath_dtype(weight.dtype)
    onehot = onehot_reference(index, weight.shape[1], dtype)
    out = F.conv2d(onehot, weight.to(dtype), None if bias is None else bias.to(dtype), padding=1)
    return out.to(weight.dtype).contiguous(memory_format=memory_format)


# ----------------------------------------------------------------------------- Triton kernels

@triton.jit
def _argmax_onehot_kernel(logits_ptr, index_ptr, onehot_ptr, N, HW, l_sb, l_sc, l_sp, o_sb, o_sc, o_sp,
                          WRITE_ONEHOT: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    # one program: BLOCK_P pixels x all N classes (N <= 256) of one batch element
    pix_blocks = (HW + BLOCK_P - 1) // BLOCK_P  # axis 0 walks (batch, pixel block)
    b = (tl.program_id(0) // pix_blocks).to(tl.int64)
    pix = (tl.program_id(0) % pix_blocks) * BLOCK_P + tl.arange(0, BLOCK_P)
    cls = tl.arange(0, BLOCK_N)
    valid_p = pix < HW
    tile = valid_p[:, None] & (cls[None, :] < N)
    x = tl.load(logits_ptr + b * l_sb + cls[None, :] * l_sc + pix[:, None] * l_sp, mask=tile,
                other=float("-inf")).to(tl.float32)
    # torch.argmax: NaN is the maximum, and the lowest index wins every tie
    is_nan = x != x
    best = tl.max(tl.where(is_nan, float("-inf"), x), axis=1)
    first_max = tl.min(tl.where(tile & (x == best[:, None]), cls[None, :], BLOCK_N), axis=1)
    first_nan = tl.min(tl.where(is_nan, cls[None, :], BLOCK_N), axis=1)
    index = tl.where(first_nan < BLOCK_N, first_nan, first_max)
    tl.store(index_ptr + b * HW + pix, index.to(tl.uint8), mask=valid_p)
    if WRITE_ONEHOT:
        hot = (cls[None, :] == index[:, None]).to(onehot_ptr.dtype.element_ty)
        tl.store(onehot_ptr + b * o_sb + cls[None, :] * o_sc + pix[:, None] * o_sp, hot, mask=tile)


@triton.jit
def _onehot_conv3x3_fwd_kernel(index_ptr, wt_ptr, bias_ptr, out_ptr, N, C_out, H, W,
                               i_sb, i_sh, i_sw, o_sb, o_sc, o_sp,
                               HAS_BIAS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_O: tl.constexpr):
    # one program: BLOCK_P pixels x BLOCK_O output channels of one batch element. wt is the weight
    # laid out (9, N, C_out) so that the gathered rows are contiguous over output channels.
    pix_blocks = (H * W + BLOCK_P - 1) // BLOCK_P  # axis 0 walks (batch, pixel block)
    b = (tl.program_id(0) // pix_blocks).to(tl.int64)
    pix = (tl.program_id(0) % pix_blocks) * BLOCK_P + tl.arange(0, BLOCK_P)
    out_ch = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    valid_p = pix < H * W
    valid_o = out_ch < C_out
    y = pix // W
    x = pix % W
    acc = tl.zeros([BLOCK_P, BLOCK_O], dtype=tl.float32)
    for tap in tl.static_range(9):
        yy = y + (tap // 3 - 1)
        xx = x + (tap % 3 - 1)
        inside = valid_p & (yy >= 0) & (yy < H) & (xx >= 0) & (xx < W)  # zero padding
        cls = tl.load(index_ptr + b * i_sb + yy * i_sh + xx * i_sw, mask=inside, other=0)
        hit = inside & (cls >= 0) & (cls < N)  # ignore values select nothing
        row = tap * N + tl.where(hit, cls.to(tl.int32), 0)
        acc += tl.load(wt_ptr + row[:, None] * C_out + out_ch[None, :], mask=hit[:, None] & valid_o[None, :],
                       other=0.0).to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + out_ch, mask=valid_o, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + b * o_sb + out_ch[None, :] * o_sc + pix[:, None] * o_sp,
             acc.to(out_ptr.dtype.element_ty), mask=valid_p[:, None] & valid_o[None, :])


# ----------------------------------------------------------------------------- launchers

def _argmax_onehot_launch(logits, with_onehot):
    B, N, H, W = logits.shape
    index = torch.empty((B, H, W), dtype=torch.uint8, device=logits.device)
    onehot = (torch.empty(logits.shape, dtype=logits.dtype, device=logits.device,
                          memory_format=_dispatch.output_format(logits)) if with_onehot else None)
    if index.numel() == 0:
        return index, onehot
    logits = _dispatch.walkable(logits)
    onehot_arg = onehot if with_onehot else logits  # placeholder pointer, never written
    block_n = max(2, triton.next_power_of_2(N))
    elements = 8192 if _dispatch.INTERPRET else 2048
    block_p = max(2, min(elements // block_n, triton.next_power_of_2(H * W)))
    _argmax_onehot_kernel[(B * triton.cdiv(H * W, block_p),)](
        logits, index, onehot_arg, N, H * W,
        logits.stride(0), logits.stride(1), _dispatch.pixel_stride(logits),
        onehot_arg.stride(0), onehot_arg.stride(1), _dispatch.pixel_stride(onehot_arg),
        WRITE_ONEHOT=with_onehot, BLOCK_P=block_p, BLOCK_N=block_n)
    return index, onehot


def _onehot_conv3x3_forward(index, weight, bias, memory_format):
    B, H, W = index.shape
    C_out, N = weight.shape[:2]
    out = torch.empty((B, C_out, H, W), dtype=weight.dtype, device=weight.device, memory_format=memory_format)
    if out.numel() == 0:
        return out
    weight_t = weight.permute(2, 3, 1, 0).contiguous()  # (3, 3, N, C_out): rows of output channels
    bias_arg = bias.contiguous() if bias is not None else weight_t
    # all (up to 64) output channels of a pixel in one program: the nine index loads are shared by them
    block_o = max(2, min(64, triton.next_power_of_2(C_out)))
    block_p = max(2, min((8192 if _dispatch.INTERPRET else 2048) // block_o, triton.next_power_of_2(H * W)))
    grid = (B * triton.cdiv(H * W, block_p), triton.cdiv(C_out, block_o))
    _onehot_conv3x3_fwd_kernel[grid](index, weight_t, bias_arg, out, N, C_out, H, W, *index.stride(),
                                     out.stride(0), out.stride(1), _dispatch.pixel_stride(out),
                                     HAS_BIAS=bias is not None, BLOCK_P=block_p, BLOCK_O=block_o)
    return out


def _onehot_conv3x3_weight_grad(index, grad_out, weight_shape):
    """torch's convolution weight gradient of the materialised one-hot, in the reference's precision. A
    Triton kernel that summed the taps' products per class with atomic adds took twice the whole unfused
    forward + backward on an H200 (README, Kernels; bench/kernels.csv, commit e44cb5f), so the fused op
    keeps only its forward."""
    dtype = _dispatch.opmath_dtype(grad_out.dtype)
    onehot = onehot_reference(index, weight_shape[1], dtype)
    return torch.nn.grad.conv2d_weight(onehot, weight_shape, grad_out.to(dtype), padding=1)


# ----------------------------------------------------------------------------- autograd

class OneHotConv3x3Function(torch.autograd.Function):
    @staticmethod
    def forward(ctx, index, weight, bias, memory_format):
        ctx.save_for_backward(index)
        ctx.weight_shape, ctx.weight_dtype = tuple(weight.shape), weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return _onehot_conv3x3_forward(index, weight, bias, memory_format)

    @staticmethod
    def backward(ctx, grad_out):
        (index,) = ctx.saved_tensors
        grad_weight = grad_bias = None
        if ctx.needs_input_grad[1]:
            grad_weight = _onehot_conv3x3_weight_grad(index, grad_out, ctx.weight_shape).to(ctx.weight_dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            grad_bias = grad_out.sum(dim=(0, 2, 3), dtype=torch.float32).to(ctx.bias_dtype)
        return None, grad_weight, grad_bias, None


# ----------------------------------------------------------------------------- public functions

def argmax_onehot(logits, with_onehot=True):
    """logits (B, N, H, W), N <= 256 -> (index (B, H, W) uint8, onehot (B, N, H, W) in the logits'
    dtype and memory format, or None when with_onehot=False)."""
    op = "argmax_onehot"
    _dispatch.check_tensor(op, "logits", logits, 4)
    if not 1 <= logits.shape[1] <= 256:
        raise ValueError(f"{op}: logits must have 1..256 classes along dim 1 (the index is uint8), "
                         f"got shape {tuple(logits.shape)}")
    if _dispatch.use_triton(op, logits):
        try:
            with torch.no_grad():
                return _argmax_onehot_launch(logits, with_onehot)
        except Exception as err:
            _dispatch.triton_failed(op, err)
    with torch.no_grad():
        return argmax_onehot_reference(logits, with_onehot)


def onehot_conv3x3(index, weight, bias=None, memory_format=torch.contiguous_format):
    """conv2d(one_hot(index, N), weight, bias, padding=1) without building the one-hot.
    index (B, H, W) integer class map; weight (C_out, N, 3, 3); bias (C_out,) or None. Index values
    outside [0, N) are ignore values: an all-zero one-hot pixel. Returns (B, C_out, H, W) in the
    weight's dtype, laid out in memory_format (torch.contiguous_format or torch.channels_last)."""
    op = "onehot_conv3x3"
    _dispatch.check_tensor(op, "index", index, 3, dtypes=INDEX_DTYPES)
    _dispatch.check_tensor(op, "weight", weight, 4)
    if weight.shape[2:] != (3, 3) or weight.shape[1] < 1:
        raise ValueError(f"{op}: weight must have shape (C_out, N, 3, 3), got {tuple(weight.shape)}")
    if bias is not None:
        _dispatch.check_tensor(op, "bias", bias, 1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"{op}: bias must have shape (C_out,) = ({weight.shape[0]},) for weight of "
                             f"shape {tuple(weight.shape)}, got {tuple(bias.shape)}")
        if bias.dtype != weight.dtype:
            raise TypeError(f"{op}: bias must have the weight's dtype {weight.dtype}, got {bias.dtype}")
    if memory_format not in (torch.contiguous_format, torch.channels_last):
        raise ValueError(f"{op}: memory_format must be torch.contiguous_format or torch.channels_last, "
                         f"got {memory_format}")
    _dispatch.check_same_device(op, index=index, weight=weight, bias=bias)
    if _dispatch.use_triton(op, weight, index):
        try:
            return OneHotConv3x3Function.apply(index, weight, bias, memory_format)
        except Exception as err:
            _dispatch.triton_failed(op, err)
    return onehot_conv3x3_reference(index, weight, bias, memory_format)
