"""The structure generator's network (SPEC section 3; paper tables B-E): SVG-extend on label maps.

    h_t, skips_t = encoder(s_t)                       h_t: h_channels x 8 x 8 (8 x 16 at 128x256)
    mu_q, logvar_q = posterior(h_t)                   ConvLSTM, then a 3x3 conv to (mu, log-variance)
    mu_p, logvar_p = prior(h_{t-1})
    g_t = predictor([h_{t-1}, z_t])                   ConvLSTM x2, then 3x3 conv + ReLU
    log p(s_t) = decoder(g_t, skips)                  mirrors the encoder, log-softmax over classes

Variants (paper section 5): svg (the model above), lstm (no latent), cnn (no latent, no recurrence:
the predictor's ConvLSTMs become plain convolutions), soft (the softmax, not the argmax one-hot, is fed
back at inference), rgb (the same network on RGB frames in [-1, 1], tanh output, L2/L1 loss).
Not in the paper, off by default: the warp path (`warp`), log p(s_t) = log[m * warp(s_{t-1}, flow(g_t, z_t))
+ (1 - m) * decoder], the flow predicted per latent cell and m by one extra decoder channel, so that z
can move a boundary directly (docs/cpu_structure_runs.md, session 15).

Two ways to run it:
- `forward(frames, n_past)`: teacher forcing over a whole clip (training, validation).
- the step API for rollout, fixed shapes and constant memory whatever the horizon:
      state = model.init_state(batch, samples)          # zeros; batch*samples rollouts
      model.observe(state, frame_t)                     # each context frame, z from the posterior
      index_t = model.step(state, generator)            # each future frame, z from the prior
  `observe` and `step` update the state's tensors in place (copy_), so the state is a fixed set of
  buffers: nothing grows, and the step is capturable in a CUDA graph. `stream` / `generate` drive it.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels

VARIANTS = ("svg", "lstm", "cnn", "soft", "rgb")
SKIP_MODES = ("previous", "last_context")
WARP_EPS = 1e-3  # floor of the warp path's class probabilities: a wrongly warped pixel costs at most -log(eps)
STOCHASTIC = ("svg", "soft", "rgb")


def paper_blocks(size, width_mult: float = 1.0) -> list[tuple[int, int]]:
    """Encoder blocks (width, convs) of tables B/E: 64x2, 128x2, 256x3 at 64x64; one 512x3 block more per
    doubling of the resolution (the release's Encoder128/256), so that h_t stays 8 x 8."""
    pools = pool_count(size)
    widths = [64, 128, 256] + [512] * max(0, pools - 3)
    convs = [2, 2, 3] + [3] * max(0, pools - 3)
    return [(max(1, round(w * width_mult)), n) for w, n in zip(widths[:pools], convs[:pools])]


def pool_count(size) -> int:
    """Number of 2x poolings that bring the shorter side to 8."""
    height, width = size
    short = min(height, width)
    pools = round(math.log2(short / 8)) if short >= 16 else 0
    if pools < 1 or 8 * 2**pools != short or height % 2**pools or width % 2**pools:
        raise ValueError(f"frame size {height}x{width}: the shorter side must be 8 * 2^k (k >= 1) and both sides "
                         f"divisible by 2^k, so that the latent map is 8 on its shorter side")
    return pools


def conv3x3(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, padding=1)


# ----------------------------------------------------------------------------- encoder / decoder

class Encoder(nn.Module):
    """[3x3 conv, ReLU] x convs per block, 2x2 max-pool after each of the first `pools` blocks (a block
    past them stays at the latent resolution, as in the release's 128x256 model), then 3x3 conv to h, ReLU."""

    def __init__(self, in_channels: int, blocks, pools: int, h_channels: int):
        super().__init__()
        if len(blocks) not in (pools, pools + 1):
            raise ValueError(f"structure.encoder_blocks: {len(blocks)} blocks for {pools} 2x poolings (frame size to "
                             f"latent 8): need {pools} or {pools + 1}")
        self.pooled = [i < pools for i in range(len(blocks))]
        self.blocks = nn.ModuleList()
        cin = in_channels
        for width, convs in blocks:
            self.blocks.append(nn.ModuleList([conv3x3(cin if j == 0 else width, width) for j in range(convs)]))
            cin = width
        self.to_h = conv3x3(cin, h_channels)

    def forward(self, x: torch.Tensor, first_conv_out: torch.Tensor | None = None):
        """x (B, Cin, H, W) float; or first_conv_out, the first conv already applied (pre-ReLU) by the
        one-hot gather kernel at inference. Returns h (B, h_channels, h, w) and the skips, finest first."""
        skips = []
        for i, block in enumerate(self.blocks):
            for j, conv in enumerate(block):
                x = F.relu(first_conv_out if (i == 0 and j == 0 and first_conv_out is not None) else conv(x))
            skips.append(x)
            if self.pooled[i]:
                x = F.max_pool2d(x, 2)
        return F.relu(self.to_h(x)), skips

    @property
    def first_conv(self) -> nn.Conv2d:
        return self.blocks[0][0]


class Decoder(nn.Module):
    """Mirror of the encoder (table E): per block, coarsest first, 2x nearest upsampling (where the encoder
    pooled), concatenation with the block's skip, then its convs; the last conv of a block outputs the next
    finer block's width, and the finest block's last conv outputs the frame channels (no activation)."""

    def __init__(self, h_channels: int, blocks, pooled, out_channels: int):
        super().__init__()
        self.upsample = list(reversed(pooled))
        self.blocks = nn.ModuleList()
        cin = h_channels
        for level in reversed(range(len(blocks))):
            width, convs = blocks[level]
            last_out = blocks[level - 1][0] if level > 0 else out_channels
            outs = [width] * (convs - 1) + [last_out]
            ins = [cin + width] + outs[:-1]
            self.blocks.append(nn.ModuleList([conv3x3(a, b) for a, b in zip(ins, outs)]))
            cin = last_out

    def forward(self, g: torch.Tensor, skips) -> torch.Tensor:
        x = g
        n_blocks = len(self.blocks)
        for k, block in enumerate(self.blocks):
            if self.upsample[k]:
                x = F.interpolate(x, scale_factor=2, mode="nearest")
            x = torch.cat([x, skips[n_blocks - 1 - k].to(x.dtype)], 1)
            for j, conv in enumerate(block):
                x = conv(x)
                if not (k == n_blocks - 1 and j == len(block) - 1):
                    x = F.relu(x)
        return x


# ----------------------------------------------------------------------------- recurrent parts

class ConvLSTM(nn.Module):
    """Stacked 3x3 ConvLSTM cells; one conv over [input, h] gives the i, f, g, o pre-activations, and
    kernels.convlstm_cell turns them into the new (h, c) with c in fp32."""

    def __init__(self, in_channels: int, width: int, layers: int):
        super().__init__()
        self.width = width
        self.convs = nn.ModuleList([conv3x3((in_channels if i == 0 else width) + width, 4 * width)
                                    for i in range(layers)])

    def zero_state(self, batch: int, height: int, width: int, device, memory_format=torch.contiguous_format):
        return [(torch.zeros(batch, self.width, height, width, device=device).contiguous(memory_format=memory_format),
                 torch.zeros(batch, self.width, height, width, device=device).contiguous(memory_format=memory_format))
                for _ in self.convs]

    def forward(self, x: torch.Tensor, state):
        new_state = []
        for conv, (h, c) in zip(self.convs, state):
            gates = conv(torch.cat([x, h.to(x.dtype)], 1))
            h, c = kernels.convlstm_cell(gates, c)
            new_state.append((h, c))
            x = h
        return x, new_state


class ConvStack(nn.Module):
    """The `cnn` ablation's predictor: the ConvLSTMs replaced by stateless 3x3 conv + ReLU layers."""

    def __init__(self, in_channels: int, width: int, layers: int):
        super().__init__()
        self.convs = nn.ModuleList([conv3x3(in_channels if i == 0 else width, width) for i in range(layers)])

    def forward(self, x: torch.Tensor, state=None):
        for conv in self.convs:
            x = F.relu(conv(x))
        return x, state


class GaussianLSTM(nn.Module):
    """Posterior / prior (table C): ConvLSTM, then one 3x3 conv to 2 * z channels = (mu, log-variance)."""

    def __init__(self, in_channels: int, width: int, layers: int, z_channels: int):
        super().__init__()
        self.lstm = ConvLSTM(in_channels, width, layers)
        self.to_stats = conv3x3(width, 2 * z_channels)

    def forward(self, x, state):
        out, state = self.lstm(x, state)
        mu, logvar = self.to_stats(out).float().chunk(2, 1)
        return mu, logvar, state


def gaussian_kl(mu_q, logvar_q, mu_p, logvar_p) -> torch.Tensor:
    """KL(N(mu_q, var_q) || N(mu_p, var_p)) summed over latent elements, per batch item (B,)."""
    kl = 0.5 * (logvar_p - logvar_q) + (logvar_q.exp() + (mu_q - mu_p) ** 2) / (2 * logvar_p.exp()) - 0.5
    return kl.flatten(1).sum(1)


# ----------------------------------------------------------------------------- rollout state

class RolloutState:
    """Fixed buffers of `batch * samples` rollouts (row b * samples + s is sample s of clip b).
    observe() and step() only copy_ into these tensors, so memory never grows."""

    def __init__(self, batch: int, samples: int):
        self.batch, self.samples = batch, samples
        self.observed = 0          # context frames seen; the first one only sets code and skips
        self.code = None           # h_{t-1}: encoding of the last (observed or predicted) frame
        self.skips = None          # decoder skips
        self.lstm = {}             # name -> [(h, c), ...]
        self.noise = None          # z buffer, refilled in place from the generator
        self.frame = None          # the last frame's uint8 labels: what the warp path warps

    @property
    def rows(self) -> int:
        return self.batch * self.samples

    def tensors(self) -> list[torch.Tensor]:
        out = [self.code, *self.skips, self.noise, self.frame]
        for layers in self.lstm.values():
            for h, c in layers:
                out += [h, c]
        return [t for t in out if t is not None]


def _assign(buffers, values):
    for buffer, value in zip(buffers, values):
        buffer.copy_(value)


# ----------------------------------------------------------------------------- the model

class StructureModel(nn.Module):
    def __init__(self, *, variant: str, num_classes: int, size, blocks, h_channels: int, z_channels: int,
                 lstm_width: int, posterior_layers: int, predictor_layers: int, skip: str, warp: bool = False):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"structure.variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
        if skip not in SKIP_MODES:
            raise ValueError(f"structure.skip must be one of {', '.join(SKIP_MODES)}, got {skip!r}")
        if warp and variant not in ("svg", "lstm", "cnn"):
            raise ValueError(f"structure.warp needs label maps fed back as argmax (variant svg, lstm or cnn), got {variant!r}")
        self.variant, self.num_classes, self.size, self.skip = variant, num_classes, tuple(size), skip
        self.warp = warp
        self.stochastic = variant in STOCHASTIC
        self.channels = 3 if variant == "rgb" else num_classes
        pools = pool_count(size)
        self.latent_size = (size[0] // 2**pools, size[1] // 2**pools)
        self.h_channels, self.z_channels = h_channels, z_channels
        self.encoder = Encoder(self.channels, blocks, pools, h_channels)
        # warp: one channel more, the logit of the mixture weight between warp and decoder
        self.decoder = Decoder(h_channels, blocks, self.encoder.pooled, self.channels + int(warp))
        if self.stochastic:
            self.posterior = GaussianLSTM(h_channels, lstm_width, posterior_layers, z_channels)
            self.prior = GaussianLSTM(h_channels, lstm_width, posterior_layers, z_channels)
        predictor_in = h_channels + (z_channels if self.stochastic else 0)
        if variant == "cnn":
            self.predictor = ConvStack(predictor_in, lstm_width, predictor_layers)
        else:
            self.predictor = ConvLSTM(predictor_in, lstm_width, predictor_layers)
        self.to_g = conv3x3(lstm_width, h_channels)
        if warp:
            # flow at the latent resolution from [g, z]: z decides, per 8x8 cell, whether a boundary moves this
            # step. Zero at the start: the warp path begins as the copy of the previous frame.
            self.to_flow = conv3x3(h_channels + (z_channels if self.stochastic else 0), 2)
            nn.init.zeros_(self.to_flow.weight)
            nn.init.zeros_(self.to_flow.bias)
            # class ids to compare labels with (the warp path's one-hot), made once, not in every rollout step
            self.register_buffer("class_ids", torch.arange(num_classes).view(1, -1, 1, 1), persistent=False)
        self.memory_format = torch.contiguous_format

    # ------------------------------------------------------------------ frames in and out

    def encode_frames(self, frames: torch.Tensor):
        """Encoder on true frames: uint8 label indices (B, H, W) go through kernels.onehot_conv3x3 (the first
        conv as a gather, no one-hot; an index >= N such as 255 "void" is an all-zero pixel); uint8 RGB
        (B, 3, H, W) is scaled to [-1, 1]. Returns h_t and the skips."""
        if self.variant == "rgb":
            return self.encoder((frames.float() / 127.5 - 1).contiguous(memory_format=self.memory_format))
        conv = self.encoder.first_conv
        first = kernels.onehot_conv3x3(frames, conv.weight, conv.bias, memory_format=self.memory_format)
        return self.encoder(None, first_conv_out=first)

    def predict_g(self, code, z, state):
        x = code if z is None else torch.cat([code, z.to(code.dtype)], 1)
        out, state = self.predictor(x, state)
        return F.relu(self.to_g(out)), state

    def output(self, raw: torch.Tensor, motion=None) -> torch.Tensor:
        """Decoder output -> log-probabilities over classes (fp32), or RGB in [-1, 1]. With the warp path,
        motion = (previous frame's uint8 labels, flow from motion()): a mixture, per pixel, of the previous
        frame warped by the flow and the decoder's distribution, weighted by the decoder's extra channel."""
        if self.variant == "rgb":
            return torch.tanh(raw.float())
        if not self.warp:
            return F.log_softmax(raw.float(), 1)
        previous, flow = motion
        logits, mix = raw.float().split([self.num_classes, 1], 1)
        # a comparison, not F.one_hot (which checks the range on the host: a sync in the rollout's hot loop);
        # void (>= N) is an all-zero pixel
        onehot = (previous.unsqueeze(1).long() == self.class_ids).float()
        flow = F.interpolate(flow.float(), size=self.size, mode="bilinear", align_corners=False)
        warped = kernels.warp(onehot, flow)   # bilinear weights of a one-hot: >= 0 already
        log_warped = torch.log(warped + WARP_EPS) - math.log1p(self.num_classes * WARP_EPS)
        return torch.logaddexp(F.logsigmoid(mix) + log_warped, F.logsigmoid(-mix) + F.log_softmax(logits, 1))

    def motion(self, g: torch.Tensor, z) -> torch.Tensor:
        """The warp path's flow (B, 2, h, w) in full-resolution pixels at the latent resolution."""
        return self.to_flow(g if z is None else torch.cat([g, z.to(g.dtype)], 1))

    # ------------------------------------------------------------------ teacher forcing

    def forward(self, frames: torch.Tensor, n_past: int, generator: torch.Generator | None = None,
                feedback: float = 0.0) -> dict:
        """Teacher-forced pass over a clip. frames: uint8 labels (B, T, H, W) or RGB (B, T, 3, H, W).
        Targets are frames 1..T-1, each predicted from the frames before it with z from the posterior of the
        true target. With `feedback` > 0 (scheduled sampling), each future input frame (index >= n_past) is,
        with that probability per clip, the model's own detached prediction of it fed back as at rollout
        (argmax, softmax or RGB): the model then learns to go on from its own outputs, not only from true
        frames. Returns out (B, T-1, C, H, W) log-probabilities (or RGB) and kl (B, T-1), zero without a latent,
        and kl_prior / kl_posterior, the same values with gradients to one side only."""
        batch, length = frames.shape[:2]
        codes, skips = self.encode_frames(frames.flatten(0, 1))
        codes = codes.view(batch, length, *codes.shape[1:])
        skips = [s.view(batch, length, *s.shape[1:]) for s in skips]
        latent_h, latent_w = self.latent_size
        device = codes.device
        if self.stochastic:
            post_state = self.posterior.lstm.zero_state(batch, latent_h, latent_w, device, self.memory_format)
            prior_state = self.prior.lstm.zero_state(batch, latent_h, latent_w, device, self.memory_format)
        pred_state = (self.predictor.zero_state(batch, latent_h, latent_w, device, self.memory_format)
                      if self.variant != "cnn" else None)
        # skip source for target t: frame t-1, or frozen at the last context frame past the context
        sources = [min(t, n_past - 1) if self.skip == "last_context" else t for t in range(length - 1)]
        fed_back = feedback > 0 and length - 1 > n_past
        in_code, in_skips = codes[:, 0], [s[:, 0] for s in skips]   # the input frame of the current step
        in_frame = frames[:, 0]
        gs, flows, outs, kls, kls_prior, kls_posterior = [], [], [], [], [], []
        all_at_once = self.variant == "cnn" and not fed_back  # no recurrence and only true inputs
        if all_at_once:
            g, _ = self.predict_g(codes[:, :-1].flatten(0, 1), None, None)
            gs = list(g.view(batch, length - 1, *g.shape[1:]).unbind(1))
            if self.warp:
                flows = list(self.motion(g, None).view(batch, length - 1, 2, *g.shape[2:]).unbind(1))
        for t in range(1, 1 if all_at_once else length):
            z = None
            if self.stochastic:
                mu_q, logvar_q, post_state = self.posterior(codes[:, t], post_state)
                mu_p, logvar_p, prior_state = self.prior(in_code, prior_state)
                noise = torch.randn(mu_q.shape, generator=generator, device=device)
                z = mu_q + noise * (0.5 * logvar_q).exp()
                kls.append(gaussian_kl(mu_q, logvar_q, mu_p, logvar_p))
                # the same value with gradients to one side only (KL balancing)
                kls_prior.append(gaussian_kl(mu_q.detach(), logvar_q.detach(), mu_p, logvar_p))
                kls_posterior.append(gaussian_kl(mu_q, logvar_q, mu_p.detach(), logvar_p.detach()))
            g, pred_state = self.predict_g(in_code, z, pred_state)
            flow = self.motion(g, z) if self.warp else None
            if not fed_back:  # decoded all at once after the loop
                gs.append(g)
                flows.append(flow)
                in_code = codes[:, t]
                continue
            source = sources[t - 1]
            step_skips = in_skips if source == t - 1 else [s[:, source] for s in skips]
            raw = self.decoder(g, step_skips).float()
            out_t = self.output(raw, (in_frame, flow) if self.warp else None)
            outs.append(out_t)
            in_code, in_skips, in_frame = codes[:, t], [s[:, t] for s in skips], frames[:, t]
            if n_past <= t < length - 1:
                own_frame, own_x = self.fed_back((out_t if self.warp else raw).detach())
                own_code, own_skips = self.encode_input(own_frame, own_x)
                use = (torch.rand(batch, generator=generator, device=device) < feedback).view(batch, 1, 1, 1)
                in_code = torch.where(use, own_code.to(in_code.dtype), in_code)
                in_skips = [torch.where(use, own.to(true.dtype), true) for own, true in zip(own_skips, in_skips)]
                if self.warp:
                    in_frame = torch.where(use[:, 0], own_frame, in_frame)
        if fed_back:
            out = torch.stack(outs, 1)
        else:
            g = torch.stack(gs, 1).flatten(0, 1)
            picked = [s[:, sources].flatten(0, 1) for s in skips]
            motion = (frames[:, :-1].flatten(0, 1), torch.stack(flows, 1).flatten(0, 1)) if self.warp else None
            out = self.output(self.decoder(g, picked), motion)
            out = out.view(batch, length - 1, *out.shape[1:])
        zeros = torch.zeros(batch, length - 1, device=device)
        stack = lambda values: torch.stack(values, 1) if values else zeros  # noqa: E731
        return {"out": out, "kl": stack(kls), "kl_prior": stack(kls_prior), "kl_posterior": stack(kls_posterior)}

    def fed_back(self, raw: torch.Tensor):
        """What a prediction feeds back, from the decoder's fp32 output (with the warp path: from output()'s
        log-probabilities, whose argmax is the prediction): (frames, None) with the argmax indices
        (svg, lstm, cnn; uint8), or (None, x) with the softmax (soft) or the RGB frame in [-1, 1] (rgb).
        The rollout step and scheduled sampling in training both use it; encode_input() encodes it."""
        if self.variant == "rgb":
            return None, torch.tanh(raw)
        if self.variant == "soft":
            return None, torch.softmax(raw, 1)
        index, _ = kernels.argmax_onehot(raw, with_onehot=False)
        return index, None

    def encode_input(self, frames: torch.Tensor | None = None, x: torch.Tensor | None = None):
        """Encoder on uint8 frames (labels or RGB, as encode_frames) or on a float input x (softmax, RGB)."""
        if frames is not None:
            return self.encode_frames(frames)
        return self.encoder(x.contiguous(memory_format=self.memory_format))

    # ------------------------------------------------------------------ step API (rollout)

    def to_channels_last(self) -> "StructureModel":
        """Channels-last weights, and activations and rollout state buffers to match (memory_format): faster
        convolutions on GPU and, through oneDNN, on CPU."""
        self.memory_format = torch.channels_last
        return self.to(memory_format=torch.channels_last)

    def for_rollout(self, channels_last: bool = True) -> "StructureModel":
        """eval() and, on request, to_channels_last()."""
        self.eval()
        return self.to_channels_last() if channels_last else self

    @torch.inference_mode()
    def init_state(self, batch: int, samples: int = 1, device=None) -> RolloutState:
        device = device or next(self.parameters()).device
        state = RolloutState(batch, samples)
        rows, (latent_h, latent_w) = state.rows, self.latent_size
        fmt = self.memory_format
        if self.stochastic:
            state.lstm["posterior"] = self.posterior.lstm.zero_state(rows, latent_h, latent_w, device, fmt)
            state.lstm["prior"] = self.prior.lstm.zero_state(rows, latent_h, latent_w, device, fmt)
            # contiguous whatever the format: normal_ fills memory in order, so the draws stay the same
            state.noise = torch.zeros(rows, self.z_channels, latent_h, latent_w, device=device)
        if self.variant != "cnn":
            state.lstm["predictor"] = self.predictor.zero_state(rows, latent_h, latent_w, device, fmt)
        state.code = torch.zeros(rows, self.h_channels, latent_h, latent_w, device=device).contiguous(memory_format=fmt)
        if self.warp:
            state.frame = torch.zeros(rows, *self.size, dtype=torch.uint8, device=device)
        state.skips = [torch.zeros(rows, block[-1].out_channels, self.size[0] // 2**i, self.size[1] // 2**i,
                                   device=device).contiguous(memory_format=fmt)
                       for i, block in enumerate(self.encoder.blocks)]
        return state

    def _advance(self, state: RolloutState, z, generator):
        """Prior and predictor one step on the current code; returns g and z and writes the LSTM states."""
        if "prior" in state.lstm:
            mu_p, logvar_p, prior_new = self.prior(state.code, state.lstm["prior"])
            if z is None:  # predicting: z from the prior
                state.noise.normal_(generator=generator)
                z = mu_p + state.noise * (0.5 * logvar_p).exp()
            for buffers, values in zip(state.lstm["prior"], prior_new):
                _assign(buffers, values)
        g, pred_new = self.predict_g(state.code, z, state.lstm.get("predictor"))
        if pred_new is not None:
            for buffers, values in zip(state.lstm["predictor"], pred_new):
                _assign(buffers, values)
        return g, z

    def _encode_into(self, state: RolloutState, frames=None, x=None, update_skips=True):
        """Encode true/argmax frames (uint8) or a float feedback x (softmax, RGB) into the state's code/skips."""
        code, skips = self.encode_input(frames, x)
        state.code.copy_(code)
        if update_skips:
            _assign(state.skips, skips)
        return code

    def _rows(self, state: RolloutState, frame: torch.Tensor) -> torch.Tensor:
        if frame.shape[0] == state.batch and state.samples > 1:
            frame = frame.repeat_interleave(state.samples, 0)
        if frame.shape[0] != state.rows:
            raise ValueError(f"observe: frame batch {frame.shape[0]} fits neither batch {state.batch} nor "
                             f"batch*samples {state.rows}")
        return frame

    @torch.inference_mode()
    def observe(self, state: RolloutState, frame: torch.Tensor, generator: torch.Generator | None = None) -> RolloutState:
        """One context frame: uint8 labels (B, H, W) or RGB (B, 3, H, W), B = batch or batch*samples.
        z comes from the posterior of this (true) frame; the predictor's state advances; the frame becomes
        the code and skip source for the next step."""
        frame = self._rows(state, frame)
        if self.warp:
            state.frame.copy_(frame)
        if state.observed == 0:
            self._encode_into(state, frames=frame)
        else:
            code, skips = self.encode_frames(frame)
            z = None
            if self.stochastic:
                mu_q, logvar_q, post_new = self.posterior(code, state.lstm["posterior"])
                state.noise.normal_(generator=generator)
                z = mu_q + state.noise * (0.5 * logvar_q).exp()
                for buffers, values in zip(state.lstm["posterior"], post_new):
                    _assign(buffers, values)
            self._advance(state, z, generator)
            state.code.copy_(code)
            _assign(state.skips, skips)
        state.observed += 1
        return state

    @torch.inference_mode()
    def step(self, state: RolloutState, generator: torch.Generator | None = None) -> torch.Tensor:
        """One future frame from the prior; returns uint8 class indices (rows, H, W) (RGB (rows, 3, H, W)
        for the rgb variant) and feeds the prediction back: argmax one-hot (svg, lstm, cnn), the softmax
        (soft) or the RGB frame (rgb)."""
        if state.observed == 0:
            raise RuntimeError("step: observe at least one context frame first")
        g, z = self._advance(state, None, generator)
        raw = self.decoder(g, state.skips).float()
        if self.warp:
            index, x = self.fed_back(self.output(raw, (state.frame, self.motion(g, z))))
            state.frame.copy_(index)
        else:
            index, x = self.fed_back(raw)
        self._encode_into(state, frames=index, x=x, update_skips=self.skip == "previous")
        if self.variant == "rgb":
            return ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
        if self.variant == "soft":
            return raw.argmax(1).to(torch.uint8)
        return index

    @torch.inference_mode()
    def stream(self, context: torch.Tensor, n_future: int, samples: int = 1, generator=None, chunk: int = 16):
        """Observe context (B, n_past, H, W) uint8 labels (or (B, n_past, 3, H, W) RGB), then yield chunks of
        predictions (B, samples, <=chunk, H, W) uint8 on the model's device until n_future frames are out."""
        batch = context.shape[0]
        state = self.init_state(batch, samples, context.device)
        for t in range(context.shape[1]):
            self.observe(state, context[:, t], generator)
        done = 0
        while done < n_future:
            length = min(chunk, n_future - done)
            frames = [self.step(state, generator) for _ in range(length)]
            out = torch.stack(frames, 1)
            yield out.view(batch, samples, length, *out.shape[2:])
            done += length

    def generate(self, context: torch.Tensor, n_future: int, samples: int = 1, generator=None) -> torch.Tensor:
        """All n_future predictions at once: (B, samples, n_future, H, W) uint8 (RGB: (..., 3, H, W))."""
        return torch.cat(list(self.stream(context, n_future, samples, generator)), 2)
