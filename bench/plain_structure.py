"""The baseline of bench_rollout.py: the paper's structure generator (tables B-E) as a plain eager PyTorch build
with nothing fused, run on the weights of a StructureModel.

One nn.Sequential per encoder and decoder block, F.one_hot for the input, the ConvLSTM cell as sigmoid / tanh
on the chunks of one conv, argmax + F.one_hot to feed the prediction back, every tensor contiguous: what a
researcher writes first. The rollout's own step (rollout.StepRunner over structure_model.StructureModel.step)
is measured against it in the same run, and tests/test_bench.py checks that both compute the same frames.
The paper's model only: Gaussian latent through the predictor, one frame in (no structure.previous_frame,
pooled_frames, z_to_decoder or z_pool).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from structure_model import GaussianLatent, StructureModel


def _relu_stack(convs, relu_last: bool = True) -> nn.Sequential:
    layers = []
    for i, conv in enumerate(convs):
        layers.append(conv)
        if relu_last or i < len(convs) - 1:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class PlainLSTM(nn.Module):
    def __init__(self, convs):
        super().__init__()
        self.convs = convs

    def forward(self, x, state):
        new_state = []
        for conv, (h, c) in zip(self.convs, state):
            i, f, g, o = conv(torch.cat([x, h], 1)).chunk(4, 1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            new_state.append((h, c))
            x = h
        return x, new_state


class PlainStructureStep:
    """structure.step of `model` (the paper's svg variant), plain eager, on a fixed batch after a short context."""

    def __init__(self, model: StructureModel, batch: int, device, generator, context: torch.Tensor | None = None):
        if (model.variant != "svg" or model.previous_frame or model.pooled_frames or model.z_to_decoder
                or model.z_pool != 1 or not isinstance(model.latent, GaussianLatent)):
            raise ValueError("the plain build is the paper's model: variant svg, Gaussian latent, one frame in")
        self.device, self.num_classes = device, model.num_classes
        enc = model.encoder
        self.pooled = enc.pooled
        self.enc_blocks = nn.ModuleList(_relu_stack(block) for block in enc.blocks)
        self.to_h = _relu_stack([enc.to_h])
        dec = model.decoder
        self.upsample = dec.upsample
        self.dec_blocks = nn.ModuleList(_relu_stack(block, relu_last=k < len(dec.blocks) - 1)
                                        for k, block in enumerate(dec.blocks))
        self.prior, self.prior_stats = PlainLSTM(model.prior.lstm.convs), model.prior.to_stats
        self.posterior, self.posterior_stats = PlainLSTM(model.posterior.lstm.convs), model.posterior.to_stats
        self.predictor, self.to_g = PlainLSTM(model.predictor.convs), _relu_stack([model.to_g])
        latent_h, latent_w = model.latent_size
        width = model.predictor.width

        def zeros(layers):
            return [(torch.zeros(batch, width, latent_h, latent_w, device=device),) * 2 for _ in layers]

        self.prior_state, self.posterior_state = zeros(self.prior.convs), zeros(self.posterior.convs)
        self.predictor_state = zeros(self.predictor.convs)
        self.noise = torch.zeros(batch, model.z_channels, *model.latent_size, device=device)
        if context is None:
            context = torch.randint(0, model.num_classes, (2, batch, *model.size), dtype=torch.uint8, device=device)
        with torch.inference_mode():
            for t, frame in enumerate(context):
                self.observe(frame, generator, first=t == 0)

    def encode(self, frame: torch.Tensor):
        x = F.one_hot(frame.long(), self.num_classes).permute(0, 3, 1, 2).float()
        skips = []
        for block, pooled in zip(self.enc_blocks, self.pooled):
            x = block(x)
            skips.append(x)
            if pooled:
                x = F.max_pool2d(x, 2)
        return self.to_h(x), skips

    def observe(self, frame: torch.Tensor, generator, first: bool = False):
        """A true frame: z from the posterior (after the first), as StructureModel.observe."""
        code, skips = self.encode(frame)
        if not first:
            out, self.posterior_state = self.posterior(code, self.posterior_state)
            mu, logvar = self.posterior_stats(out).float().chunk(2, 1)
            self.noise.normal_(generator=generator)
            self._advance(mu + self.noise * (0.5 * logvar).exp(), generator)
        self.code, self.skips = code, skips

    def _advance(self, z, generator):
        """Prior and predictor one step on the current code (z from the prior when None); returns g."""
        out, self.prior_state = self.prior(self.code, self.prior_state)
        if z is None:
            mu, logvar = self.prior_stats(out).float().chunk(2, 1)
            self.noise.normal_(generator=generator)
            z = mu + self.noise * (0.5 * logvar).exp()
        out, self.predictor_state = self.predictor(torch.cat([self.code, z.to(self.code.dtype)], 1), self.predictor_state)
        return self.to_g(out)

    def step(self, generator) -> dict:
        x = self._advance(None, generator)
        for k, block in enumerate(self.dec_blocks):
            if self.upsample[k]:
                x = F.interpolate(x, scale_factor=2, mode="nearest")
            x = block(torch.cat([x, self.skips[len(self.dec_blocks) - 1 - k].to(x.dtype)], 1))
        index = x.float().argmax(1)
        self.code, self.skips = self.encode(index)
        return {"label": index.to(torch.uint8)}
