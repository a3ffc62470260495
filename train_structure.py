"""Train the structure generator: SVG-extend on label maps (paper section 2.1, tables B-E; docs/design.md).

    python train_structure.py --cfg synth_drive.yaml                      # CPU, minutes
    python train_structure.py --cfg kitti64.yaml                          # the paper's KITTI 64x64 model
    torchrun --nproc 8 train_structure.py --cfg kitti256.yaml             # DDP, gradients averaged
    python train_structure.py --cfg kitti64.yaml --structure.variant=lstm --run.dir=runs/kitti64_lstm
    python train_structure.py --cfg kitti64.yaml --resume                 # continue runs/kitti64/structure/last.pt

Objective (paper eq. 1) per training clip of T frames, teacher forced (true frames in, z from the
posterior): sum over t = 1..T-1 of NLL(s_t) (mean over pixels) + beta * KL(q(z_t) || p(z_t)) (summed over
latent elements, mean over the batch). Ablations: structure.variant = lstm | cnn | soft | rgb.
Optional, off by default (docs/design.md, "Opening the latent"): kl_balance (the KL term), born_weight,
born_weight_decay, born_weight_floor and edge_births (the NLL of born pixels), own_inputs and
false_birth_weight (the model's own drafts fed back), latent=mixture, z_to_decoder and z_pool (the model).
Outputs in RUN_DIR/structure/: last.pt (+ last.yaml), samples/*.gif (context | prediction | truth),
loss.png, log.txt. The model classes and the rollout step API live in structure_model.py.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import common
import data
import kernels
from data.clips import ClipDataset, fixed_batch, make_loader
from evaluate import confusion_matrix, mean_iou
from structure_model import ARCH_KEYS, BIRTH_RADIUS, StructureModel, born_pixels, build_model, dilate


# ----------------------------------------------------------------------------- loss and metrics

def budget_used(cfg, step: int, seconds: float, clock_fraction: float, device) -> tuple[float, float]:
    """The fraction of the training budget used: of structure.steps, or of structure.max_minutes (the
    wall time of this process) when that is set and runs out sooner. The clock is read every log_every
    steps (clock_fraction carries the last reading) and averaged over ranks, so every rank sees the same
    value. Returns (fraction used, clock fraction)."""
    s = cfg.structure
    if s.max_minutes > 0 and step % s.log_every == 0:
        clock = torch.tensor([seconds / (60 * s.max_minutes)], device=device)
        clock_fraction = float(common.all_reduce_mean(clock))
    return max(step / max(1, s.steps), clock_fraction), clock_fraction


def born_weight_at(s, used: float) -> float:
    """The born pixels' weight w at a fraction `used` of the budget: decayed over the budget (born_weight_decay),
    the weight opens the latent early and leaves a calibrated decoder; born_weight_floor keeps born pixels
    weighted 1 + floor at the end, which moved rollouts faster (docs/opening_the_latent.md, runs BF3)."""
    return s.born_weight * ((1 - used) if s.born_weight_decay else 1.0) + s.born_weight_floor


def clip_loss(model: StructureModel, result: dict, frames: torch.Tensor, cfg, ignore_index: int,
              born_weight: float = 0.0, pixel_weight: torch.Tensor | None = None) -> dict:
    """Sum over steps of (per-step reconstruction + beta * KL); also the per-step means for logging.
    `born_weight` w weighs the NLL of pixels born in the target frame (structure_model.born_pixels) by 1 + w
    (docs/design.md, "Opening the latent"); validation uses w = 0, the model's true likelihood.
    `pixel_weight` (B, T-1, H, W), if given, multiplies the NLL of each target pixel (own_inputs' drafts)."""
    s = cfg.structure
    out, targets = result["out"], frames[:, 1:]
    if model.variant == "rgb":
        diff = out - (targets.float() / 127.5 - 1)
        per_pixel = diff.abs() if s.rgb_loss == "l1" else diff.square()
        recon = per_pixel.flatten(2).mean(2).mean(0)                            # (T-1,)
    else:
        targets = targets.long()
        nll = F.nll_loss(out.flatten(0, 1), targets.flatten(0, 1), ignore_index=ignore_index, reduction="none")
        if born_weight > 0:  # births are 0.2% of the pixels: without weight the decoder learns to use z late
            born = born_pixels(frames[:, :-1].flatten(0, 1), frames[:, 1:].flatten(0, 1), model.num_classes,
                               edges=model.edge_births)
            nll = nll * (1 + born_weight * born.float())
        if pixel_weight is not None:
            nll = nll * pixel_weight.flatten(0, 1)
        valid = (targets != ignore_index).flatten(0, 1)
        per_step_count = valid.flatten(1).sum(1).view(out.shape[:2]).sum(0).clamp_min(1)
        recon = nll.flatten(1).sum(1).view(out.shape[:2]).sum(0) / per_step_count  # (T-1,)
    kl = result["kl"].mean(0)                                                  # (T-1,)
    if s.kl_balance > 0:  # the prior learns to match the posterior faster than it pulls the posterior back
        penalised = (s.kl_balance * result["kl_prior"] + (1 - s.kl_balance) * result["kl_posterior"]).mean(0)
    else:
        penalised = kl
    loss = recon.sum() + s.beta * penalised.sum()
    return {"loss": loss, "nll": recon.detach().mean(), "kl": kl.detach().mean()}


def own_inputs(model: StructureModel, frames: torch.Tensor, cfg) -> tuple[torch.Tensor, torch.Tensor | None]:
    """frames with each future frame that a later step reads replaced, with probability structure.own_inputs,
    by the model's own prediction of it from the true past with z from the prior (a no-grad teacher-forced
    pass): what a rollout feeds back, so the model learns to continue from its own drafts. Also the NLL's
    pixel weights (B, T-1, H, W) when structure.false_birth_weight < 1, else None: the target pixels within
    BIRTH_RADIUS of a false birth in the draft before them (a pixel born in the draft, not in the truth)
    weigh false_birth_weight, so the model learns less to delete what it drew (docs/opening_the_latent.md, MW)."""
    s = cfg.structure
    with common.autocast(frames.device, cfg.run.precision):
        drafts, _ = model.draft(frames, s.n_past, fraction=s.own_inputs)    # frames n_past..T-2
    inputs = frames.clone()
    inputs[:, s.n_past:-1] = drafts
    if s.false_birth_weight == 1:
        return inputs, None
    # only drafted frames (n_past..T-2) can hold a false birth
    before, drafted = frames[:, s.n_past - 1:-2].flatten(0, 1), inputs[:, s.n_past:-1].flatten(0, 1)
    false_births = born_pixels(before, drafted, model.num_classes) & (drafted != frames[:, s.n_past:-1].flatten(0, 1))
    near = dilate(false_births.unsqueeze(1), BIRTH_RADIUS).view(frames.shape[0], -1, *frames.shape[2:])
    pixel_weight = torch.ones(frames.shape[0], frames.shape[1] - 1, *frames.shape[2:], device=frames.device)
    pixel_weight[:, s.n_past:][near] = s.false_birth_weight   # output j predicts frame j + 1 from input frame j
    return inputs, pixel_weight


def train_step(trained, optimizer, scaler, frames: torch.Tensor, cfg, step: int, ignore_index: int,
               born_weight: float, finite: common.FiniteLosses) -> dict:
    """One optimiser step on a batch of clips (B, T, H, W), teacher forced with z from the posterior;
    `trained` is the model or its DDP wrapper. Returns clip_loss's values (on the device); a non-finite
    loss skips the update or stops the run (run.on_nonfinite, through `finite`)."""
    s, model = cfg.structure, common.unwrap(trained)
    inputs, pixel_weight = own_inputs(model, frames, cfg) if s.own_inputs > 0 else (None, None)
    with common.autocast(frames.device, cfg.run.precision):
        result = trained(frames, s.n_past, inputs=inputs)
    losses = clip_loss(model, result, frames, cfg, ignore_index, born_weight, pixel_weight)
    optimizer.zero_grad(set_to_none=True)
    if finite.ok(losses["loss"], step):
        scaler.scale(losses["loss"]).backward()
        if s.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
        scaler.step(optimizer)
        scaler.update()
    return losses


def miou(pred: torch.Tensor, truth: torch.Tensor, num_classes: int) -> float:
    """evaluate.py's mIoU (classes present in truth or prediction, void skipped), pooled over all frames."""
    return mean_iou(confusion_matrix(pred.cpu().numpy(), truth.cpu().numpy(), num_classes))


def changed_fraction(frames: torch.Tensor, previous: torch.Tensor | None = None) -> float:
    """Fraction of pixels whose label differs from the previous frame: frames (B, T, H, W) against
    `previous` (the same shape), or, without it, each frame against the one before it."""
    if previous is None:
        frames, previous = frames[:, 1:], frames[:, :-1]
    return float((frames.to(previous.dtype) != previous).float().mean())


@torch.no_grad()
def validate(model: StructureModel, batch: torch.Tensor, cfg, ignore_index: int, seed: int) -> dict:
    """Teacher-forced NLL/KL (and mIoU of its argmax on the future frames), free-running mIoU over the first
    val_future predicted frames (one sample, prior-driven) and the copy-last-context baseline's mIoU."""
    s = cfg.structure
    model.eval()
    n_past, n_future = s.n_past, s.n_future
    generator = torch.Generator(batch.device).manual_seed(seed)
    result = model(batch[:, :n_past + n_future], n_past, generator=generator)
    losses = clip_loss(model, result, batch[:, :n_past + n_future], cfg, ignore_index)
    metrics = {"nll": float(losses["nll"]), "kl": float(losses["kl"])}
    if model.stochastic and model.variant != "rgb":
        # z from the prior instead of the posterior: the NLL it costs says how well the prior matches the
        # posterior, and the pixels whose argmax changes how much the decoder's output depends on z
        prior_run = model(batch[:, :n_past + n_future], n_past, generator=generator, prior_z=True)
        metrics["nll_prior_z"] = float(clip_loss(model, prior_run, batch[:, :n_past + n_future], cfg, ignore_index)["nll"])
        metrics["z_use"] = float((prior_run["out"].argmax(2) != result["out"].argmax(2)).float().mean())
    truth = batch[:, n_past:n_past + s.val_future]
    copy_last = batch[:, n_past - 1:n_past].expand_as(truth)
    predicted = model.generate(batch[:, :n_past], s.val_future, 1, generator)[:, 0]
    if model.variant == "rgb":
        def error(a, b):  # mean squared error in [-1, 1] units
            return float((a.float() - b.float()).square().mean() / 127.5 ** 2)

        metrics.update(mse_free=error(predicted, truth), mse_copy_last=error(copy_last, truth))
    else:
        teacher = result["out"][:, n_past - 1:].argmax(2)
        metrics.update(miou_teacher=miou(teacher, batch[:, n_past:n_past + n_future], model.num_classes),
                       miou_free=miou(predicted, truth, model.num_classes),
                       miou_copy_last=miou(copy_last, truth, model.num_classes))
        if s.val_motion_frames > 0:  # a rollout that settles into a fixed point stops changing: measure it
            long = model.generate(batch[:, :n_past], s.val_motion_frames, 1, generator)[:, 0]
            late = long[:, -max(2, s.val_motion_frames // 4):]
            # the teacher-forced prediction's change from its (true) input frame: below motion_truth, each
            # free-running step moves less than the last, the decay that ends in a fixed point
            metrics.update(motion_free_late=changed_fraction(late),
                           motion_teacher=changed_fraction(teacher, batch[:, n_past - 1:n_past + n_future - 1]),
                           motion_truth=changed_fraction(batch[:, n_past - 1:n_past + s.val_future]))
    model.train()
    return metrics


@torch.no_grad()
def write_samples(model: StructureModel, batch: torch.Tensor, cfg, meta: dict, path: Path, seed: int) -> Path:
    """A grid video, one row per clip: copy of the last context frame | context then prediction | truth; it plays in
    real time (the dataset's fps over the frame step), as the rollout's videos do."""
    s = cfg.structure
    model.eval()
    generator = torch.Generator(batch.device).manual_seed(seed)
    context = batch[:, :s.n_past]
    predicted = model.generate(context, s.sample_future, 1, generator)[:, 0]
    truth = batch[:, :s.n_past + s.sample_future]
    shown = torch.cat([context, predicted], 1)
    held = torch.cat([context, context[:, -1:].expand_as(predicted)], 1)

    def to_rgb(video):
        if model.variant == "rgb":
            return video.movedim(-3, -1).cpu().numpy()
        return common.colorize(video.cpu().numpy(), meta["palette"])

    videos = []
    for clip in range(batch.shape[0]):
        videos += [to_rgb(held[clip]), to_rgb(shown[clip]), to_rgb(truth[clip])]
    grid = common.tile(videos, columns=3)
    # a red bar under the grid marks predicted frames
    bar = np.zeros((grid.shape[0], 3, grid.shape[2], 3), np.uint8)
    bar[s.n_past:, :, :, 0] = 255
    model.train()
    return common.write_video(path, np.concatenate([grid, bar], 1), fps=common.real_time_fps(meta, s.stride), scale=2)


# ----------------------------------------------------------------------------- training

def open_datasets(cfg):
    """The dataset's meta and its train / val clips (val clips long enough for validation and samples)."""
    s = cfg.structure
    meta = data.ensure_dataset(cfg)
    modality = "rgb" if s.variant == "rgb" else "label"
    train = ClipDataset(cfg.data.root, "train", s.n_past, s.n_future, s.stride, modalities=(modality,))
    longest = max(s.n_future, s.val_future, s.sample_future)
    val = ClipDataset(cfg.data.root, "val", s.n_past, longest, s.stride, modalities=(modality,))
    return meta, train, val


def check_config(cfg, world_size: int) -> None:
    s = cfg.structure
    # numeric ranges are checked when the config is loaded (common.check_ranges)
    checks = [(s.rgb_loss in ("l1", "l2"), f"structure.rgb_loss must be l1 or l2, got {s.rgb_loss!r}"),
              (s.sample_format in ("gif", "mp4"), f"structure.sample_format must be gif or mp4, got {s.sample_format!r}"),
              (len(s.adam_betas) == 2, f"structure.adam_betas must be [beta1, beta2], got {s.adam_betas!r}"),
              (s.batch_size >= world_size and s.batch_size % world_size == 0,
               f"structure.batch_size={s.batch_size} must be a multiple of the {world_size} DDP ranks"),
              (s.own_inputs == 0 or s.variant not in ("soft", "rgb"),   # they feed back no label map to draft
               f"structure.own_inputs needs a variant that feeds back label maps, not {s.variant}"),
              (s.false_birth_weight == 1 or s.own_inputs > 0,
               f"structure.false_birth_weight={s.false_birth_weight} weighs pixels of drafts: it needs structure.own_inputs > 0")]
    for ok, message in checks:
        if not ok:
            raise common.ConfigError(message)


@common.releases_folder_locks
def main(argv=None) -> dict:
    cfg, args = common.parse_args(argv, description=__doc__)
    s = cfg.structure
    kernels.set_backend(cfg.run.kernel_backend)
    dist = common.setup_distributed(cfg.run.device)
    device = dist.device
    check_config(cfg, dist.world_size)
    run_dir = common.lock_folder(Path(cfg.run.dir) / "structure")
    meta, train_set, val_set = common.main_rank_first(open_datasets, cfg)  # rank 0 generates / packs first

    common.seed_everything(cfg.run.seed)
    # channels-last on CPU too: 0.37 against 0.43 s per step of synth_drive's model on one thread, 0.22 against 0.31 on two
    model = build_model(cfg).to(device).to_channels_last()
    modality = "rgb" if s.variant == "rgb" else "label"
    optimizer = torch.optim.Adam(model.parameters(), lr=s.lr, betas=tuple(s.adam_betas))
    scaler = common.grad_scaler(device, cfg.run.precision)
    ignore_index = int(meta.get("ignore_index", 255))

    start_step, history = 0, {"train_loss": [], "train_nll": [], "train_kl": [], "val": [], "seconds": 0.0}
    checkpoint = common.resume_path(args, run_dir)
    if checkpoint is not None:
        payload = common.load_checkpoint(checkpoint, modules={"structure": model}, optimizers={"adam": optimizer},
                                         scalers={"scaler": scaler}, cfg=cfg, check_keys=ARCH_KEYS,
                                         restore_rng=False)  # restored below, once the loader has drawn its seed
        start_step, history = payload["step"], payload["extra"]["history"]
        common.log(f"resumed from {checkpoint} at step {start_step}")
    else:  # each rank draws its own latent noise; weights are rank 0's (DDP broadcasts them)
        torch.manual_seed(cfg.run.seed * 1000 + dist.rank)
    common.log(f"structure generator ({s.variant}): {common.count_parameters(model):,} parameters, "
               f"{len(train_set)} training clips, device {device}, {dist.world_size} rank(s), "
               f"{common.resolve_precision(cfg.run.precision, device)}")
    trained = torch.nn.parallel.DistributedDataParallel(model) if dist.enabled else model

    loader = make_loader(train_set, s.batch_size // dist.world_size, cfg.run.seed, start_step, dist.rank,
                         dist.world_size, s.flip, common.loader_workers(cfg.run.num_workers, device))
    if checkpoint is not None:  # after make_loader, which draws from the global RNG, so resumed == uninterrupted
        states = payload["rng"]
        common.set_rng_state(states[dist.rank] if len(states) == dist.world_size else states[0])
    val_batch = fixed_batch(val_set, s.val_clips)[modality].to(device)
    sample_batch = fixed_batch(val_set, s.sample_clips)[modality].to(device)

    finite = common.FiniteLosses(cfg)

    def save(step):
        finite.check(step)  # no non-finite weights in a checkpoint
        common.save_checkpoint(run_dir / "last.pt", step=step, cfg=cfg, modules={"structure": model},
                               optimizers={"adam": optimizer}, scalers={"scaler": scaler}, extra={"history": history})

    def log_validation(step):
        if not dist.is_main:
            return
        metrics = validate(model, val_batch, cfg, ignore_index, cfg.run.seed)
        history["val"].append((step, metrics))
        common.log(f"step {step} val " + " ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        write_samples(model, sample_batch, cfg, meta, run_dir / "samples" / f"step{step:07d}.{s.sample_format}",
                      cfg.run.seed)
        curves = {"train loss (sum over steps)": history["train_loss"], "train nll / step": history["train_nll"],
                  "train kl / step": history["train_kl"]}
        for name in metrics:
            curves[f"val {name}"] = [(st, m[name]) for st, m in history["val"]]
        common.plot_curves(curves, run_dir / "loss.png", title=f"structure generator ({s.variant})")
        with open(run_dir / "log.txt", "a") as f:
            f.write(f"step {step} " + " ".join(f"{k}={v:.5f}" for k, v in metrics.items()) + "\n")

    step, started = start_step, time.time()
    loop_start, time_up, clock_fraction, used = started, False, 0.0, 0.0
    model.train()
    bar = common.progress(total=s.steps, initial=start_step, disable=not dist.is_main, desc="structure")
    with common.StopSignal(cfg.run.sync_every) as stop:
        while step < s.steps:
            if s.born_weight_decay:  # the only reader of the budget (and the clock)
                used, clock_fraction = budget_used(cfg, step, time.time() - loop_start, clock_fraction, device)
            born_weight = born_weight_at(s, used)
            frames = next(loader)[modality].to(device, non_blocking=True)
            losses = train_step(trained, optimizer, scaler, frames, cfg, step, ignore_index, born_weight, finite)
            step += 1
            finite.check(step, due_only=True)
            bar.update(1)
            if step % s.log_every == 0:
                values = {k: float(common.all_reduce_mean(v.detach().reshape(1))) for k, v in losses.items()}
                for k in ("loss", "nll", "kl"):
                    history[f"train_{k}"].append((step, values[k]))
                bar.set_postfix(loss=f"{values['loss']:.3f}", nll=f"{values['nll']:.3f}", kl=f"{values['kl']:.2f}",
                               refresh=False)
            if s.max_minutes > 0 and not stop.requested and time.time() - loop_start > 60 * s.max_minutes:
                common.log(f"step {step}: structure.max_minutes={s.max_minutes} reached; stopping")
                stop.requested = time_up = True  # any rank's flag stops all ranks (should_stop reduces it)
            stopping = stop.should_stop(step)
            if step % s.eval_every == 0 or step == s.steps or (stopping and time_up):
                log_validation(step)
            if step % s.save_every == 0 or step == s.steps or stopping:
                history["seconds"] += time.time() - started
                started = time.time()
                save(step)
            if stopping:
                break
    bar.close()
    common.assert_ranks_identical(model)
    common.log(f"structure generator: step {step}, {history['seconds']:.0f} s of training in total; outputs in {run_dir}")
    return {"run_dir": run_dir, "step": step, "history": history, "model": model}


if __name__ == "__main__":
    common.main_guard(main)
