"""Fused ConvLSTM cell: gate pre-activations -> new cell state c (fp32) and hidden state h, one pass.

gates is the output of the cell's convolution, (B, 4C, H, W), holding the pre-activations of the
input, forget, cell and output gates as four consecutive chunks of C channels (i, f, g, o):

    c = sigmoid(f) * c_prev + sigmoid(i) * tanh(g)
    h = sigmoid(o) * tanh(c)

c is kept in float32 whatever the gates' dtype (float64 for float64 gates) because it integrates
over thousands of rollout steps; h comes back in the gates' dtype. The backward recomputes the gate
activations from the saved inputs instead of storing them.
"""

import torch

from . import _dispatch
from ._dispatch import tl, triton


# ----------------------------------------------------------------------------- reference (spec, CPU path)

def convlstm_cell_reference(gates, c_prev):
    dtype = _dispatch.opmath_dtype(gates.dtype)
    i, f, g, o = gates.to(dtype).chunk(4, dim=1)
    c = torch.sigmoid(f) * c_prev.to(dtype) + torch.sigmoid(i) * torch.tanh(g)
    h = torch.sigmoid(o) * torch.tanh(c)
    return h.to(gates.dtype), c


# ----------------------------------------------------------------------------- Triton kernels
# One program owns a (BLOCK_P pixels) x (BLOCK_C channels) tile of one batch element. Every tensor is
# addressed as base + b * s_b + channel * s_c + pixel * s_p, which covers contiguous, channels-last
# and strided inputs; Triton specialises unit strides, so the unit-stride axis is vectorised.

@triton.jit
def _tanh(x):
    # tanh through the logistic function: no overflow for large |x|, and the interpreter has it too
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _tile_gates(gates_ptr, c_prev_ptr, C, HW, g_sb, g_sc, g_sp, p_sb, p_sc, p_sp,
                BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's tile: batch index, pixels, channels, mask, the four gate activations and c_prev
    in fp32 (shared by the forward and the backward, which recomputes them)."""
    # axis 0 walks (batch, pixel block): no 65535 limit on the batch
    pix_blocks = (HW + BLOCK_P - 1) // BLOCK_P
    b = (tl.program_id(0) // pix_blocks).to(tl.int64)
    pix = (tl.program_id(0) % pix_blocks) * BLOCK_P + tl.arange(0, BLOCK_P)
    ch = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (pix[:, None] < HW) & (ch[None, :] < C)
    g_off = b * g_sb + ch[None, :] * g_sc + pix[:, None] * g_sp
    chunk = C * g_sc
    i = tl.sigmoid(tl.load(gates_ptr + g_off, mask=mask, other=0.0).to(tl.float32))
    f = tl.sigmoid(tl.load(gates_ptr + g_off + chunk, mask=mask, other=0.0).to(tl.float32))
    g = _tanh(tl.load(gates_ptr + g_off + 2 * chunk, mask=mask, other=0.0).to(tl.float32))
    o = tl.sigmoid(tl.load(gates_ptr + g_off + 3 * chunk, mask=mask, other=0.0).to(tl.float32))
    c_prev = tl.load(c_prev_ptr + b * p_sb + ch[None, :] * p_sc + pix[:, None] * p_sp,
                     mask=mask, other=0.0).to(tl.float32)
    return b, pix, ch, mask, i, f, g, o, c_prev


@triton.jit
def _convlstm_fwd_kernel(gates_ptr, c_prev_ptr, h_ptr, c_ptr, C, HW,
                         g_sb, g_sc, g_sp, p_sb, p_sc, p_sp, o_sb, o_sc, o_sp,
                         BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    b, pix, ch, mask, i, f, g, o, c_prev = _tile_gates(gates_ptr, c_prev_ptr, C, HW, g_sb, g_sc, g_sp,
                                                       p_sb, p_sc, p_sp, BLOCK_P, BLOCK_C)
    c = f * c_prev + i * g
    h = o * _tanh(c)
    o_off = b * o_sb + ch[None, :] * o_sc + pix[:, None] * o_sp
    tl.store(c_ptr + o_off, c, mask=mask)
    tl.store(h_ptr + o_off, h.to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _convlstm_bwd_kernel(gates_ptr, c_prev_ptr, dh_ptr, dc_ptr, dgates_ptr, dc_prev_ptr, C, HW,
                         g_sb, g_sc, g_sp, p_sb, p_sc, p_sp, dh_sb, dh_sc, dh_sp, dc_sb, dc_sc, dc_sp,
                         dg_sb, dg_sc, dg_sp, dp_sb, dp_sc, dp_sp,
                         HAS_DH: tl.constexpr, HAS_DC: tl.constexpr, NEED_DC_PREV: tl.constexpr,
                         BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    b, pix, ch, mask, i, f, g, o, c_prev = _tile_gates(gates_ptr, c_prev_ptr, C, HW, g_sb, g_sc, g_sp,
                                                       p_sb, p_sc, p_sp, BLOCK_P, BLOCK_C)
    tanh_c = _tanh(f * c_prev + i * g)

    # gradient reaching c: from the caller (dc) and through h = o * tanh(c)
    dc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    do = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    if HAS_DC:
        dc += tl.load(dc_ptr + b * dc_sb + ch[None, :] * dc_sc + pix[:, None] * dc_sp,
                      mask=mask, other=0.0).to(tl.float32)
    if HAS_DH:
        dh = tl.load(dh_ptr + b * dh_sb + ch[None, :] * dh_sc + pix[:, None] * dh_sp,
                     mask=mask, other=0.0).to(tl.float32)
        do = dh * tanh_c * o * (1.0 - o)
        dc += dh * o * (1.0 - tanh_c * tanh_c)
    di = dc * g * i * (1.0 - i)
    df = dc * c_prev * f * (1.0 - f)
    dg = dc * i * (1.0 - g * g)

    dg_off = b * dg_sb + ch[None, :] * dg_sc + pix[:, None] * dg_sp
    dchunk = C * dg_sc
    out_ty = dgates_ptr.dtype.element_ty
    tl.store(dgates_ptr + dg_off, di.to(out_ty), mask=mask)
    tl.store(dgates_ptr + dg_off + dchunk, df.to(out_ty), mask=mask)
    tl.store(dgates_ptr + dg_off + 2 * dchunk, dg.to(out_ty), mask=mask)
    tl.store(dgates_ptr + dg_off + 3 * dchunk, do.to(out_ty), mask=mask)
    if NEED_DC_PREV:
        tl.store(dc_prev_ptr + b * dp_sb + ch[None, :] * dp_sc + pix[:, None] * dp_sp,
                 (dc * f).to(dc_prev_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launchers

def _strides(t):
    return t.stride(0), t.stride(1), _dispatch.pixel_stride(t)


def _launch_grid(gates, C, HW, fmt):
    block_p, block_c = _dispatch.tile_shape(HW, C, channels_inner=fmt == torch.channels_last)
    return (gates.shape[0] * triton.cdiv(HW, block_p), triton.cdiv(C, block_c)), block_p, block_c


def _forward(gates, c_prev):
    B, C4, H, W = gates.shape
    C, HW = C4 // 4, H * W
    fmt = _dispatch.output_format(gates)
    h = torch.empty((B, C, H, W), dtype=gates.dtype, device=gates.device, memory_format=fmt)
    c = torch.empty((B, C, H, W), dtype=_dispatch.opmath_dtype(gates.dtype), device=gates.device,
                    memory_format=fmt)
    if h.numel() == 0:
        return h, c
    gates, c_prev = _dispatch.walkable(gates), _dispatch.walkable(c_prev)
    grid, block_p, block_c = _launch_grid(gates, C, HW, fmt)
    _convlstm_fwd_kernel[grid](gates, c_prev, h, c, C, HW, *_strides(gates), *_strides(c_prev),
                               *_strides(h), BLOCK_P=block_p, BLOCK_C=block_c)
    return h, c


def _backward(gates, c_prev, dh, dc, need_dc_prev):
    B, C4, H, W = gates.shape
    C, HW = C4 // 4, H * W
    fmt = _dispatch.output_format(gates)
    dgates = torch.empty(gates.shape, dtype=gates.dtype, device=gates.device, memory_format=fmt)
    dc_prev = (torch.empty(c_prev.shape, dtype=c_prev.dtype, device=c_prev.device, memory_format=fmt)
               if need_dc_prev else None)
    if dgates.numel() == 0:
        return dgates, dc_prev
    gates, c_prev = _dispatch.walkable(gates), _dispatch.walkable(c_prev)
    dh_arg = _dispatch.walkable(dh) if dh is not None else gates  # placeholder pointer, never read
    dc_arg = _dispatch.walkable(dc) if dc is not None else c_prev
    dc_prev_arg = dc_prev if need_dc_prev else dgates  # placeholder pointer, never written
    grid, block_p, block_c = _launch_grid(gates, C, HW, fmt)
    _convlstm_bwd_kernel[grid](gates, c_prev, dh_arg, dc_arg, dgates, dc_prev_arg, C, HW,
                               *_strides(gates), *_strides(c_prev), *_strides(dh_arg), *_strides(dc_arg),
                               *_strides(dgates), *_strides(dc_prev_arg),
                               HAS_DH=dh is not None, HAS_DC=dc is not None, NEED_DC_PREV=need_dc_prev,
                               BLOCK_P=block_p, BLOCK_C=block_c)
    return dgates, dc_prev


# ----------------------------------------------------------------------------- autograd

class ConvLSTMCellFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gates, c_prev):
        h, c = _forward(gates, c_prev)
        ctx.save_for_backward(gates, c_prev)
        ctx.set_materialize_grads(False)
        return h, c

    @staticmethod
    def backward(ctx, dh, dc):
        gates, c_prev = ctx.saved_tensors
        if dh is None and dc is None:
            return None, None
        try:
            return _backward(gates, c_prev, dh, dc, need_dc_prev=ctx.needs_input_grad[1])
        except Exception as err:
            return _dispatch.reference_backward("convlstm_cell", err, convlstm_cell_reference, (gates, c_prev),
                                                (dh, dc), ctx.needs_input_grad)


# ----------------------------------------------------------------------------- public function

def convlstm_cell(gates, c_prev):
    """ConvLSTM state update. gates (B, 4C, H, W) = pre-activations i, f, g, o along channels;
    c_prev (B, C, H, W). Returns h (B, C, H, W) in the gates' dtype and c (B, C, H, W) in float32
    (float64 for float64 gates), both in the gates' memory format (contiguous or channels-last)."""
    op = "convlstm_cell"
    _dispatch.check_tensor(op, "gates", gates, 4)
    _dispatch.check_tensor(op, "c_prev", c_prev, 4)
    _dispatch.check_same_device(op, gates=gates, c_prev=c_prev)
    B, C4, H, W = gates.shape
    if C4 % 4 != 0:
        raise ValueError(f"{op}: gates must have 4*C channels (i, f, g, o), got shape {tuple(gates.shape)}")
    expected = (B, C4 // 4, H, W)
    if tuple(c_prev.shape) != expected:
        raise ValueError(f"{op}: c_prev must have shape (B, C, H, W) = {expected} for gates of shape "
                         f"{tuple(gates.shape)}, got {tuple(c_prev.shape)}")
    if _dispatch.use_triton(op, gates, c_prev):
        try:
            return ConvLSTMCellFunction.apply(gates, c_prev)
        except Exception as err:
            _dispatch.triton_failed(op, err)
    return convlstm_cell_reference(gates, c_prev)
