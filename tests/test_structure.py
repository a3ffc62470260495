"""Structure generator: paper shapes and parameter counts, training, DDP, resume, rollout step API."""
import gc
import hashlib
import os
import resource
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import common
import kernels
import train_structure
from structure_model import born_pixels, build_model, class_fractions, load
from tests.conftest import assert_resumed_equal

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--run.kernel_backend=torch", "--structure.width_mult=0.125", "--structure.lstm_mult=0.125",
        "--structure.h_channels=16", "--structure.z_channels=8", "--structure.n_past=3", "--structure.n_future=3",
        "--structure.stride=1", "--structure.batch_size=4", "--structure.lr=0.002", "--structure.val_clips=2",
        "--structure.sample_clips=1", "--structure.sample_future=4", "--structure.val_future=3",
        "--structure.val_motion_frames=8",
        "--structure.log_every=1", "--structure.eval_every=1000", "--structure.save_every=1000"]


@pytest.fixture(autouse=True)
def torch_kernels_one_thread():
    # the torch reference path is the CPU path; one thread because tiny ops on a shared 2-core machine
    # spend far longer synchronising two threads than computing; both restored afterwards
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with kernels.using_backend("torch"):
        yield
    torch.set_num_threads(threads)


def tiny_args(root, run_dir, *extra):
    return ["--cfg", "synth_drive.yaml", f"--data.root={root}", "--data.size=[32, 32]", f"--run.dir={run_dir}",
            *TINY, *extra]


def tiny_cfg(*extra, size=(32, 32)):
    overrides = [o.lstrip("-") for o in TINY[1:]] + [f"data.size=[{size[0]}, {size[1]}]", *extra]
    return common.load_config("synth_drive.yaml", overrides)


def random_labels(*shape, classes=19, seed=0):
    return torch.randint(0, classes, shape, generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


# ----------------------------------------------------------------------------- paper configs

def test_paper_parameter_counts_and_shapes():
    counts = {}
    for name in ("kitti64", "kitti128", "kitti256", "cityscapes128x256", "dance64", "dance128"):
        cfg = common.load_config(f"{name}.yaml")
        model = build_model(cfg)
        counts[name] = common.count_parameters(model)
        height, width = cfg.data.size
        # h_t and z_t are 128 x 8 x 8 (8 x 16 for 128x256) whatever the resolution; skips per block
        assert model.latent_size == ((8, 16) if name.startswith("cityscapes") else (8, 8))
        state = model.init_state(1)
        assert tuple(state.code.shape) == (1, 128, *model.latent_size)
        assert tuple(state.noise.shape) == (1, 128, *model.latent_size)
        assert [tuple(s.shape[2:]) for s in state.skips][0] == (height, width)
        assert state.lstm["predictor"][0][0].shape[1] == 256 and len(state.lstm["predictor"]) == 2
        assert model.decoder.blocks[-1][-1].out_channels == cfg.data.num_classes
    # the KITTI 64x64 model of tables B-E (ConvLSTM 3x3 with one conv over [x, h] per cell)
    assert counts["kitti64"] == 22_257_811
    assert counts["dance64"] == 22_257_811 + 6 * 64 * 9 + 6 * 64 * 9 + 6  # 25 classes: in, out convs
    assert counts["kitti64"] < counts["kitti128"] < counts["kitti256"]
    # the table-B encoder at 64x64: 64x2 -> pool -> 128x2 -> pool -> 256x3 -> pool -> 128
    model = build_model(common.load_config("kitti64.yaml"))
    widths = [[conv.out_channels for conv in block] for block in model.encoder.blocks]
    assert widths == [[64, 64], [128, 128], [256, 256, 256]] and model.encoder.to_h.out_channels == 128
    decoder = [[conv.out_channels for conv in block] for block in model.decoder.blocks]
    assert decoder == [[256, 256, 128], [128, 64], [64, 19]]
    assert model.decoder.blocks[0][0].in_channels == 128 + 256
    # one small forward of the real 64x64 model: log-probabilities over 19 classes
    out = model(random_labels(1, 3, 64, 64), n_past=2)
    assert out["out"].shape == (1, 2, 19, 64, 64) and out["kl"].shape == (1, 2)
    assert torch.allclose(out["out"].exp().sum(2), torch.ones(1, 2, 64, 64), atol=1e-4)


def test_bad_sizes_and_blocks_are_config_errors():
    with pytest.raises(common.ConfigError, match="data.size"):
        build_model(tiny_cfg(size=(48, 48)))
    with pytest.raises(common.ConfigError, match="encoder_blocks"):
        build_model(tiny_cfg("structure.encoder_blocks=[[16, 2]]"))
    with pytest.raises(common.ConfigError, match="variant"):
        build_model(tiny_cfg("structure.variant=gan"))


# ----------------------------------------------------------------------------- training

def test_training_reduces_loss_and_writes_outputs(tiny_drive, tmp_path):
    result = train_structure.main(tiny_args(tiny_drive, tmp_path, "--structure.steps=30",
                                            "--structure.eval_every=30"))
    losses = [v for _, v in result["history"]["train_loss"]]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses
    run_dir = tmp_path / "structure"
    assert (run_dir / "last.pt").is_file() and (run_dir / "last.yaml").is_file() and (run_dir / "loss.png").is_file()
    gif = run_dir / "samples" / "step0000030.gif"
    with Image.open(gif) as video:  # real time as the rollout's videos: synth-drive's 10 fps at stride 1 (was 5 fps)
        assert video.info["duration"] == pytest.approx(100, abs=10)
    step, metrics = result["history"]["val"][-1]
    assert step == 30 and 0 <= metrics["miou_free"] <= 1 and 0 <= metrics["miou_copy_last"] <= 1
    assert 0 <= metrics["motion_free_late"] <= 1 and 0 < metrics["motion_truth"] <= 1  # synthetic drives move


@pytest.mark.parametrize("variant", ["lstm", "cnn", "soft", "rgb"])
def test_ablation_variants_train_and_generate(tiny_drive, tmp_path, variant):
    # with every optional training trick on
    result = train_structure.main(tiny_args(tiny_drive, tmp_path, f"--structure.variant={variant}",
                                            "--structure.steps=2", "--structure.kl_balance=0.8",
                                            "--structure.born_weight=5", "--structure.z_to_decoder=true"))
    model = result["model"].eval()
    assert all(torch.isfinite(torch.tensor(v)) for _, v in result["history"]["train_loss"])
    if variant in ("lstm", "cnn"):
        assert not hasattr(model, "posterior") and all(v == 0 for _, v in result["history"]["train_kl"])
    if variant == "rgb":
        context = torch.randint(0, 256, (2, 3, 3, 32, 32), dtype=torch.uint8)
        assert model.generate(context, 4, samples=2).shape == (2, 2, 4, 3, 32, 32)
    else:
        out = model.generate(random_labels(2, 3, 32, 32), 4, samples=2)
        assert out.shape == (2, 2, 4, 32, 32) and out.dtype == torch.uint8 and int(out.max()) < 19



def test_kl_balance_trains_the_prior_faster_than_it_pulls_the_posterior():
    torch.manual_seed(0)
    model = build_model(tiny_cfg())
    frames = random_labels(2, 3, 32, 32)
    result = model(frames, n_past=1)
    assert torch.allclose(result["kl_prior"], result["kl"]) and torch.allclose(result["kl_posterior"], result["kl"])
    # each one-sided KL reaches only its own side's parameters
    prior_side = torch.autograd.grad(result["kl_prior"].sum(), list(model.posterior.parameters()) + list(model.prior.parameters()),
                                     allow_unused=True, retain_graph=True)
    n_posterior = len(list(model.posterior.parameters()))
    assert all(g is None for g in prior_side[:n_posterior]) and all(g is not None for g in prior_side[n_posterior:])
    posterior_side = torch.autograd.grad(result["kl_posterior"].sum(), list(model.prior.parameters()), allow_unused=True)
    assert all(g is None for g in posterior_side)
    # the loss: a * KL(sg q || p) + (1 - a) * KL(q || sg p), per frame, averaged over the batch

    def kl(values):
        return torch.tensor(values, requires_grad=True)

    parts = {"out": result["out"].detach(), "kl": kl([[0.5, 3.0], [1.0, 5.0]]), "kl_prior": kl([[0.5, 3.0], [1.0, 5.0]]),
             "kl_posterior": kl([[0.5, 3.0], [1.0, 5.0]])}
    cfg = tiny_cfg("structure.beta=1.0", "structure.kl_balance=0.75")
    losses = train_structure.clip_loss(model, parts, frames, cfg, 255)
    losses["loss"].backward()
    assert parts["kl_prior"].grad.tolist() == [[0.375, 0.375], [0.375, 0.375]]
    assert parts["kl_posterior"].grad.tolist() == [[0.125, 0.125], [0.125, 0.125]]
    assert parts["kl"].grad is None and losses["kl"] == pytest.approx(2.375)   # logged: the mean KL
    with pytest.raises(common.ConfigError, match="kl_balance"):
        train_structure.check_config(tiny_cfg("structure.kl_balance=1.0"), 1)


def test_mixture_prior_latent_samples_its_components_and_estimates_the_kl_without_bias():
    from structure_model import MixturePriorLatent, gaussian_kl
    latent = MixturePriorLatent(3, 4)                       # z of 3 channels; a prior of 4 Gaussians per cell
    torch.manual_seed(0)
    q, single = torch.randn(2, 6, 2, 2), torch.randn(2, 6, 2, 2)
    mu, logvar = single.chunk(2, 1)
    # four identical components are one Gaussian: the estimate at 10,000 posterior samples against the closed form
    same = torch.cat([mu.repeat(1, 4, 1, 1), logvar.repeat(1, 4, 1, 1), torch.randn(2, 4, 2, 2)], 1)
    draws = 5000
    z = latent.sample_posterior(q.repeat(draws, 1, 1, 1), torch.randn(2 * draws, 4, 2, 2))
    estimate = latent.kl(q.repeat(draws, 1, 1, 1), same.repeat(draws, 1, 1, 1), z).view(draws, 2).mean(0)
    exact = gaussian_kl(*q.chunk(2, 1), mu, logvar)
    assert torch.allclose(estimate, exact, rtol=0.02), (estimate, exact)
    # a prior sample picks component k at its weight: components 10 apart with tiny variances
    weights = torch.tensor([0.0, 1.0, 2.0, -1.0])
    means = (10.0 * torch.arange(4.0)).repeat_interleave(3).view(1, 12, 1, 1)
    prior = torch.cat([means, torch.full((1, 12, 1, 1), -20.0), weights.view(1, 4, 1, 1)], 1).expand(40000, -1, -1, -1)
    picked = (latent.sample_prior(prior, torch.randn(40000, 4, 1, 1)) / 10).round().long()
    assert (picked == picked[:, :1]).all()                 # every channel of a cell from the same component
    assert torch.allclose(torch.bincount(picked[:, 0].flatten(), minlength=4) / 40000.0, weights.softmax(0), atol=0.01)
    with pytest.raises(common.ConfigError, match="prior_components"):
        build_model(tiny_cfg("structure.latent=mixture", "structure.prior_components=1"))
    model = build_model(tiny_cfg("structure.latent=mixture", "structure.prior_components=4", "structure.z_pool=2")).eval()
    assert model.prior.to_stats.out_channels == 4 * (2 * model.z_channels + 1)
    out = model(random_labels(2, 5, 32, 32), 2, generator=torch.Generator().manual_seed(0))
    assert out["kl"].shape == (2, 4) and torch.isfinite(out["kl"]).all()
    context = random_labels(2, 3, 32, 32)
    first = model.generate(context, 6, samples=2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(first, model.generate(context, 6, samples=2, generator=torch.Generator().manual_seed(0)))


def test_z_to_decoder_feeds_z_into_every_decoder_block():
    torch.manual_seed(0)
    plain, direct = build_model(tiny_cfg()), build_model(tiny_cfg("structure.z_to_decoder=true"))
    z_channels = direct.z_channels
    assert [b[0].in_channels - z_channels for b in direct.decoder.blocks] == [b[0].in_channels for b in plain.decoder.blocks]
    g = torch.randn(2, direct.h_channels, 8, 8)
    _, skips = direct.encode_frames(random_labels(2, 32, 32))
    z_a, z_b = torch.randn(2, z_channels, 8, 8), torch.randn(2, z_channels, 8, 8)
    assert (direct.decode(g, skips, z_a) - direct.decode(g, skips, z_b)).abs().amax() > 1e-3
    _, skips = plain.encode_frames(random_labels(2, 32, 32))
    assert torch.equal(plain.decode(g, skips, z_a), plain.decode(g, skips, z_b))   # z only through g


def test_z_pool_draws_one_latent_cell_per_pooled_block():
    model = build_model(tiny_cfg("structure.latent=mixture", "structure.prior_components=4", "structure.z_pool=4",
                                 "structure.z_to_decoder=true")).eval()
    assert model.latent_size == (8, 8) and model.z_size == (2, 2)
    stats, _ = model.posterior(torch.randn(2, model.h_channels, 8, 8), model.posterior.lstm.zero_state(2, 8, 8, "cpu"))
    assert stats.shape[-2:] == (2, 2)
    frames = random_labels(2, 5, 32, 32)
    out = model(frames, 2, generator=torch.Generator().manual_seed(0))
    assert out["out"].shape == (2, 4, 19, 32, 32) and out["kl"].shape == (2, 4)
    state = model.init_state(2, samples=2)
    assert state.noise.shape[-2:] == (2, 2)
    # the predictor sees each cell's z repeated over its 4x4 block of LSTM cells
    seen = {}
    original = model.predictor.forward
    model.predictor.forward = lambda x, st: (seen.setdefault("x", x), original(x, st))[1]
    z = model.latent.sample_posterior(stats, torch.randn(2, model.z_channels, 2, 2))
    model.predict_g(torch.zeros(2, model.h_channels, 8, 8), z, model.predictor.zero_state(2, 8, 8, "cpu"))
    z_seen = seen["x"][:, model.h_channels:]
    assert torch.equal(z_seen, z.repeat_interleave(4, 2).repeat_interleave(4, 3))
    with pytest.raises(common.ConfigError, match="z_pool=3 must divide the latent grid"):
        build_model(tiny_cfg("structure.z_pool=3"))
    first = model.generate(frames[:, :2], 4, samples=2, generator=torch.Generator().manual_seed(0))
    assert first.shape == (2, 2, 4, 32, 32)


def test_born_weight_weighs_the_nll_of_born_pixels_only():
    model = build_model(tiny_cfg())
    frames = torch.zeros(1, 3, 32, 32, dtype=torch.uint8)
    frames[:, 1:, 10:12, 30:32] = 5          # class 5 enters at the right edge in frame 1 (4 born pixels) ...
    frames[:, 2, 10:12, 28:32] = 5           # ... and moves in by 2 px in frame 2: nothing born there
    torch.manual_seed(0)
    out = torch.randn(1, 2, 19, 32, 32).log_softmax(2)
    result = {"out": out, "kl": torch.zeros(1, 2), "kl_prior": torch.zeros(1, 2), "kl_posterior": torch.zeros(1, 2)}
    nll = -out.gather(2, frames[:, 1:].long().unsqueeze(2)).squeeze(2)           # (1, 2, 32, 32)
    born = torch.zeros_like(nll, dtype=torch.bool)
    born[0, 0, 10:12, 30:32] = True
    cfg = tiny_cfg()
    plain = train_structure.clip_loss(model, result, frames, cfg, 255)["loss"]
    weighted = train_structure.clip_loss(model, result, frames, cfg, 255, born_weight=30.0)["loss"]
    assert torch.allclose(plain, nll.mean((2, 3)).sum())
    assert torch.allclose(weighted, (nll * (1 + 30 * born.float())).mean((2, 3)).sum())


def test_born_weight_decays_to_its_floor():
    s = tiny_cfg("structure.born_weight=30", "structure.born_weight_decay=true", "structure.born_weight_floor=3").structure
    assert [train_structure.born_weight_at(s, used) for used in (0.0, 0.5, 1.0)] == [33.0, 18.0, 3.0]
    s = tiny_cfg("structure.born_weight=30").structure
    assert train_structure.born_weight_at(s, 0.9) == 30.0
    with pytest.raises(common.ConfigError, match="born_weight_floor"):
        tiny_cfg("structure.born_weight_floor=-1")


def test_own_inputs_replace_only_future_frames_by_the_models_prior_drafts():
    torch.manual_seed(0)
    cfg = tiny_cfg("structure.own_inputs=1.0", "structure.previous_frame=true", "structure.pooled_frames=true")
    model = build_model(cfg)
    frames = random_labels(2, 6, 32, 32, seed=3)
    state = torch.get_rng_state()
    inputs, pixel_weight = train_structure.own_inputs(model, frames, cfg)
    assert pixel_weight is None                              # false_birth_weight = 1: the plain NLL
    torch.set_rng_state(state)                               # the same prior draws, made here by hand
    # at the precision own_inputs drafts in (run.precision=auto: bf16 on a CPU with AVX512-BF16)
    with torch.no_grad(), common.autocast(frames.device, cfg.run.precision):
        drafts = model(frames, 3, prior_z=True)["out"].argmax(2).to(torch.uint8)
    # the context and the last frame (no later step reads it) are the truth, every other frame the draft
    assert torch.equal(inputs[:, :3], frames[:, :3]) and torch.equal(inputs[:, 3:5], drafts[:, 2:4])
    assert torch.equal(inputs[:, 5], frames[:, 5])
    assert not torch.equal(inputs[:, 3:5], frames[:, 3:5])
    off = tiny_cfg("structure.own_inputs=0.0")
    assert torch.equal(train_structure.own_inputs(build_model(off), frames, off)[0], frames)
    # fed the truth, forward() is the teacher-forced pass; fed drafts, the prior and the skips read them while the
    # posterior still reads the true targets, so the KL changes and the reconstruction of truth stays the target
    same = [model(frames, 3, generator=torch.Generator().manual_seed(1), inputs=x)["out"] for x in (frames, None)]
    assert torch.equal(*same)
    fed = model(frames, 3, generator=torch.Generator().manual_seed(1), inputs=inputs)
    assert not torch.allclose(fed["out"], same[0])
    with pytest.raises(common.ConfigError, match="own_inputs"):
        tiny_cfg("structure.own_inputs=1.5")
    with pytest.raises(common.ConfigError, match="own_inputs"):
        train_structure.check_config(tiny_cfg("structure.own_inputs=0.5", "structure.variant=rgb"), 1)


@pytest.mark.parametrize("options", [(), ("structure.latent=mixture", "structure.posterior_births=true",
                                             "structure.previous_frame=true", "structure.z_pool=2"),
                                     ("structure.variant=cnn",)])
def test_draft_is_the_prior_pass_argmax_on_the_frames_a_later_step_reads(options):
    """model.draft, own_inputs' lean pass (no posterior, no last step, no decoding of the context's targets),
    equals the full teacher-forced pass with the prior's z on frames n_past..T-2, for the same noise."""
    torch.manual_seed(0)
    model = build_model(tiny_cfg(*options))
    frames = random_labels(2, 7, 32, 32, seed=6)
    drafts, drafted = model.draft(frames, 3, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(frames, 3, generator=torch.Generator().manual_seed(2), prior_z=True)["out"].argmax(2)
    assert drafts.dtype == torch.uint8 and drafts.shape == (2, 3, 32, 32) and drafted.all()
    assert torch.equal(drafts, full[:, 2:5].to(torch.uint8))
    # a fraction drafts a subset (drawn after the pass's noise: the same drafts there) and keeps the true frames
    some, drafted = model.draft(frames, 3, generator=torch.Generator().manual_seed(2), fraction=0.5)
    assert drafted.any() and not drafted.all()
    assert torch.equal(some[drafted], drafts[drafted]) and torch.equal(some[~drafted], frames[:, 3:6][~drafted])


def test_fed_drafts_the_posterior_reads_every_true_target_with_the_frame_fed_before_it():
    """forward(inputs=...) encodes only the replaced frames a second time; the posterior must still read each true
    target with the (drafted) frame fed before it, births included: checked against encoding every frame."""
    torch.manual_seed(0)
    model = build_model(tiny_cfg("structure.posterior_births=true", "structure.previous_frame=true"))
    frames = random_labels(2, 6, 32, 32, seed=7)
    inputs = frames.clone()
    inputs[0, 3], inputs[1, 4] = random_labels(32, 32, seed=8), random_labels(32, 32, seed=9)
    recorded = []
    forward = model.posterior.forward
    model.posterior.forward = lambda x, state: (recorded.append(x.clone()), forward(x, state))[1]
    with torch.no_grad():
        model(frames, 3, inputs=inputs)
        previous = torch.cat([inputs[:, :1], inputs[:, :-1]], 1).flatten(0, 1)
        codes = model.encode_frames(frames.flatten(0, 1), previous)[0]
        expected = model.posterior_input(codes, frames.flatten(0, 1), previous).view(2, 6, -1, *model.latent_size)
    assert len(recorded) == 5
    for t, x in enumerate(recorded, start=1):
        torch.testing.assert_close(x, expected[:, t])


def test_false_birth_weight_weighs_the_targets_near_a_birth_the_truth_lacks():
    torch.manual_seed(0)
    cfg = tiny_cfg("structure.own_inputs=1.0", "structure.false_birth_weight=0.25")
    model = build_model(cfg)
    frames = random_labels(2, 6, 32, 32, seed=4)
    inputs, pixel_weight = train_structure.own_inputs(model, frames, cfg)
    # by hand, with a max-pool as the 3-px neighbourhood: output j reads input frame j
    expected = torch.ones(2, 5, 32, 32)
    for j in range(3, 5):                                    # the drafted input frames
        false = born_pixels(frames[:, j - 1], inputs[:, j], model.num_classes) & (inputs[:, j] != frames[:, j])
        near = F.max_pool2d(false.float().unsqueeze(1), 7, stride=1, padding=3).squeeze(1) > 0
        expected[:, j][near] = 0.25
    assert torch.equal(pixel_weight, expected) and (expected < 1).any() and (expected == 1).any()
    result = model(frames, 3, inputs=inputs)
    weighted = train_structure.clip_loss(model, result, frames, cfg, 255, pixel_weight=pixel_weight)["nll"]
    plain = train_structure.clip_loss(model, result, frames, cfg, 255)["nll"]
    assert weighted < plain
    with pytest.raises(common.ConfigError, match="false_birth_weight"):
        train_structure.check_config(tiny_cfg("structure.false_birth_weight=0.5"), 1)


def test_ddp_two_ranks_stay_identical(tiny_drive, tmp_path, master_port):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={master_port}",
               str(ROOT / "train_structure.py"), *tiny_args(tiny_drive, tmp_path, "--structure.steps=3")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "identical on all 2 ranks" in done.stdout + done.stderr
    payload = common.read_checkpoint(tmp_path / "structure" / "last.pt")
    assert payload["step"] == 3 and len(payload["rng"]) == 2


def test_resume_equals_uninterrupted(tiny_drive, tmp_path):
    def uninterrupted(folder):
        return train_structure.main(tiny_args(tiny_drive, tmp_path / folder, "--structure.steps=6"))["model"].state_dict()
    straight = uninterrupted("a")
    train_structure.main(tiny_args(tiny_drive, tmp_path / "b", "--structure.steps=3"))
    resumed = train_structure.main(tiny_args(tiny_drive, tmp_path / "b", "--structure.steps=6", "--resume"))
    assert resumed["step"] == 6 and straight
    assert_resumed_equal(straight, resumed["model"].state_dict(), lambda: uninterrupted("again"))


def test_mismatched_checkpoint_is_refused(tiny_drive, tmp_path):
    train_structure.main(tiny_args(tiny_drive, tmp_path, "--structure.steps=1"))
    path = tmp_path / "structure" / "last.pt"
    assert isinstance(load(path), torch.nn.Module)  # its own config
    with pytest.raises(common.CheckpointError, match=r"data.num_classes=19 but the config says data.num_classes=25"):
        load(path, tiny_cfg("data.num_classes=25"))
    with pytest.raises(common.CheckpointError, match=r"data.size=\[32, 32\] but the config says data.size=\[64, 64\]"):
        load(path, tiny_cfg(size=(64, 64)))
    with pytest.raises(common.CheckpointError, match="structure.lstm_mult"):
        train_structure.main(tiny_args(tiny_drive, tmp_path, "--structure.steps=2", "--structure.lstm_mult=0.25",
                                       "--resume"))
    # from the command line: one line naming the key, exit status 2, no traceback
    done = subprocess.run([sys.executable, str(ROOT / "train_structure.py"),
                           *tiny_args(tiny_drive, tmp_path, "--structure.steps=2", "--structure.h_channels=8",
                                      "--resume")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "structure.h_channels" in done.stderr and "Traceback" not in done.stderr


# ----------------------------------------------------------------------------- rollout step API

def deterministic_models():
    """(skip mode, untrained eval model) for the variants without a latent, lstm and cnn, in both skip modes."""
    for variant in ("lstm", "cnn"):
        for skip in ("previous", "last_context"):
            torch.manual_seed(0)
            yield skip, build_model(tiny_cfg(f"structure.variant={variant}", f"structure.skip={skip}")).eval()


def test_step_api_matches_teacher_forcing():
    """Deterministic variants: the first free-running frame equals the teacher-forced prediction of the same
    frame (same context), for both skip modes; the step API and forward() compute the same model."""
    for _, model in deterministic_models():
        clip = random_labels(2, 5, 32, 32, seed=1)
        with torch.no_grad():
            teacher = model(clip, n_past=4)["out"][:, 3].argmax(1)
        first = model.generate(clip[:, :4], 1)[:, 0, 0]
        assert torch.equal(first, teacher.to(torch.uint8))


def assert_two_free_frames_are_teacher_forced(model, clip):
    """Two free-running frames of a deterministic model after 4 context frames equal the teacher-forced
    predictions of the same frames (the second from the first generated one)."""
    generated = model.generate(clip[:, :4], 2)[:, 0]
    with torch.no_grad():
        first = model(clip, n_past=4)["out"][:, 3].argmax(1)
        fed = torch.cat([clip[:, :4], generated[:, :1], clip[:, 5:]], 1)
        second = model(fed, n_past=4)["out"][:, 4].argmax(1)
    assert torch.equal(generated[:, 0], first.to(torch.uint8)) and torch.equal(generated[:, 1], second.to(torch.uint8))


def test_previous_frame_encoding_matches_between_step_api_and_teacher_forcing():
    """structure.previous_frame: the first conv reads each frame with the one before it. Two free-running
    frames of a deterministic model equal the teacher-forced predictions of the same frames (the second
    from the first generated one, encoded with the last context frame as its previous one)."""
    torch.manual_seed(0)
    model = build_model(tiny_cfg("structure.variant=lstm", "structure.previous_frame=true")).eval()
    assert model.encoder.first_conv.in_channels == 2 * model.num_classes
    clip = random_labels(2, 6, 32, 32, seed=1)
    assert_two_free_frames_are_teacher_forced(model, clip)
    # the previous frame matters: the same frame after another one encodes differently
    code_a, _ = model.encode_frames(clip[:, 4], clip[:, 3])
    code_b, _ = model.encode_frames(clip[:, 4], clip[:, 2])
    assert not torch.equal(code_a, code_b)
    with pytest.raises(common.ConfigError, match="previous_frame"):
        build_model(tiny_cfg("structure.variant=soft", "structure.previous_frame=true"))


@pytest.mark.parametrize("radius", [1, 3])
def test_born_pixels_against_a_max_pool_reference(radius):
    """Births (a class absent from the earlier frame within `radius` px) against the direct definition, a
    max-pool of the earlier frame's one-hot, on sparse random label maps with void (255) pixels."""
    generator = torch.Generator().manual_seed(radius)
    earlier, later = (torch.randint(0, 12, (6, 17, 23), generator=generator) for _ in range(2))
    earlier[earlier < 8], later[later < 8] = 0, 0          # mostly class 0, so that many pixels are born
    earlier[earlier == 11], later[later == 11] = 255, 255
    onehot = (earlier.unsqueeze(1) == torch.arange(11).view(1, -1, 1, 1)).float()
    present = torch.nn.functional.max_pool2d(onehot, 2 * radius + 1, 1, radius)
    expected = (present.gather(1, later.clamp_max(10).unsqueeze(1)).squeeze(1) == 0) & (later < 11)
    born = born_pixels(earlier.to(torch.uint8), later.to(torch.uint8), 11, radius)
    assert born.any() and not born.all()
    assert torch.equal(born, expected)


def test_edge_births_mark_an_end_at_the_entry_edge_not_an_exit_nor_the_interior():
    """structure.edge_births: a cloud (1) whose last column entered at the left edge, its edge pixels back to sky
    (0) with sky 1 px above and below, is no birth but edge news; a bar (2) leaving at the right edge (sky follows
    from inward) is not; a class appearing inside is a birth either way. Then born_pixels(edges=True) against a
    direct per-pixel definition on random maps (every ring pixel whose class changed to one absent within 3 px
    inward, perpendicular to its edge; a corner is news along either edge)."""
    earlier = torch.zeros(1, 8, 12, dtype=torch.uint8)
    earlier[0, 3:5, 0:5] = 1                                  # the cloud, its end still at the edge
    earlier[0, 3:5, 9:12] = 2                                 # the bar, moving right out of the frame
    later = torch.zeros_like(earlier)
    later[0, 3:5, 1:6] = 1                                    # the cloud moved 1 px right, its edge pixels sky
    later[0, 3:5, 9:12] = 0                                   # the bar has left: sky, as inward of it (x = 8)
    later[0, 6, 6] = 3                                        # a class appearing inside
    plain, with_edges = born_pixels(earlier, later, 4), born_pixels(earlier, later, 4, edges=True)
    assert plain[0].nonzero().tolist() == [[6, 6]]
    assert with_edges[0].nonzero().tolist() == [[3, 0], [4, 0], [6, 6]]

    generator = torch.Generator().manual_seed(0)
    earlier, later = (torch.randint(0, 6, (5, 9, 11), generator=generator) for _ in range(2))
    later[later == 5] = 255                                   # void is never news
    height, width, reach = 9, 11, 4
    expected = born_pixels(earlier.to(torch.uint8), later.to(torch.uint8), 5)
    for n in range(5):
        for y in range(height):
            for x in range(width):
                new = int(later[n, y, x])
                if new == int(earlier[n, y, x]) or new >= 5:
                    continue
                inward = []  # per edge this pixel lies on, the pixels of `earlier` inward of it
                if x == 0:
                    inward.append(earlier[n, y, :reach].tolist())
                if x == width - 1:
                    inward.append(earlier[n, y, -reach:].tolist())
                if y == 0:
                    inward.append(earlier[n, :reach, x].tolist())
                if y == height - 1:
                    inward.append(earlier[n, -reach:, x].tolist())
                if any(new not in pixels for pixels in inward):
                    expected[n, y, x] = True
    marked = born_pixels(earlier.to(torch.uint8), later.to(torch.uint8), 5, edges=True)
    assert torch.equal(marked, expected) and (marked & ~born_pixels(earlier, later, 5)).any()

    # wired into the posterior's births and the born weight
    model = build_model(tiny_cfg("structure.posterior_births=true", "structure.edge_births=true"))
    frames = torch.zeros(1, 2, 32, 32, dtype=torch.uint8)
    frames[0, 0, 8:10, 0:6], frames[0, 1, 8:10, 1:7] = 7, 7   # class 7's end at the left edge
    code = torch.zeros(1, model.code_channels, *model.latent_size)
    births = model.posterior_input(code, frames[:, 1], frames[:, 0])[:, model.code_channels:]
    assert births.nonzero().tolist() == [[0, 0, 2, 0]]        # class 0 in the 4x4-pixel cell of rows 8-11, x 0-3
    out = torch.randn(1, 1, 19, 32, 32).log_softmax(2)
    result = {"out": out, "kl": torch.zeros(1, 1), "kl_prior": torch.zeros(1, 1), "kl_posterior": torch.zeros(1, 1)}
    nll = -out.gather(2, frames[:, 1:].long().unsqueeze(2)).squeeze(2)
    end = torch.zeros_like(nll)
    end[0, 0, 8:10, 0] = 1
    weighted = train_structure.clip_loss(model, result, frames, tiny_cfg(), 255, born_weight=30.0)["loss"]
    torch.testing.assert_close(weighted, (nll * (1 + 30 * end)).mean((2, 3)).sum())


def test_pooled_frames_carry_class_fractions_and_match_between_step_api_and_teacher_forcing():
    """structure.pooled_frames: the code carries each frame's class fractions per cell (against a one-hot
    average pool, void counting for no class), and the step API computes the same model as forward()."""
    torch.manual_seed(0)
    labels = random_labels(3, 1, 32, 32, seed=2)[:, 0]
    labels[0, :5, :5] = 255
    onehot = F.one_hot(labels.long().clamp_max(18), 19).permute(0, 3, 1, 2).float() * (labels < 19)[:, None]
    torch.testing.assert_close(class_fractions(labels, 19, 4), F.avg_pool2d(onehot, 4), rtol=0, atol=1e-7)
    model = build_model(tiny_cfg("structure.variant=lstm", "structure.previous_frame=true",
                                 "structure.pooled_frames=true")).eval()
    assert model.code_channels == model.h_channels + 2 * model.num_classes
    clip = random_labels(2, 6, 32, 32, seed=1)
    code, _ = model.encode_frames(clip[:, 4], clip[:, 3])
    factor = 32 // model.latent_size[0]
    torch.testing.assert_close(code[:, model.h_channels:model.h_channels + 19], class_fractions(clip[:, 4], 19, factor))
    torch.testing.assert_close(code[:, model.h_channels + 19:], class_fractions(clip[:, 3], 19, factor))
    assert_two_free_frames_are_teacher_forced(model, clip)
    stochastic = build_model(tiny_cfg("structure.pooled_frames=true"))
    assert stochastic.posterior.lstm.convs[0].in_channels == stochastic.code_channels + stochastic.posterior.lstm.width
    with pytest.raises(common.ConfigError, match="pooled_frames"):
        build_model(tiny_cfg("structure.variant=soft", "structure.pooled_frames=true"))


def test_posterior_births_mark_where_each_class_was_born_in_teacher_forcing_and_at_observe():
    """structure.posterior_births: the posterior's extra channels are 1 exactly at the (class, LSTM cell) pairs
    where that class was born (a hand-made frame pair), and observe() feeds the posterior what forward() does."""
    torch.manual_seed(0)
    model = build_model(tiny_cfg("structure.posterior_births=true", "structure.previous_frame=false")).eval()
    assert model.posterior.lstm.convs[0].in_channels == model.code_channels + 19 + model.posterior.lstm.width
    before = torch.zeros(1, 32, 32, dtype=torch.uint8)
    before[0, 20:24, 0:8] = 4                                # class 4 moves by 2 px: not born
    frame = before.clone()
    frame[0, 20:24, 0:8], frame[0, 20:24, 2:10] = 0, 4
    frame[0, 1:3, 0] = 7                                     # class 7 enters at the left edge: born
    frame[0, 30, 29:31] = 255                                # void: never born
    code = torch.zeros(1, model.code_channels, *model.latent_size)
    births = model.posterior_input(code, frame, before)[:, model.code_channels:]
    expected = torch.zeros_like(births)
    expected[0, 7, 0, 0] = 1                                 # 4x4-pixel cells (32 px, 8 cells)
    assert torch.equal(births, expected)
    recorded = []
    forward = model.posterior.forward
    model.posterior.forward = lambda x, state: (recorded.append(x.clone()), forward(x, state))[1]
    clip = random_labels(2, 4, 32, 32, seed=3)
    with torch.no_grad():
        model(clip, n_past=3)
    taught = recorded[:2]                                     # the posterior on frames 1 and 2
    recorded.clear()
    state = model.init_state(2)
    for t in range(3):
        model.observe(state, clip[:, t])
    assert len(recorded) == 2
    for a, b in zip(taught, recorded):
        torch.testing.assert_close(a, b)
        assert b[:, model.code_channels:].any()
    deterministic = build_model(tiny_cfg("structure.variant=lstm", "structure.posterior_births=true"))
    assert not deterministic.posterior_births and not hasattr(deterministic, "posterior")   # inert without a latent
    with pytest.raises(common.ConfigError, match="posterior_births"):
        build_model(tiny_cfg("structure.variant=rgb", "structure.posterior_births=true", "structure.previous_frame=false",
                             "structure.pooled_frames=false"))


def test_motion_teacher_is_the_teacher_forced_change_from_the_true_input_frame():
    model = build_model(tiny_cfg())
    batch = random_labels(2, 8, 32, 32, seed=5)
    cfg = tiny_cfg()

    def predicting(frames_out):  # a stand-in forward whose argmax is the given frames
        def forward(frames, n_past, generator=None, prior_z=False):
            out = F.one_hot(frames_out(frames).long(), 19).permute(0, 1, 4, 2, 3).float().clamp_min(1e-6).log()
            zeros = torch.zeros(frames.shape[0], frames.shape[1] - 1)
            return {"out": out, "kl": zeros, "kl_prior": zeros, "kl_posterior": zeros}
        return forward

    n_past, n_future = cfg.structure.n_past, cfg.structure.n_future
    model.forward = predicting(lambda frames: frames[:, :-1])     # always its input frame: no change
    assert train_structure.validate(model, batch, cfg, 255, 0)["motion_teacher"] == 0
    model.forward = predicting(lambda frames: frames[:, 1:])      # always the truth: the data's change
    truth = train_structure.changed_fraction(batch[:, n_past - 1:n_past + n_future])
    assert train_structure.validate(model, batch, cfg, 255, 0)["motion_teacher"] == pytest.approx(truth) and truth > 0.5


def test_budget_is_steps_or_the_clock_whichever_runs_out_first():
    def used(c, step, seconds, last=0.0):
        return train_structure.budget_used(c, step, seconds, last, "cpu")

    steps = tiny_cfg("structure.steps=100", "structure.log_every=10")
    assert used(steps, 49, 0.0)[0] == 0.49 and used(steps, 50, 0.0)[0] == 0.5
    timed = tiny_cfg("structure.steps=100", "structure.max_minutes=10", "structure.log_every=10")
    assert used(timed, 20, 301.0)[0] == pytest.approx(301 / 600)             # the clock, ahead of 20 / 100 steps
    assert used(timed, 21, 400.0, 0.5)[0] == 0.5                            # read every log_every steps only
    assert used(timed, 90, 1.0)[0] == 0.9                                   # steps, ahead of the clock


def test_samples_are_batched_and_skip_mode_freezes_skips():
    torch.manual_seed(0)
    model = build_model(tiny_cfg()).eval()
    context = random_labels(2, 3, 32, 32)
    out = model.generate(context, 5, samples=3, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 3, 5, 32, 32)
    # Samples draw their own z from the prior. An untrained decoder is nearly blind to z (its argmax maps
    # can coincide), so compare the predictor's continuous state, row b * samples + s = sample s of clip b.
    state = model.init_state(2, 3)
    generator = torch.Generator().manual_seed(0)
    for t in range(3):
        model.observe(state, context[:, t], generator)
    for _ in range(2):
        model.step(state, generator)
    hidden = state.lstm["predictor"][-1][0].view(2, 3, -1)
    for a, b in ((0, 1), (0, 2), (1, 2)):
        assert (hidden[:, a] - hidden[:, b]).abs().amax() > 1e-3
    frozen = build_model(tiny_cfg("structure.skip=last_context")).eval()
    frozen.load_state_dict(model.state_dict())
    state = frozen.init_state(2, 3)
    for t in range(3):
        frozen.observe(state, context[:, t])
    skips = [s.clone() for s in state.skips]
    for _ in range(3):
        frozen.step(state)
    assert all(torch.equal(a, b) for a, b in zip(skips, state.skips))
    with pytest.raises(RuntimeError, match="observe"):
        model.step(model.init_state(1))


def rss_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def live_tensors() -> int:
    gc.collect()
    with warnings.catch_warnings():  # isinstance on torch's deprecated module proxies warns
        warnings.simplefilter("ignore")
        return sum(1 for obj in gc.get_objects() if isinstance(obj, torch.Tensor))


def test_long_rollout_constant_memory_and_deterministic():
    """2000 steps: the state's buffers are the same tensors at the same addresses throughout (updated in
    place), the number of live tensors does not grow, the peak RSS grows by < 20 MB between step 200 and
    step 2000, and the same generator seed gives the same 2000 frames (a different seed does not)."""
    torch.manual_seed(0)
    model = build_model(tiny_cfg()).for_rollout()
    context = random_labels(1, 3, 32, 32)

    def rollout(seed, steps, watch=False):
        generator = torch.Generator().manual_seed(seed)
        state = model.init_state(1, 2)
        for t in range(3):
            model.observe(state, context[:, t], generator)
        addresses = [t.data_ptr() for t in state.tensors()]
        digest, counts = hashlib.sha256(), {}
        for step in range(steps):
            frame = model.step(state, generator)
            digest.update(frame.numpy().tobytes())
            if watch and step in (199, 1999):
                counts[step] = (live_tensors(), rss_peak_mb())
        assert [t.data_ptr() for t in state.tensors()] == addresses
        return digest.hexdigest(), counts

    first, counts = rollout(0, 2000, watch=True)
    assert counts[1999][0] <= counts[199][0], counts
    assert counts[1999][1] - counts[199][1] < 20, counts
    assert rollout(0, 2000)[0] == first
    assert rollout(0, 300)[0] != rollout(1, 300)[0]


def test_stream_yields_chunks_with_constant_shape():
    model = build_model(tiny_cfg()).eval()
    chunks = list(model.stream(random_labels(2, 3, 32, 32), 10, samples=2, chunk=4))
    assert [c.shape[2] for c in chunks] == [4, 4, 2] and all(c.shape[:2] == (2, 2) for c in chunks)


def test_triton_interpreter_kernels_match_torch_path():
    """With TRITON_INTERPRET=1 (tests/conftest.py) the fused kernels run on CPU: the step API gives the same
    frames through them as through the torch references."""
    if not (kernels.HAS_TRITON and kernels._dispatch.INTERPRET):
        pytest.fail("this test needs triton with TRITON_INTERPRET=1 set before import (tests/conftest.py does it)")
    torch.manual_seed(0)
    model = build_model(tiny_cfg("structure.variant=lstm", "structure.encoder_blocks=[[16, 1], [32, 1]]",
                                 size=(16, 16))).eval()
    context = random_labels(1, 3, 16, 16)
    reference = model.generate(context, 3)
    with kernels.using_backend("triton"):
        fused = model.generate(context, 3)
    assert torch.equal(reference, fused)


def test_generate_rejects_wrong_batch():
    model = build_model(tiny_cfg()).eval()
    state = model.init_state(2, 3)
    with pytest.raises(ValueError, match="batch"):
        model.observe(state, random_labels(4, 32, 32))


def test_time_limit_stops_with_checkpoint_and_validation(tiny_drive, tmp_path):
    result = train_structure.main(tiny_args(tiny_drive, tmp_path, "--structure.steps=50",
                                            "--structure.max_minutes=0.0001"))
    assert result["step"] == 1 and result["history"]["val"][-1][0] == 1
    assert common.read_checkpoint(tmp_path / "structure" / "last.pt")["step"] == 1


def test_the_shipped_checkpoint_loads_and_rolls_out():
    """checkpoints/synth_scroll_structure.pt, the recipe trained 12 minutes: its saved config rebuilds it
    (half widths, the posterior reading births and ends at the edges) and a rollout from a plain context moves."""
    model = load(ROOT / "checkpoints" / "synth_scroll_structure.pt")
    assert model.pooled_frames and model.previous_frame and model.posterior_births and model.edge_births
    assert model.z_channels == 8
    context = torch.zeros(1, 3, 32, 32, dtype=torch.uint8)
    context[:, :, 20:] = 3
    frames = model.generate(context, 8, 1, torch.Generator().manual_seed(0))[0, 0]
    assert frames.shape == (8, 32, 32) and (frames[1:] != frames[:-1]).any()
