"""Fused flow warp + blend of the image generator: out = (1 - mask) * warp(prev, flow) + mask * hallucinated.

warp is the bilinear backward warp of vid2vid: flow (B, 2, H, W) is in pixels, channel 0 = dx and
channel 1 = dy, and output pixel (x, y) samples prev at (x + dx, y + dy), i.e.
grid_sample(mode="bilinear", align_corners=True, padding_mode="border") with the grid built from the
flow. Sample positions are clamped to the image ("border"); as in grid_sample, a clamped coordinate
(and one lying exactly on the border) passes no gradient to the flow. Arithmetic is float32 for the
16-bit types; the result comes back in prev's dtype. Gradients reach prev, flow, mask and
hallucinated; the gradient to prev (a scatter) is skipped when prev does not require it, which is the
usual case (vid2vid detaches the previous generated frame).
"""

import torch
import torch.nn.functional as F

from . import _dispatch
from ._dispatch import tl, triton


# ----------------------------------------------------------------------------- reference (spec, CPU path)

def _warp_opmath(prev, flow):
    B, C, H, W = prev.shape
    dtype = _dispatch.opmath_dtype(prev.dtype)
    flow = flow.to(dtype)
    xs = torch.arange(W, device=prev.device, dtype=dtype).view(1, 1, W)
    ys = torch.arange(H, device=prev.device, dtype=dtype).view(1, H, 1)
    # align_corners=True puts -1 and +1 on the centres of the first and last pixels; a 1-pixel axis
    # unnormalises to 0 whatever the grid, so any finite scale works there
    grid_x = (xs + flow[:, 0]) * (2.0 / max(W - 1, 1)) - 1.0
    grid_y = (ys + flow[:, 1]) * (2.0 / max(H - 1, 1)) - 1.0
    grid = torch.stack((grid_x, grid_y), dim=-1)
    return F.grid_sample(prev.to(dtype), grid, mode="bilinear", padding_mode="border", align_corners=True)


def warp_reference(prev, flow):
    return _warp_opmath(prev, flow).to(prev.dtype)


def warp_blend_reference(prev, flow, mask, hallucinated):
    warped = _warp_opmath(prev, flow)
    mask = mask.to(warped.dtype)
    return ((1.0 - mask) * warped + mask * hallucinated.to(warped.dtype)).to(prev.dtype)


# ----------------------------------------------------------------------------- Triton kernels
# One program owns BLOCK pixels of one batch element: it reads their flow (and mask) once, computes
# the four bilinear taps and weights once, then loops over the channels. Tensors are addressed as
# base + b * s_b + channel * s_c + pixel * s_p (pixel = y * W + x), so any layout whose H and W form
# one strided axis (contiguous, channels-last, batch/channel slices) is read in place.

@triton.jit
def _bilinear_taps(flow_ptr, b, pix, valid, fl_sb, fl_sc, fl_sp, H, W, x_max, y_max):
    y = pix // W
    x = pix % W
    flow_base = flow_ptr + b * fl_sb + pix * fl_sp
    sx = x.to(tl.float32) + tl.load(flow_base, mask=valid, other=0.0).to(tl.float32)
    sy = y.to(tl.float32) + tl.load(flow_base + fl_sc, mask=valid, other=0.0).to(tl.float32)
    # border padding; a coordinate on or beyond the border gets no flow gradient (grid_sample's rule)
    inside_x = (sx > 0.0) & (sx < x_max)
    inside_y = (sy > 0.0) & (sy < y_max)
    sx = tl.minimum(tl.maximum(sx, 0.0), x_max)
    sy = tl.minimum(tl.maximum(sy, 0.0), y_max)
    x0f = tl.floor(sx)
    y0f = tl.floor(sy)
    tx = sx - x0f
    ty = sy - y0f
    x0 = x0f.to(tl.int32)
    y0 = y0f.to(tl.int32)
    # the far tap only exists off the last row/column; on it its weight is exactly zero
    has_x1 = x0 + 1 < W
    has_y1 = y0 + 1 < H
    x1 = tl.where(has_x1, x0 + 1, x0)
    y1 = tl.where(has_y1, y0 + 1, y0)
    return (y0 * W + x0, y0 * W + x1, y1 * W + x0, y1 * W + x1, tx, ty, has_x1, has_y1,
            inside_x, inside_y)


@triton.jit
def _tap_weights(tx, ty):
    """Bilinear weights of the four taps (top-left, top-right, bottom-left, bottom-right)."""
    return (1.0 - tx) * (1.0 - ty), tx * (1.0 - ty), (1.0 - tx) * ty, tx * ty


@triton.jit
def _warp_fwd_kernel(prev_ptr, flow_ptr, mask_ptr, hall_ptr, out_ptr, C, H, W, x_max, y_max,
                     pr_sb, pr_sc, pr_sp, fl_sb, fl_sc, fl_sp, m_sb, m_sp, ha_sb, ha_sc, ha_sp,
                     o_sb, o_sc, o_sp, BLEND: tl.constexpr, BLOCK: tl.constexpr):
    pix_blocks = (H * W + BLOCK - 1) // BLOCK  # axis 0 walks (batch, pixel block)
    b = (tl.program_id(0) // pix_blocks).to(tl.int64)
    pix = (tl.program_id(0) % pix_blocks) * BLOCK + tl.arange(0, BLOCK)
    valid = pix < H * W
    p00, p01, p10, p11, tx, ty, _, _, _, _ = _bilinear_taps(flow_ptr, b, pix, valid, fl_sb, fl_sc, fl_sp,
                                                            H, W, x_max, y_max)
    w00, w01, w10, w11 = _tap_weights(tx, ty)
    if BLEND:
        m = tl.load(mask_ptr + b * m_sb + pix * m_sp, mask=valid, other=0.0).to(tl.float32)
    for c in range(C):
        src = prev_ptr + b * pr_sb + c * pr_sc
        warped = (w00 * tl.load(src + p00 * pr_sp, mask=valid, other=0.0).to(tl.float32)
                  + w01 * tl.load(src + p01 * pr_sp, mask=valid, other=0.0).to(tl.float32)
                  + w10 * tl.load(src + p10 * pr_sp, mask=valid, other=0.0).to(tl.float32)
                  + w11 * tl.load(src + p11 * pr_sp, mask=valid, other=0.0).to(tl.float32))
        if BLEND:
            hall = tl.load(hall_ptr + b * ha_sb + c * ha_sc + pix * ha_sp, mask=valid, other=0.0)
            warped = (1.0 - m) * warped + m * hall.to(tl.float32)
        tl.store(out_ptr + b * o_sb + c * o_sc + pix * o_sp, warped.to(out_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _warp_bwd_kernel(prev_ptr, flow_ptr, mask_ptr, hall_ptr, grad_ptr,
                     dprev_ptr, dflow_ptr, dmask_ptr, dhall_ptr, C, H, W, x_max, y_max,
                     pr_sb, pr_sc, pr_sp, fl_sb, fl_sc, fl_sp, m_sb, m_sp, ha_sb, ha_sc, ha_sp,
                     g_sb, g_sc, g_sp, dp_sb, dp_sc, dp_sp, df_sb, df_sc, df_sp, dm_sb, dm_sp,
                     dh_sb, dh_sc, dh_sp,
                     BLEND: tl.constexpr, NEED_PREV: tl.constexpr, NEED_HALL: tl.constexpr,
                     BLOCK: tl.constexpr):
    pix_blocks = (H * W + BLOCK - 1) // BLOCK  # axis 0 walks (batch, pixel block)
    b = (tl.program_id(0) // pix_blocks).to(tl.int64)
    pix = (tl.program_id(0) % pix_blocks) * BLOCK + tl.arange(0, BLOCK)
    valid = pix < H * W
    p00, p01, p10, p11, tx, ty, has_x1, has_y1, inside_x, inside_y = _bilinear_taps(
        flow_ptr, b, pix, valid, fl_sb, fl_sc, fl_sp, H, W, x_max, y_max)
    w00, w01, w10, w11 = _tap_weights(tx, ty)
    if BLEND:
        m = tl.load(mask_ptr + b * m_sb + pix * m_sp, mask=valid, other=0.0).to(tl.float32)
    d_sx = tl.zeros([BLOCK], dtype=tl.float32)
    d_sy = tl.zeros([BLOCK], dtype=tl.float32)
    d_m = tl.zeros([BLOCK], dtype=tl.float32)
    for c in range(C):
        src = prev_ptr + b * pr_sb + c * pr_sc
        v00 = tl.load(src + p00 * pr_sp, mask=valid, other=0.0).to(tl.float32)
        v01 = tl.load(src + p01 * pr_sp, mask=valid, other=0.0).to(tl.float32)
        v10 = tl.load(src + p10 * pr_sp, mask=valid, other=0.0).to(tl.float32)
        v11 = tl.load(src + p11 * pr_sp, mask=valid, other=0.0).to(tl.float32)
        grad = tl.load(grad_ptr + b * g_sb + c * g_sc + pix * g_sp, mask=valid, other=0.0).to(tl.float32)
        if BLEND:
            warped = w00 * v00 + w01 * v01 + w10 * v10 + w11 * v11
            hall = tl.load(hall_ptr + b * ha_sb + c * ha_sc + pix * ha_sp, mask=valid, other=0.0)
            d_m += grad * (hall.to(tl.float32) - warped)
            if NEED_HALL:
                tl.store(dhall_ptr + b * dh_sb + c * dh_sc + pix * dh_sp,
                         (grad * m).to(dhall_ptr.dtype.element_ty), mask=valid)
            grad = grad * (1.0 - m)
        d_sx += grad * ((1.0 - ty) * (v01 - v00) + ty * (v11 - v10))
        d_sy += grad * ((1.0 - tx) * (v10 - v00) + tx * (v11 - v01))
        if NEED_PREV:
            # several output pixels may sample one source pixel: accumulate with atomics (fp32 buffer)
            dst = dprev_ptr + b * dp_sb + c * dp_sc
            tl.atomic_add(dst + p00 * dp_sp, grad * w00, mask=valid)
            tl.atomic_add(dst + p01 * dp_sp, grad * w01, mask=valid & has_x1)
            tl.atomic_add(dst + p10 * dp_sp, grad * w10, mask=valid & has_y1)
            tl.atomic_add(dst + p11 * dp_sp, grad * w11, mask=valid & has_x1 & has_y1)
    flow_out = dflow_ptr + b * df_sb + pix * df_sp
    d_sx = tl.where(inside_x, d_sx, 0.0)
    d_sy = tl.where(inside_y, d_sy, 0.0)
    tl.store(flow_out, d_sx.to(dflow_ptr.dtype.element_ty), mask=valid)
    tl.store(flow_out + df_sc, d_sy.to(dflow_ptr.dtype.element_ty), mask=valid)
    if BLEND:
        tl.store(dmask_ptr + b * dm_sb + pix * dm_sp, d_m.to(dmask_ptr.dtype.element_ty), mask=valid)


# ----------------------------------------------------------------------------- launchers

def _block():
    return 4096 if _dispatch.INTERPRET else 256


def _bsp(t):
    """(batch, channel, pixel) strides."""
    return t.stride(0), t.stride(1), _dispatch.pixel_stride(t)


def _empty(shape, dtype, like):
    return torch.empty(shape, dtype=dtype, device=like.device, memory_format=_dispatch.output_format(like))


def _forward(prev, flow, mask, hallucinated):
    B, C, H, W = prev.shape
    out = _empty(prev.shape, prev.dtype, prev)
    if out.numel() == 0:
        return out
    blend = mask is not None
    prev, flow = _dispatch.walkable(prev), _dispatch.walkable(flow)
    mask = _dispatch.walkable(mask) if blend else flow  # placeholders are never read
    hallucinated = _dispatch.walkable(hallucinated) if blend else prev
    block = _block()
    m_sb, _, m_sp = _bsp(mask)
    _warp_fwd_kernel[(B * triton.cdiv(H * W, block),)](
        prev, flow, mask, hallucinated, out, C, H, W, float(W - 1), float(H - 1),
        *_bsp(prev), *_bsp(flow), m_sb, m_sp, *_bsp(hallucinated), *_bsp(out),
        BLEND=blend, BLOCK=block)
    return out


def _backward(prev, flow, mask, hallucinated, grad_out, need_prev, need_hall):
    B, C, H, W = prev.shape
    blend = mask is not None
    need_hall = need_hall and blend
    d_prev = _empty(prev.shape, torch.float32, prev).zero_() if need_prev else None
    d_flow = _empty(flow.shape, flow.dtype, flow)
    d_mask = _empty(mask.shape, mask.dtype, mask) if blend else None
    d_hall = _empty(hallucinated.shape, hallucinated.dtype, hallucinated) if need_hall else None
    if prev.numel() == 0 or flow.numel() == 0:
        d_flow.zero_()
        if d_mask is not None:
            d_mask.zero_()
        return d_prev, d_flow, d_mask, d_hall
    prev, flow, grad_out = _dispatch.walkable(prev), _dispatch.walkable(flow), _dispatch.walkable(grad_out)
    mask = _dispatch.walkable(mask) if blend else flow  # placeholders are never touched
    hallucinated = _dispatch.walkable(hallucinated) if blend else prev
    d_prev_arg = d_prev if need_prev else d_flow
    d_mask_arg = d_mask if blend else d_flow
    d_hall_arg = d_hall if need_hall else d_flow
    block = _block()
    m_sb, _, m_sp = _bsp(mask)
    dm_sb, _, dm_sp = _bsp(d_mask_arg)
    _warp_bwd_kernel[(B * triton.cdiv(H * W, block),)](
        prev, flow, mask, hallucinated, grad_out, d_prev_arg, d_flow, d_mask_arg, d_hall_arg,
        C, H, W, float(W - 1), float(H - 1),
        *_bsp(prev), *_bsp(flow), m_sb, m_sp, *_bsp(hallucinated), *_bsp(grad_out),
        *_bsp(d_prev_arg), *_bsp(d_flow), dm_sb, dm_sp, *_bsp(d_hall_arg),
        BLEND=blend, NEED_PREV=need_prev, NEED_HALL=need_hall, BLOCK=block)
    if d_prev is not None:
        d_prev = d_prev.to(prev.dtype)
    return d_prev, d_flow, d_mask, d_hall


# ----------------------------------------------------------------------------- autograd

class WarpBlendFunction(torch.autograd.Function):
    """mask and hallucinated may both be None: then it is the plain warp."""

    @staticmethod
    def forward(ctx, prev, flow, mask, hallucinated):
        out = _forward(prev, flow, mask, hallucinated)
        ctx.save_for_backward(prev, flow, mask, hallucinated)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        prev, flow, mask, hallucinated = ctx.saved_tensors
        need = ctx.needs_input_grad
        try:
            d_prev, d_flow, d_mask, d_hall = _backward(prev, flow, mask, hallucinated, grad_out,
                                                       need_prev=need[0], need_hall=need[3])
        except Exception as err:
            if mask is None:
                return _dispatch.reference_backward("warp", err, warp_reference, (prev, flow), (grad_out,),
                                                    need[:2]) + (None, None)
            return _dispatch.reference_backward("warp_blend", err, warp_blend_reference,
                                                (prev, flow, mask, hallucinated), (grad_out,), need)
        return d_prev, (d_flow if need[1] else None), (d_mask if need[2] else None), d_hall


# ----------------------------------------------------------------------------- public functions

def _check_inputs(op, prev, flow, mask=None, hallucinated=None, blend=False):
    _dispatch.check_tensor(op, "prev", prev, 4)
    _dispatch.check_tensor(op, "flow", flow, 4)
    B, C, H, W = prev.shape
    if tuple(flow.shape) != (B, 2, H, W):
        raise ValueError(f"{op}: flow must have shape (B, 2, H, W) = {(B, 2, H, W)} for prev of shape "
                         f"{tuple(prev.shape)}, got {tuple(flow.shape)}")
    if blend:
        _dispatch.check_tensor(op, "mask", mask, 4)
        _dispatch.check_tensor(op, "hallucinated", hallucinated, 4)
        if tuple(mask.shape) != (B, 1, H, W):
            raise ValueError(f"{op}: mask must have shape (B, 1, H, W) = {(B, 1, H, W)} for prev of shape "
                             f"{tuple(prev.shape)}, got {tuple(mask.shape)}")
        if tuple(hallucinated.shape) != tuple(prev.shape):
            raise ValueError(f"{op}: hallucinated must have the shape of prev {tuple(prev.shape)}, "
                             f"got {tuple(hallucinated.shape)}")
        if hallucinated.dtype != prev.dtype:
            raise TypeError(f"{op}: hallucinated must have prev's dtype {prev.dtype}, got {hallucinated.dtype}")
    _dispatch.check_same_device(op, prev=prev, flow=flow, mask=mask, hallucinated=hallucinated)


def warp(prev, flow):
    """Bilinear backward warp: out[:, :, y, x] = prev sampled at (x + flow[:, 0], y + flow[:, 1]),
    align_corners=True, border padding. prev (B, C, H, W), flow (B, 2, H, W) in pixels."""
    op = "warp"
    _check_inputs(op, prev, flow)
    if _dispatch.use_triton(op, prev, flow):
        try:
            return WarpBlendFunction.apply(prev, flow, None, None)
        except Exception as err:
            _dispatch.triton_failed(op, err)
    return warp_reference(prev, flow)


def warp_blend(prev, flow, mask, hallucinated):
    """(1 - mask) * warp(prev, flow) + mask * hallucinated in one pass. prev and hallucinated
    (B, C, H, W) of one dtype, flow (B, 2, H, W) in pixels, mask (B, 1, H, W); returns prev's dtype."""
    op = "warp_blend"
    _check_inputs(op, prev, flow, mask, hallucinated, blend=True)
    if _dispatch.use_triton(op, prev, flow, mask, hallucinated):
        try:
            return WarpBlendFunction.apply(prev, flow, mask, hallucinated)
        except Exception as err:
            _dispatch.triton_failed(op, err)
    return warp_blend_reference(prev, flow, mask, hallucinated)
