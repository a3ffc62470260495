"""The boundary generator's networks (docs/design.md, "Boundary generator"): label map -> instance boundary map.

An EdgeConnect-style generator (7x7 conv, two stride-2 convs, dilated residual blocks, two transposed
convs, 7x7 conv to one channel; spectral and instance norm) and a PatchGAN on (one-hot label, boundary).
Its target is a pixel whose 4-neighbour inside the image has another instance id (`instance_boundaries`).
At rollout the prediction (`predict_boundaries`) is concatenated to the label map for the image generator
and never fed back to the structure generator. train_edge.py trains them.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.utils.parametrizations import spectral_norm as _spectral_norm

import common

# Keys that define the generator's shapes and target: a training run resumed from a checkpoint with other values
# is refused.
ARCH_KEYS = ["data.num_classes", "data.size", "edge.width", "edge.res_blocks", "edge.dilation",
             "edge.spectral_norm", "edge.boundary_source"]


# ----------------------------------------------------------------------------- the target

def instance_boundaries(ids: torch.Tensor) -> torch.Tensor:
    """(..., H, W) integer ids -> (..., H, W) bool: true where a 4-neighbour has another id.

    Both pixels on either side of a change are marked (lines are two pixels thick). Only neighbours
    inside the image count: the image border is not a boundary by itself. Every id is a region like
    any other, id 0 included, so whether class changes between stuff regions count depends on the
    ids: Cityscapes instanceIds give each stuff class its own id (they count), a map with 0 for all
    stuff does not (use boundary_source=instance+class to add them).
    """
    edges = torch.zeros(ids.shape, dtype=torch.bool, device=ids.device)
    vertical = ids[..., 1:, :] != ids[..., :-1, :]
    horizontal = ids[..., :, 1:] != ids[..., :, :-1]
    edges[..., 1:, :] |= vertical
    edges[..., :-1, :] |= vertical
    edges[..., :, 1:] |= horizontal
    edges[..., :, :-1] |= horizontal
    return edges


def true_boundaries(label_maps: torch.Tensor, instance_maps: torch.Tensor, source: str = "instance") -> torch.Tensor:
    """The training target, (..., H, W) bool, from instance ids (and class changes for 'instance+class')."""
    if source == "instance":
        return instance_boundaries(instance_maps)
    if source == "instance+class":
        return instance_boundaries(instance_maps) | instance_boundaries(label_maps)
    raise common.ConfigError(f"edge.boundary_source must be 'instance' or 'instance+class', got {source!r}")


# ----------------------------------------------------------------------------- networks

def one_hot(label_maps: torch.Tensor, num_classes: int, dtype=torch.float32) -> torch.Tensor:
    """(B, H, W) class indices -> (B, N, H, W); indices >= N (ignore_index) become all-zero vectors."""
    classes = torch.arange(num_classes, device=label_maps.device).view(1, num_classes, 1, 1)
    return (label_maps.long().unsqueeze(1) == classes).to(dtype)


def _channels(base: int, width: float) -> int:
    return max(1, int(round(base * width)))


def _conv(conv: nn.Module, spectral: bool) -> nn.Module:
    # EdgeConnect's init: N(0, 0.02) weights, zero bias.
    nn.init.normal_(conv.weight, 0.0, 0.02)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    return _spectral_norm(conv) if spectral else conv


class ResidualBlock(nn.Module):
    def __init__(self, channels: int, dilation: int, spectral: bool):
        super().__init__()
        self.body = nn.Sequential(
            _conv(nn.Conv2d(channels, channels, 3, padding=dilation, dilation=dilation, padding_mode="reflect",
                            bias=not spectral), spectral),
            nn.InstanceNorm2d(channels), nn.ReLU(),
            _conv(nn.Conv2d(channels, channels, 3, padding=1, padding_mode="reflect", bias=not spectral), spectral),
            nn.InstanceNorm2d(channels))

    def forward(self, x):
        return x + self.body(x)


class BoundaryGenerator(nn.Module):
    """One-hot label map (B, N, H, W) -> boundary logits (B, 1, H, W); H and W divisible by 4.

    forward returns pre-sigmoid logits so the loop can use a stable BCE; sigmoid(logits) is the
    boundary map (predict_boundaries applies it). Instance norm has no running statistics, so each
    frame is processed independently of the others in its batch.
    """

    def __init__(self, num_classes: int, width: float = 1.0, res_blocks: int = 8, dilation: int = 2,
                 spectral: bool = True):
        super().__init__()
        c1, c2, c3 = (_channels(c, width) for c in (64, 128, 256))
        self.num_classes = num_classes
        self.encoder = nn.Sequential(
            _conv(nn.Conv2d(num_classes, c1, 7, padding=3, padding_mode="reflect", bias=not spectral), spectral),
            nn.InstanceNorm2d(c1), nn.ReLU(),
            _conv(nn.Conv2d(c1, c2, 4, stride=2, padding=1, bias=not spectral), spectral), nn.InstanceNorm2d(c2), nn.ReLU(),
            _conv(nn.Conv2d(c2, c3, 4, stride=2, padding=1, bias=not spectral), spectral), nn.InstanceNorm2d(c3), nn.ReLU())
        self.middle = nn.Sequential(*[ResidualBlock(c3, dilation, spectral) for _ in range(res_blocks)])
        self.decoder = nn.Sequential(
            _conv(nn.ConvTranspose2d(c3, c2, 4, stride=2, padding=1, bias=not spectral), spectral),
            nn.InstanceNorm2d(c2), nn.ReLU(),
            _conv(nn.ConvTranspose2d(c2, c1, 4, stride=2, padding=1, bias=not spectral), spectral),
            nn.InstanceNorm2d(c1), nn.ReLU(),
            _conv(nn.Conv2d(c1, 1, 7, padding=3, padding_mode="reflect"), False))

    def forward(self, onehot: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.middle(self.encoder(onehot)))


class EdgeConnectDiscriminator(nn.Module):
    """(one-hot label, boundary) (B, N+1, H, W) -> list of every layer's activations, patch logits last.
    EdgeConnect's PatchGAN (spectral norm, no instance norm, padding 1), not pix2pixHD's that the image
    generator trains against (image_model.PatchDiscriminator): each generator keeps its paper's critic."""

    def __init__(self, in_channels: int, width: float = 1.0, layers: int = 3, spectral: bool = True):
        super().__init__()
        blocks, c_in = [], in_channels
        for i in range(layers + 1):
            c_out = _channels(64 * 2 ** i, width)
            blocks.append(nn.Sequential(
                _conv(nn.Conv2d(c_in, c_out, 4, stride=2 if i < layers else 1, padding=1, bias=not spectral), spectral),
                nn.LeakyReLU(0.2)))
            c_in = c_out
        blocks.append(_conv(nn.Conv2d(c_in, 1, 4, stride=1, padding=1, bias=not spectral), spectral))
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for block in self.blocks:
            x = block(x)
            features.append(x)
        return features


def build_model(cfg) -> BoundaryGenerator:
    e = cfg.edge
    return BoundaryGenerator(cfg.data.num_classes, e.width, e.res_blocks, e.dilation, e.spectral_norm)


def build_discriminator(cfg) -> EdgeConnectDiscriminator:
    e = cfg.edge
    return EdgeConnectDiscriminator(cfg.data.num_classes + 1, e.d_width, e.d_layers, e.spectral_norm)


def load(path, cfg=None, device="cpu") -> BoundaryGenerator:
    """A trained boundary generator (RUN/edge/last.pt) in eval mode, rebuilt from its checkpoint's config
    (common.load_trained); with `cfg`, one trained for other classes or another frame size is refused."""
    return common.load_trained(path, "generator", build_model, cfg, device=device)


@torch.inference_mode()
def predict_boundaries(model: nn.Module, label_index_maps: torch.Tensor) -> torch.Tensor:
    """Label index maps (B, H, W) uint8 -> boundary probabilities (B, 1, H, W) float32 in [0, 1].

    Leading dimensions are free: (B, T, H, W) gives (B, T, 1, H, W), each frame on its own. Inference
    mode, eval mode for the call (the model's mode is restored), static shapes and no host
    synchronisation, so it can sit inside a captured rollout step; runs under the caller's autocast.
    """
    model = common.unwrap(model)
    *lead, height, width = label_index_maps.shape
    if height % 4 or width % 4:
        raise ValueError(f"predict_boundaries: H and W must be divisible by 4, got {height}x{width}")
    device = next(model.parameters()).device
    flat = label_index_maps.reshape(-1, height, width).to(device, non_blocking=True)
    was_training = model.training
    model.eval()
    try:
        logits = model(one_hot(flat, model.num_classes, next(model.parameters()).dtype))
    finally:
        model.train(was_training)
    return torch.sigmoid(logits.float()).reshape(*lead, 1, height, width)
