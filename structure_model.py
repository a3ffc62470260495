"""The structure generator's network (paper section 2.1, tables B-E): SVG-extend on label maps.

    h_t, skips_t = encoder(s_t)                       h_t: h_channels x 8 x 8 (8 x 16 at 128x256)
    mu_q, logvar_q = posterior(h_t)                   ConvLSTM, then a 3x3 conv to (mu, log-variance)
    mu_p, logvar_p = prior(h_{t-1})
    g_t = predictor([h_{t-1}, z_t])                   ConvLSTM x2, then 3x3 conv + ReLU
    log p(s_t) = decoder(g_t, skips)                  mirrors the encoder, log-softmax over classes

Variants (paper section 5): svg (the model above), lstm (no latent), cnn (no latent, no recurrence:
the predictor's ConvLSTMs become plain convolutions), soft (the softmax, not the argmax one-hot, is fed
back at inference), rgb (the same network on RGB frames in [-1, 1], tanh output, L2/L1 loss).
Not in the paper, off by default (docs/design.md, "Opening the latent"): `latent=mixture`, a prior that
mixes Gaussians per latent cell instead of one, `z_pool`, latent cells pooled over several LSTM cells, and
`z_to_decoder`, z_t fed into every decoder block beside the skips, so that it reaches the resolution where
births happen, and `posterior_births`, the posterior also reads where each class was born in its target.

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

import common
import kernels

VARIANTS = ("svg", "lstm", "cnn", "soft", "rgb")
SKIP_MODES = ("previous", "last_context")
LATENTS = ("gaussian", "mixture")
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


def class_fractions(frames: torch.Tensor, num_classes: int, factor: int) -> torch.Tensor:
    """uint8 label maps (B, H, W) -> the fraction of each class in every factor x factor cell, (B, N, H/f, W/f)
    fp32; void (an index >= N) counts for no class. kernels.onehot_reference compares against the class ids
    (F.one_hot would read the maximum back to the host: no CUDA graph)."""
    return F.avg_pool2d(kernels.onehot_reference(frames, num_classes, torch.float32), factor)


BIRTH_RADIUS = 3   # pixels: a label is born where its class is absent from the previous frame this close


def born_pixels(earlier: torch.Tensor, later: torch.Tensor, num_classes: int, radius: int = BIRTH_RADIUS,
                edges: bool = False) -> torch.Tensor:
    """bool (N, H, W) for label maps earlier, later (N, H, W): pixels of `later` whose class is absent from
    `earlier` within `radius` pixels, i.e. objects that enter, appear or change class, as opposed to ones
    that move (by <= radius per step). Void and other indices >= N are never born. The births of
    evaluate.py --dynamics, of structure.born_weight in training and of structure.posterior_births.
    With `edges` (structure.edge_births) also edge_news: the ends of objects at the edge they enter from."""
    earlier, later = earlier.long(), later.long()
    ids = torch.arange(num_classes, device=earlier.device).view(1, -1, 1, 1)
    present = dilate(earlier.unsqueeze(1) == ids, radius)
    hit = present.gather(1, later.clamp_max(num_classes - 1).unsqueeze(1)).squeeze(1)
    born = ~hit & (later < num_classes)
    if edges:
        born |= edge_news(earlier, later, num_classes, radius)
    return born


def edge_news(earlier: torch.Tensor, later: torch.Tensor, num_classes: int, radius: int = BIRTH_RADIUS) -> torch.Tensor:
    """bool (N, H, W): pixels of the frame's outermost ring whose class changed to one absent from `earlier`
    within `radius` pixels inward (along the row for the side columns, along the column for the top and bottom
    rows). An object that stops entering (a cloud's last column at the edge it enters from) leaves its edge
    pixels to a class present a pixel above or below, so born_pixels never marks its end; inward, the object's
    body is all there is. What leaves the frame is followed by what was inward of it, so exits are not news."""
    changed = (later != earlier) & (later < num_classes)
    news = torch.zeros_like(changed)
    reach = radius + 1
    news[..., :, 0] |= changed[..., :, 0] & ~(earlier[..., :, :reach] == later[..., :, :1]).any(-1)
    news[..., :, -1] |= changed[..., :, -1] & ~(earlier[..., :, -reach:] == later[..., :, -1:]).any(-1)
    news[..., 0, :] |= changed[..., 0, :] & ~(earlier[..., :reach, :] == later[..., :1, :]).any(-2)
    news[..., -1, :] |= changed[..., -1, :] & ~(earlier[..., -reach:, :] == later[..., -1:, :]).any(-2)
    return news


def dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """bool (N, C, H, W) OR-ed over a (2 radius + 1)^2 window (zero padding), one axis at a time: on CPU 20x
    faster than a float max-pool of the same window, which cost 9% of a synth_scroll training step."""
    height, width = mask.shape[-2:]
    padded = F.pad(mask, (0, 0, radius, radius))
    rows = padded[..., :height, :].clone()
    for shift in range(1, 2 * radius + 1):
        rows |= padded[..., shift:shift + height, :]
    padded = F.pad(rows, (radius, radius))
    out = padded[..., :width].clone()
    for shift in range(1, 2 * radius + 1):
        out |= padded[..., shift:shift + width]
    return out


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
    finer block's width, and the finest block's last conv outputs the frame channels (no activation).
    With z_channels > 0 (structure.z_to_decoder, not in the paper) z_t, upsampled to each block's
    resolution, is concatenated into every block's input as well (docs/design.md, "Opening the latent")."""

    def __init__(self, h_channels: int, blocks, pooled, out_channels: int, z_channels: int = 0):
        super().__init__()
        self.upsample = list(reversed(pooled))
        self.z_channels = z_channels
        self.blocks = nn.ModuleList()
        cin = h_channels
        for level in reversed(range(len(blocks))):
            width, convs = blocks[level]
            last_out = blocks[level - 1][0] if level > 0 else out_channels
            outs = [width] * (convs - 1) + [last_out]
            ins = [cin + width + z_channels] + outs[:-1]
            self.blocks.append(nn.ModuleList([conv3x3(a, b) for a, b in zip(ins, outs)]))
            cin = last_out

    def forward(self, g: torch.Tensor, skips, z: torch.Tensor | None = None) -> torch.Tensor:
        x = g
        n_blocks = len(self.blocks)
        for k, block in enumerate(self.blocks):
            if self.upsample[k]:
                x = F.interpolate(x, scale_factor=2, mode="nearest")
            inputs = [x, skips[n_blocks - 1 - k].to(x.dtype)]
            if self.z_channels:
                inputs.append(F.interpolate(z.to(x.dtype), size=x.shape[-2:], mode="nearest"))
            x = torch.cat(inputs, 1)
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


class LatentLSTM(nn.Module):
    """Posterior / prior (table C): ConvLSTM, then one 3x3 conv to the latent's statistics in fp32:
    (mu, log-variance) of a Gaussian, 2 * z channels, or the latent's own (MixturePriorLatent's prior)."""

    def __init__(self, in_channels: int, width: int, layers: int, stats_channels: int, pool: int = 1):
        super().__init__()
        self.lstm = ConvLSTM(in_channels, width, layers)
        self.to_stats = conv3x3(width, stats_channels)
        self.pool = pool

    def forward(self, x, state):
        out, state = self.lstm(x, state)
        stats = self.to_stats(out).float()
        return (F.avg_pool2d(stats, self.pool) if self.pool > 1 else stats), state


def gaussian_kl(mu_q, logvar_q, mu_p, logvar_p) -> torch.Tensor:
    """KL(N(mu_q, var_q) || N(mu_p, var_p)) summed over latent elements, per batch item (B,)."""
    kl = 0.5 * (logvar_p - logvar_q) + (logvar_q.exp() + (mu_q - mu_p) ** 2) / (2 * logvar_p.exp()) - 0.5
    return kl.flatten(1).sum(1)


class GaussianLatent:
    """The paper's latent: z = mu + sigma * noise, noise ~ N(0, 1), posterior and prior alike.
    Every latent below has the same interface: the posterior's and the prior's statistics channels, the
    noise channels a sample reads, sample_posterior / sample_prior, and kl(q, p, z) per batch item, z
    the posterior's sample (used by latents whose KL has no closed form)."""

    def __init__(self, z_channels: int):
        self.z_channels = z_channels
        self.posterior_channels = self.prior_channels = 2 * z_channels
        self.noise_channels = z_channels

    def sample_posterior(self, stats: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        mu, logvar = stats.chunk(2, 1)
        return mu + noise * (0.5 * logvar).exp()

    sample_prior = sample_posterior

    def kl(self, q: torch.Tensor, p: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        return gaussian_kl(*q.chunk(2, 1), *p.chunk(2, 1))


def gaussian_log_density(z, mu, logvar) -> torch.Tensor:
    """log N(z; mu, exp(logvar)) per element."""
    return -0.5 * (math.log(2 * math.pi) + logvar + (z - mu) ** 2 / logvar.exp())


class MixturePriorLatent:
    """The paper's Gaussian posterior with a prior that is a mixture of `components` diagonal Gaussians per
    latent cell, with learnt weights. A cell where an object enters now and then needs a prior with two modes,
    "nothing" and "an object", which one Gaussian can only cover by spreading between them
    (docs/opening_the_latent.md). The KL has no closed form: it is estimated at the posterior's sample z,
    log q(z) - log p(z) (summed over cells), an unbiased estimate whose gradient fits the mixture to the
    posterior's samples. A prior sample picks a component per cell by inverse CDF from one extra noise channel
    (through its N(0, 1) CDF), then draws from that Gaussian."""

    def __init__(self, z_channels: int, components: int):
        if components < 2:
            raise ValueError(f"structure.prior_components={components} must be >= 2")
        self.z_channels, self.components = z_channels, components
        self.posterior_channels = 2 * z_channels
        self.prior_channels = components * (2 * z_channels + 1)
        self.noise_channels = z_channels + 1

    def mixture(self, p: torch.Tensor):
        """Prior statistics -> mu, logvar (B, K, Z, h, w) and log mixture weights (B, K, h, w)."""
        k, z = self.components, self.z_channels
        mu, logvar = p[:, :2 * k * z].unflatten(1, (2, k, z)).unbind(1)
        return mu, logvar, p[:, 2 * k * z:].log_softmax(1)

    def sample_posterior(self, stats: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        mu, logvar = stats.chunk(2, 1)
        return mu + noise[:, :self.z_channels] * (0.5 * logvar).exp()

    def sample_prior(self, p: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        mu, logvar, log_weights = self.mixture(p)
        uniform = torch.special.ndtr(noise[:, self.z_channels:].to(p.dtype))                  # (B, 1, h, w)
        pick = (log_weights.exp().cumsum(1) < uniform).sum(1, keepdim=True).clamp_max(self.components - 1)
        pick = pick.unsqueeze(2).expand(-1, -1, self.z_channels, -1, -1)                    # (B, 1, Z, h, w)
        mu, logvar = mu.gather(1, pick).squeeze(1), logvar.gather(1, pick).squeeze(1)
        return mu + noise[:, :self.z_channels] * (0.5 * logvar).exp()

    def kl(self, q: torch.Tensor, p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        log_q = gaussian_log_density(z, *q.chunk(2, 1)).sum(1)                               # (B, h, w)
        mu, logvar, log_weights = self.mixture(p)
        log_p = torch.logsumexp(log_weights + gaussian_log_density(z.unsqueeze(1), mu, logvar).sum(2), 1)
        return (log_q - log_p).flatten(1).sum(1)


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
        self.noise = None          # the latent's N(0, 1) noise, refilled in place from the generator
        self.frame = None          # the last frame (uint8 labels), for a model that encodes each frame with it

    @property
    def rows(self) -> int:
        return self.batch * self.samples

    def tensors(self) -> list[torch.Tensor]:
        out = [self.code, *self.skips, self.noise, self.frame]
        for layers in self.lstm.values():
            for h, c in layers:
                out += [h, c]
        return [t for t in out if t is not None]


def stacked(values: list, empty: torch.Tensor) -> torch.Tensor:
    """Per-step values (B,) stacked to (B, T), or `empty` when there are none (no latent)."""
    return torch.stack(values, 1) if values else empty


def _assign(buffers, values):
    for buffer, value in zip(buffers, values):
        buffer.copy_(value)


# ----------------------------------------------------------------------------- the model

class StructureModel(nn.Module):
    def __init__(self, *, variant: str, num_classes: int, size, blocks, h_channels: int, z_channels: int,
                 lstm_width: int, posterior_layers: int, predictor_layers: int, skip: str, latent: str = "gaussian",
                 prior_components: int = 8, z_to_decoder: bool = False, z_pool: int = 1,
                 previous_frame: bool = False, pooled_frames: bool = False, posterior_births: bool = False,
                 edge_births: bool = False):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"structure.variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
        if skip not in SKIP_MODES:
            raise ValueError(f"structure.skip must be one of {', '.join(SKIP_MODES)}, got {skip!r}")
        if latent not in LATENTS:
            raise ValueError(f"structure.latent must be one of {', '.join(LATENTS)}, got {latent!r}")
        label_inputs = [name for name, on in (("previous_frame", previous_frame), ("pooled_frames", pooled_frames),
                                              ("posterior_births", posterior_births)) if on]
        if label_inputs and variant not in ("svg", "lstm", "cnn"):
            verb = "need" if len(label_inputs) > 1 else "needs"
            raise ValueError(f"structure.{' and structure.'.join(label_inputs)} {verb} argmax label feedback (svg, "
                             f"lstm, cnn), not {variant!r}: add " + " ".join(f"--structure.{n}=false" for n in label_inputs))
        self.previous_frame, self.pooled_frames = previous_frame, pooled_frames
        self.variant, self.num_classes, self.size, self.skip = variant, num_classes, tuple(size), skip
        self.stochastic = variant in STOCHASTIC
        # a latent's option, as z_to_decoder: without a posterior (lstm, cnn) it has nothing to feed, so the
        # paper's ablations run on a config whose recipe uses it
        self.posterior_births = posterior_births and self.stochastic
        self.edge_births = edge_births  # born_pixels(edges=...) of the born weight and the posterior's births
        self.channels = 3 if variant == "rgb" else num_classes
        pools = pool_count(size)
        self.latent_size = (size[0] // 2**pools, size[1] // 2**pools)
        if z_pool < 1 or self.latent_size[0] % z_pool or self.latent_size[1] % z_pool:
            raise ValueError(f"structure.z_pool={z_pool} must divide the latent grid {list(self.latent_size)}")
        self.z_pool = z_pool
        self.z_size = (self.latent_size[0] // z_pool, self.latent_size[1] // z_pool)
        self.h_channels, self.z_channels = h_channels, z_channels
        # the code h_t the LSTMs read: the encoder's output, with pooled_frames also the class fractions of frame t
        # (and of t-1 with previous_frame) per cell of the LSTMs' grid
        self.code_channels = h_channels + (num_classes * (2 if previous_frame else 1) if pooled_frames else 0)
        self.z_to_decoder = z_to_decoder and self.stochastic
        self.encoder = Encoder(self.channels * (2 if previous_frame else 1), blocks, pools, h_channels)
        self.decoder = Decoder(h_channels, blocks, self.encoder.pooled, self.channels,
                               z_channels if self.z_to_decoder else 0)
        if self.stochastic:
            self.latent = (GaussianLatent(z_channels) if latent == "gaussian"
                           else MixturePriorLatent(z_channels, prior_components))
            # with posterior_births the posterior also reads where each class was born (posterior_input)
            posterior_in = self.code_channels + (num_classes if self.posterior_births else 0)
            self.posterior = LatentLSTM(posterior_in, lstm_width, posterior_layers, self.latent.posterior_channels,
                                        z_pool)
            self.prior = LatentLSTM(self.code_channels, lstm_width, posterior_layers, self.latent.prior_channels, z_pool)
        predictor_in = self.code_channels + (z_channels if self.stochastic else 0)
        if variant == "cnn":
            self.predictor = ConvStack(predictor_in, lstm_width, predictor_layers)
        else:
            self.predictor = ConvLSTM(predictor_in, lstm_width, predictor_layers)
        self.to_g = conv3x3(lstm_width, h_channels)
        self.memory_format = torch.contiguous_format

    # ------------------------------------------------------------------ frames in and out

    def encode_frames(self, frames: torch.Tensor, previous: torch.Tensor | None = None):
        """Encoder on true frames: uint8 label indices (B, H, W) go through kernels.onehot_conv3x3 (the first
        conv as a gather, no one-hot; an index >= N such as 255 "void" is an all-zero pixel); uint8 RGB
        (B, 3, H, W) is scaled to [-1, 1]. With structure.previous_frame the first conv also reads the frame
        before (`previous`, the frame itself when None): the skips then show the last step's motion, and so
        the phase of a motion slower than a pixel per frame. With structure.pooled_frames the code also carries
        the frames' class fractions per cell (class_fractions). Returns the code h_t and the skips."""
        if self.variant == "rgb":
            return self.encoder((frames.float() / 127.5 - 1).contiguous(memory_format=self.memory_format))
        conv = self.encoder.first_conv
        if not self.previous_frame:
            first = kernels.onehot_conv3x3(frames, conv.weight, conv.bias, memory_format=self.memory_format)
            code, skips = self.encoder(None, first_conv_out=first)
            return (self._with_fractions(code, frames) if self.pooled_frames else code), skips
        n = self.channels
        previous = frames if previous is None else previous
        first = (kernels.onehot_conv3x3(frames, conv.weight[:, :n], conv.bias, memory_format=self.memory_format)
                 + kernels.onehot_conv3x3(previous, conv.weight[:, n:], None, memory_format=self.memory_format))
        code, skips = self.encoder(None, first_conv_out=first)
        return (self._with_fractions(code, frames, previous) if self.pooled_frames else code), skips

    def posterior_input(self, code: torch.Tensor, frame: torch.Tensor, before: torch.Tensor) -> torch.Tensor:
        """What the posterior reads of the target `frame` (uint8 labels, B, H, W): its code; with
        structure.posterior_births also, per class and cell of the LSTMs' grid, 1 where that class was born
        (born_pixels against `before`, the frame fed before it), else 0. A birth of a few pixels barely moves
        the code, and the KL teaches the posterior to ignore it before the decoder can learn to draw it from
        z (docs/opening_the_latent.md, PB)."""
        if not self.posterior_births:
            return code
        born = born_pixels(before, frame, self.num_classes, edges=self.edge_births)
        onehot = kernels.onehot_reference(frame, self.num_classes, torch.float32) * born.unsqueeze(1)
        births = F.max_pool2d(onehot, self.size[0] // self.latent_size[0]).to(code.dtype)
        return torch.cat([code, births], 1).contiguous(memory_format=self.memory_format)

    def _with_fractions(self, code: torch.Tensor, *frames: torch.Tensor) -> torch.Tensor:
        """The code with each frame's class fractions per cell appended: the latent reads what entered the
        frame directly, instead of waiting for the encoder to learn to carry it, which it does only once z is
        used (docs/opening_the_latent.md, "The latent reads the frames")."""
        factor = self.size[0] // self.latent_size[0]
        fractions = [class_fractions(f, self.num_classes, factor).to(code.dtype) for f in frames]
        return torch.cat([code, *fractions], 1).contiguous(memory_format=self.memory_format)

    def predict_g(self, code, z, state):
        if z is not None and self.z_pool > 1:
            z = F.interpolate(z, scale_factor=self.z_pool, mode="nearest")
        x = code if z is None else torch.cat([code, z.to(code.dtype)], 1)
        out, state = self.predictor(x, state)
        return F.relu(self.to_g(out)), state

    def decode(self, g, skips, z) -> torch.Tensor:
        """The decoder's raw fp32 output (logits or pre-tanh RGB)."""
        if not self.z_to_decoder:
            return self.decoder(g, skips).float()
        # z in the activations' memory format: a mixed-format concatenation costs a layout copy of the
        # finest block's whole input in forward and backward (19% of a synth_scroll training step)
        return self.decoder(g, skips, z.contiguous(memory_format=self.memory_format)).float()

    def output(self, raw: torch.Tensor) -> torch.Tensor:
        """Decoder output -> log-probabilities over classes (fp32), or RGB in [-1, 1]."""
        if self.variant == "rgb":
            return torch.tanh(raw.float())
        return F.log_softmax(raw.float(), 1)

    # ------------------------------------------------------------------ teacher forcing

    def forward(self, frames: torch.Tensor, n_past: int, generator: torch.Generator | None = None,
                prior_z: bool = False, inputs: torch.Tensor | None = None) -> dict:
        """Teacher-forced pass over a clip. frames: uint8 labels (B, T, H, W) or RGB (B, T, 3, H, W).
        Targets are frames 1..T-1, each predicted from the true frames before it with z from the posterior
        of the true target (prior_z: from the prior, as at rollout, the posterior not run; a diagnostic of how much
        the decoder uses z and of how well the prior matches the posterior). `inputs` (default frames) are the frames fed as
        the past, which the prior, the predictor and the skips read, e.g. the model's own drafts
        (structure.own_inputs). Returns out (B, T-1, C, H, W) log-probabilities (or RGB) and kl (B, T-1), zero
        without a latent or with prior_z, and kl_prior / kl_posterior, the same values with gradients to one side
        only."""
        batch, length = frames.shape[:2]
        fed = frames if inputs is None else inputs
        reads_targets = self.stochastic and not prior_z
        codes, skips, before = self._encode_clips(fed, reads_targets and self.posterior_births)
        targets = None
        if reads_targets:
            targets = codes
            if inputs is not None:
                # the posterior reads each true target with the frame fed before it, as when a rollout observes;
                # only frames replaced in `inputs` encode differently
                swapped = (frames != fed).flatten(2).any(2)
                targets = codes.clone()
                if swapped.any():
                    targets[swapped] = self.encode_frames(frames[swapped], None if before is None else before[swapped])[0]
            if self.posterior_births:
                targets = self.posterior_input(targets.flatten(0, 1), frames.flatten(0, 1), before.flatten(0, 1))
                targets = targets.view(batch, length, *targets.shape[1:])
        gs, zs, kls, kls_prior, kls_posterior = self._predict(codes, targets, length - 1, generator)
        out = self.output(self._decode_outputs(gs, zs, skips, range(length - 1), n_past))
        out = out.view(batch, length - 1, *out.shape[1:])
        zeros = torch.zeros(batch, length - 1, device=codes.device)
        return {"out": out, "kl": stacked(kls, zeros), "kl_prior": stacked(kls_prior, zeros),
                "kl_posterior": stacked(kls_posterior, zeros)}

    def _encode_clips(self, clips: torch.Tensor, with_before: bool = False):
        """encode_frames over clips (B, T, ...): codes and skips (B, T, ...), and the frame before each one (the
        first frame its own; None unless with_before or structure.previous_frame, which reads it)."""
        batch, length = clips.shape[:2]
        before = torch.cat([clips[:, :1], clips[:, :-1]], 1) if with_before or self.previous_frame else None
        codes, skips = self.encode_frames(clips.flatten(0, 1), None if before is None else before.flatten(0, 1))
        return (codes.view(batch, length, *codes.shape[1:]), [s.view(batch, length, *s.shape[1:]) for s in skips],
                before)

    def _decode_outputs(self, gs: list, zs: list, skips, outputs, n_past: int,
                        rows: torch.Tensor | None = None) -> torch.Tensor:
        """The decoder's raw output (B * len(outputs), C, H, W) for the teacher-forced outputs j in `outputs`
        (output j predicts frame j + 1), from _predict's g and z and the clip's skips (B, T, ...); with `rows`
        (B, len(outputs), bool) only the selected (clip, output) pairs, in row-major order."""
        def pick(x):  # (B, len(outputs), ...) -> the decoder's batch
            return x.flatten(0, 1) if rows is None else x[rows].contiguous(memory_format=self.memory_format)

        g = pick(torch.stack([gs[j] for j in outputs], 1))
        z = pick(torch.stack([zs[j] for j in outputs], 1)) if self.stochastic else None
        # skip source for output j: frame j, or frozen at the last context frame past the context
        sources = [min(j, n_past - 1) if self.skip == "last_context" else j for j in outputs]
        return self.decode(g, [pick(s[:, sources]) for s in skips], z)

    def _predict(self, codes: torch.Tensor, targets: torch.Tensor | None, steps: int,
                 generator: torch.Generator | None = None):
        """The recurrence of a teacher-forced pass: g_t for targets t = 1..steps from the codes (B, T, ...) of the
        frames fed before them, z_t from the posterior reading targets[:, t], or from the prior when targets is
        None. Returns the lists g, z (None entries without a latent), and the KLs (empty lists with the prior's z)."""
        batch, device = codes.shape[0], codes.device
        latent_h, latent_w = self.latent_size
        if self.stochastic:
            prior_state = self.prior.lstm.zero_state(batch, latent_h, latent_w, device, self.memory_format)
            if targets is not None:
                post_state = self.posterior.lstm.zero_state(batch, latent_h, latent_w, device, self.memory_format)
        gs, zs, kls, kls_prior, kls_posterior = [], [], [], [], []
        if self.variant == "cnn":  # no recurrence: every step at once
            g, _ = self.predict_g(codes[:, :steps].flatten(0, 1), None, None)
            return list(g.view(batch, steps, *g.shape[1:]).unbind(1)), [None] * steps, kls, kls_prior, kls_posterior
        pred_state = self.predictor.zero_state(batch, latent_h, latent_w, device, self.memory_format)
        for t in range(1, steps + 1):
            z = None
            if self.stochastic:
                stats_p, prior_state = self.prior(codes[:, t - 1], prior_state)
                noise = torch.randn(batch, self.latent.noise_channels, *self.z_size, generator=generator, device=device)
                if targets is None:
                    z = self.latent.sample_prior(stats_p, noise)
                else:
                    stats_q, post_state = self.posterior(targets[:, t], post_state)
                    z = self.latent.sample_posterior(stats_q, noise)
                    kls.append(self.latent.kl(stats_q, stats_p, z))
                    # the same value with gradients to one side only (KL balancing)
                    kls_prior.append(self.latent.kl(stats_q.detach(), stats_p, z.detach()))
                    kls_posterior.append(self.latent.kl(stats_q, stats_p.detach(), z))
            g, pred_state = self.predict_g(codes[:, t - 1], z, pred_state)
            gs.append(g)
            zs.append(z)
        return gs, zs, kls, kls_prior, kls_posterior

    @torch.no_grad()
    def draft(self, frames: torch.Tensor, n_past: int, generator: torch.Generator | None = None,
              fraction: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Frames n_past..T-2 of label clips (B, T, H, W), each replaced with probability `fraction` by the
        model's own prediction of it from the true frames before it with z from the prior: the drafts that
        structure.own_inputs feeds back (the context is never replaced, the last frame is only a target).
        Returns them (uint8, B, T-1-n_past, H, W) and which were drafted (bool, B, T-1-n_past). A drafted frame
        is forward(prior_z=True)'s argmax there, for the same generator; the lean pass encodes no last frame,
        runs no last step and decodes only the drafted frames (the choice is drawn after the pass's noise)."""
        batch, length = frames.shape[:2]
        codes, skips, _ = self._encode_clips(frames[:, :-1])
        gs, zs, *_ = self._predict(codes, None, length - 2, generator)
        outputs = range(n_past - 1, length - 2)                 # output j predicts frame j + 1
        drafted = torch.rand(batch, len(outputs), generator=generator, device=frames.device) < fraction
        drafts = frames[:, n_past:-1].clone()
        if drafted.any():
            raw = self._decode_outputs(gs, zs, skips, outputs, n_past, rows=drafted)
            drafts[drafted] = kernels.argmax_onehot(raw, with_onehot=False)[0]
        return drafts, drafted

    def fed_back(self, raw: torch.Tensor):
        """What a prediction feeds back, from the decoder's fp32 output: (frames, None) with the argmax indices
        (svg, lstm, cnn; uint8), or (None, x) with the softmax (soft) or the RGB frame in [-1, 1] (rgb).
        The rollout step uses it; encode_input() encodes it."""
        if self.variant == "rgb":
            return None, torch.tanh(raw)
        if self.variant == "soft":
            return None, torch.softmax(raw, 1)
        index, _ = kernels.argmax_onehot(raw, with_onehot=False)
        return index, None

    def encode_input(self, frames: torch.Tensor | None = None, x: torch.Tensor | None = None, previous=None):
        """Encoder on uint8 frames (labels or RGB, as encode_frames, with the previous frame) or on a float
        input x (softmax, RGB)."""
        if frames is not None:
            return self.encode_frames(frames, previous)
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
            state.noise = torch.zeros(rows, self.latent.noise_channels, *self.z_size, device=device)
        if self.variant != "cnn":
            state.lstm["predictor"] = self.predictor.zero_state(rows, latent_h, latent_w, device, fmt)
        state.code = torch.zeros(rows, self.code_channels, latent_h, latent_w, device=device).contiguous(memory_format=fmt)
        state.skips = [torch.zeros(rows, block[-1].out_channels, self.size[0] // 2**i, self.size[1] // 2**i,
                                   device=device).contiguous(memory_format=fmt)
                       for i, block in enumerate(self.encoder.blocks)]
        if self.previous_frame or self.posterior_births:
            state.frame = torch.zeros(rows, *self.size, dtype=torch.uint8, device=device)
        return state

    def _advance(self, state: RolloutState, z, generator):
        """Prior and predictor one step on the current code; returns g and z and writes the LSTM states."""
        if "prior" in state.lstm:
            stats_p, prior_new = self.prior(state.code, state.lstm["prior"])
            if z is None:  # predicting: z from the prior
                state.noise.normal_(generator=generator)
                z = self.latent.sample_prior(stats_p, state.noise)
            for buffers, values in zip(state.lstm["prior"], prior_new):
                _assign(buffers, values)
        g, pred_new = self.predict_g(state.code, z, state.lstm.get("predictor"))
        if pred_new is not None:
            for buffers, values in zip(state.lstm["predictor"], pred_new):
                _assign(buffers, values)
        return g, z

    def _encode_into(self, state: RolloutState, frames=None, x=None, update_skips=True):
        """Encode true/argmax frames (uint8) or a float feedback x (softmax, RGB) into the state's code/skips."""
        # the first observed frame is its own previous one, as in training
        code, skips = self.encode_input(frames, x, state.frame if state.observed else None)
        self._store(state, code, skips if update_skips else None, frames)
        return code

    @staticmethod
    def _store(state: RolloutState, code, skips, frame) -> None:
        """The encoding of the newest frame becomes the state's h_{t-1} (and skips, unless None); the frame
        itself is kept where the model reads each frame with the one before."""
        state.code.copy_(code)
        if skips is not None:
            _assign(state.skips, skips)
        if state.frame is not None:
            state.frame.copy_(frame)

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
        if state.observed == 0:
            self._encode_into(state, frames=frame)
        else:
            code, skips = self.encode_frames(frame, state.frame)
            z = None
            if self.stochastic:
                stats_q, post_new = self.posterior(self.posterior_input(code, frame, state.frame),
                                                   state.lstm["posterior"])
                state.noise.normal_(generator=generator)
                z = self.latent.sample_posterior(stats_q, state.noise)
                for buffers, values in zip(state.lstm["posterior"], post_new):
                    _assign(buffers, values)
            self._advance(state, z, generator)
            self._store(state, code, skips, frame)
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
        raw = self.decode(g, state.skips, z)
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


# ----------------------------------------------------------------------------- from a config, from a checkpoint

# Keys that define the weights' shapes: a training run resumed from a checkpoint with other values is refused.
ARCH_KEYS = ["structure.variant", "structure.encoder_blocks", "structure.width_mult", "structure.lstm_width",
             "structure.lstm_mult", "structure.h_channels", "structure.z_channels", "structure.posterior_layers",
             "structure.predictor_layers", "structure.latent", "structure.prior_components", "structure.z_to_decoder",
             "structure.z_pool", "structure.previous_frame", "structure.pooled_frames", "structure.posterior_births",
             "data.num_classes", "data.size"]


def build_model(cfg) -> StructureModel:
    """The structure generator described by cfg.structure and cfg.data (classes, frame size)."""
    s = cfg.structure
    size = tuple(cfg.data.size)
    if len(size) != 2:
        raise common.ConfigError(f"data.size must be [H, W], got {cfg.data.size!r}")
    try:
        pool_count(size)
    except ValueError as e:
        raise common.ConfigError(f"data.size={list(size)}: {e}") from None
    for key in ("width_mult", "lstm_mult"):
        if not s[key] > 0:
            raise common.ConfigError(f"structure.{key} must be > 0, got {s[key]!r}")
    if s.encoder_blocks:
        try:
            blocks = [(max(1, round(int(w) * s.width_mult)), int(n)) for w, n in s.encoder_blocks]
            assert all(n >= 1 for _, n in blocks)
        except (TypeError, ValueError, AssertionError):
            raise common.ConfigError(f"structure.encoder_blocks must be [[width, convs], ...] with positive "
                                     f"integers, got {s.encoder_blocks!r}") from None
    else:
        blocks = paper_blocks(size, s.width_mult)
    try:
        return StructureModel(variant=s.variant, num_classes=cfg.data.num_classes, size=size, blocks=blocks,
                              h_channels=s.h_channels, z_channels=s.z_channels,
                              lstm_width=max(1, round(s.lstm_width * s.lstm_mult)),
                              posterior_layers=s.posterior_layers, predictor_layers=s.predictor_layers, skip=s.skip,
                              latent=s.latent, prior_components=s.prior_components,
                              z_to_decoder=s.z_to_decoder, z_pool=s.z_pool,
                              previous_frame=s.previous_frame, pooled_frames=s.pooled_frames,
                              posterior_births=s.posterior_births, edge_births=s.edge_births)
    except ValueError as e:
        raise common.ConfigError(str(e)) from None


def load(path, cfg=None, device="cpu") -> StructureModel:
    """A trained structure generator in eval mode, rebuilt from its checkpoint's config (common.load_trained);
    with `cfg`, one trained for other classes or another frame size is refused with the key."""
    return common.load_trained(path, "structure", build_model, cfg, device=device)
