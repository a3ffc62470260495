"""Train the boundary generator (edge_model.py): label map -> instance boundary map, one frame at a time
(docs/design.md, "Boundary generator"), against a PatchGAN on (one-hot label, boundary) with the
non-saturating GAN loss and feature matching x10, Adam (0, 0.9).

    python train_edge.py --cfg synth_drive.yaml
    python train_edge.py --cfg cityscapes128x256.yaml --edge.batch_size=8
    python train_edge.py --cfg synth_drive.yaml --resume            # continue runs/synth_drive/edge/last.pt
    torchrun --nproc 8 train_edge.py --cfg cityscapes128x256.yaml

Writes to RUN_DIR/edge/: last.pt (+ last.yaml), samples/step_NNNNNN.png (label | predicted | true),
loss.png, metrics.json (validation precision / recall / F1 and the class-boundary baseline).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import data
from data.clips import ClipDataset, fixed_batch, make_loader
from edge_model import (ARCH_KEYS, build_discriminator, build_model, instance_boundaries, one_hot, predict_boundaries,
                        true_boundaries)

# the discriminator's widths too: a training run resumed from a checkpoint with other values is refused
CHECK_KEYS = ARCH_KEYS + ["edge.d_width", "edge.d_layers"]


# ----------------------------------------------------------------------------- scores

def boundary_counts(predicted: torch.Tensor, truth: torch.Tensor, tolerance: int) -> np.ndarray:
    """Counts for precision/recall with a pixel tolerance, summable over batches.

    predicted, truth: (B, H, W) bool. A predicted pixel is correct when a true boundary pixel lies within
    `tolerance` pixels (chessboard distance), and a true pixel is found when a prediction does.
    Returns [correct predictions, predictions, found truths, truths].
    """
    def dilate(mask):
        if tolerance == 0:
            return mask
        return F.max_pool2d(mask[:, None].float(), 2 * tolerance + 1, stride=1, padding=tolerance)[:, 0] > 0
    return np.array([(predicted & dilate(truth)).sum().item(), predicted.sum().item(),
                     (truth & dilate(predicted)).sum().item(), truth.sum().item()], np.int64)


def scores_from_counts(counts) -> dict:
    """Precision, recall, F1 (0 when there is nothing to divide by)."""
    correct, predicted, found, truths = (int(c) for c in counts)
    precision = correct / predicted if predicted else 0.0
    recall = found / truths if truths else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


# ----------------------------------------------------------------------------- one training step

def set_requires_grad(module: nn.Module, flag: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(flag)


def train_step(generator, discriminator, opt_g, opt_d, scalers, labels, truth, cfg, step: int,
               finite: common.FiniteLosses) -> dict | None:
    """One discriminator then one generator update on a batch of frames; returns the losses (detached, on
    the device), or None when the discriminator loss was non-finite and run.on_nonfinite=skip skipped the step.

    labels (B, H, W) uint8, truth (B, H, W) bool. generator/discriminator may be DDP-wrapped; the
    generator's loss goes through the unwrapped discriminator with its weights frozen, so only the
    generator's gradients are averaged and the discriminator's DDP hooks never fire twice per step.
    """
    e, device, precision = cfg.edge, labels.device, cfg.run.precision
    onehot = one_hot(labels, cfg.data.num_classes)
    real = torch.cat([onehot, truth[:, None].float()], 1)
    d_plain = common.unwrap(discriminator)

    with common.autocast(device, precision):
        logits = generator(onehot)
        fake_edges = torch.sigmoid(logits.float())
        fake = torch.cat([onehot, fake_edges], 1)

    # Discriminator: real and fake pairs in one call (no batch statistics in the PatchGAN).
    set_requires_grad(d_plain, True)
    with common.autocast(device, precision):
        d_logits = discriminator(torch.cat([real, fake.detach()], 0))[-1].float()
        real_logits, fake_logits = d_logits.chunk(2)
        d_loss = 0.5 * (F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean())
    if not finite.ok(d_loss, step):
        return None
    opt_d.zero_grad(set_to_none=True)
    scalers["d"].scale(d_loss).backward()
    scalers["d"].step(opt_d)
    scalers["d"].update()

    # Generator: fool the updated discriminator and match its features of the real pair.
    set_requires_grad(d_plain, False)
    with common.autocast(device, precision):
        features = d_plain(torch.cat([real, fake], 0))
        g_adv = F.softplus(-features[-1].float().chunk(2)[1]).mean()
        g_fm = sum(F.l1_loss(f.float().chunk(2)[1], f.float().chunk(2)[0].detach()) for f in features)
        g_bce = F.binary_cross_entropy_with_logits(logits.float(), truth[:, None].float())
        g_loss = e.adv_weight * g_adv + e.fm_weight * g_fm + e.bce_weight * g_bce
    set_requires_grad(d_plain, True)
    losses = {"d": d_loss.detach(), "g_adv": g_adv.detach(), "g_fm": g_fm.detach(), "g_bce": g_bce.detach()}
    if not finite.ok(g_loss, step):
        return losses
    opt_g.zero_grad(set_to_none=True)
    scalers["g"].scale(g_loss).backward()
    scalers["g"].step(opt_g)
    scalers["g"].update()
    return losses


# ----------------------------------------------------------------------------- validation and samples

def validate(generator, batch: dict, cfg, chunk: int = 32) -> dict:
    """Precision / recall / F1 of predictions (threshold, tolerance) and of the class-boundary baseline,
    at the configured tolerance and at 0 pixels, on a batch of single-frame clips."""
    e = cfg.edge
    labels, instances = batch["label"][:, 0], batch["instance"][:, 0]
    totals = {name: np.zeros(4, np.int64) for name in ("model", "model_strict", "baseline", "baseline_strict")}
    for start in range(0, len(labels), chunk):
        lab = labels[start:start + chunk]
        truth = true_boundaries(lab, instances[start:start + chunk], e.boundary_source)
        predicted = predict_boundaries(generator, lab)[:, 0].cpu() >= e.threshold
        baseline = instance_boundaries(lab)  # class changes between 4-neighbours
        totals["model"] += boundary_counts(predicted, truth, e.tolerance)
        totals["model_strict"] += boundary_counts(predicted, truth, 0)
        totals["baseline"] += boundary_counts(baseline, truth, e.tolerance)
        totals["baseline_strict"] += boundary_counts(baseline, truth, 0)
    return {name: scores_from_counts(c) for name, c in totals.items()}


def write_samples(generator, batch: dict, cfg, palette, path) -> Path:
    """Rows of label | predicted boundary | true boundary for frames spread over the batch, upscaled so
    small frames stay visible."""
    rows = torch.from_numpy(np.linspace(0, len(batch["label"]) - 1, cfg.edge.sample_frames).round().astype(np.int64))
    labels = batch["label"][rows, 0]
    truth = true_boundaries(labels, batch["instance"][rows, 0], cfg.edge.boundary_source)
    predicted = predict_boundaries(generator, labels)[:, 0].cpu().numpy()
    panels = []
    for i in range(len(labels)):
        panels += [common.colorize(labels[i].numpy(), palette), common.boundary_to_rgb(predicted[i]),
                   common.boundary_to_rgb(truth[i].numpy())]
    scale = max(1, 128 // labels.shape[-2])
    panels = [p.repeat(scale, 0).repeat(scale, 1)[None] for p in panels]
    return common.write_image(path, common.tile(panels, columns=3)[0])


# ----------------------------------------------------------------------------- main

def open_datasets(cfg):
    """The dataset's meta and its train / val clips (single frames with their instance maps)."""
    meta = data.ensure_dataset(cfg)
    modalities = ("label", "instance")
    train = ClipDataset(cfg.data.root, "train", 1, 0, 1, modalities=modalities)
    val = ClipDataset(cfg.data.root, "val", 1, 0, 1, modalities=modalities)
    return meta, train, val


@common.releases_folder_locks
def main(argv=None) -> dict:
    cfg, args = common.parse_args(argv, aliases={"steps": "edge.steps"}, description=__doc__)
    e = cfg.edge
    if not e.enabled:
        raise common.ConfigError(f"edge.enabled is false in {cfg.config_file}: this dataset's pipeline uses no "
                                 f"boundaries; pass --edge.enabled=true to train the boundary generator anyway")
    height, width = cfg.data.size
    if height % 4 or width % 4 or min(height, width) < 2 ** (e.d_layers + 2):
        raise common.ConfigError(f"data.size={cfg.data.size}: both sides must be divisible by 4 and at least "
                                 f"{2 ** (e.d_layers + 2)} for edge.d_layers={e.d_layers}")
    dist = common.setup_distributed(cfg.run.device)
    device = dist.device
    common.seed_everything(cfg.run.seed)  # the same initial weights on every rank
    run_dir = common.lock_folder(Path(cfg.run.dir) / "edge")
    meta, train_set, val_set = common.main_rank_first(open_datasets, cfg)  # rank 0 generates / packs first

    generator, discriminator = build_model(cfg).to(device), build_discriminator(cfg).to(device)
    opt_g = torch.optim.Adam(generator.parameters(), lr=e.lr, betas=(e.beta1, e.beta2))
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=e.lr * e.d_lr_ratio, betas=(e.beta1, e.beta2))
    scalers = {"g": common.grad_scaler(device, cfg.run.precision), "d": common.grad_scaler(device, cfg.run.precision)}
    # Wall and process CPU seconds spent in training steps (CPU time is what a shared machine does not inflate).
    start_step, history, clock = 0, {}, {"train_seconds": 0.0, "train_cpu_seconds": 0.0}
    checkpoint = common.resume_path(args, run_dir)
    if checkpoint is not None:
        payload = common.load_checkpoint(checkpoint, modules={"generator": generator, "discriminator": discriminator},
                                         optimizers={"g": opt_g, "d": opt_d}, scalers=scalers, cfg=cfg,
                                         check_keys=CHECK_KEYS)
        start_step, history = payload["step"], payload["extra"].get("history", {})
        clock.update({k: payload["extra"].get(k, 0.0) for k in clock})
        common.log(f"resumed from {checkpoint} at step {start_step}")
    if dist.enabled:
        ddp_args = {"device_ids": [device.index]} if device.type == "cuda" else {}
        generator = torch.nn.parallel.DistributedDataParallel(generator, **ddp_args)
        discriminator = torch.nn.parallel.DistributedDataParallel(discriminator, **ddp_args)

    loader = make_loader(train_set, e.batch_size, cfg.run.seed, start_step, dist.rank, dist.world_size,
                         flip=e.flip, num_workers=common.loader_workers(cfg.run.num_workers, device))
    val_batch = fixed_batch(val_set, e.val_frames)
    n_params = common.count_parameters(generator)
    common.log(f"edge: {len(train_set)} train frames, {len(val_batch['label'])} val frames, generator "
               f"{n_params / 1e6:.2f}M params, {dist.world_size} process(es) x batch {e.batch_size}, device {device}, "
               f"{common.resolve_precision(cfg.run.precision, device)}")

    finite = common.FiniteLosses(cfg)

    def save(step):
        finite.check(step)  # no non-finite weights in a checkpoint
        common.save_checkpoint(run_dir / "last.pt", step=step, cfg=cfg,
                               modules={"generator": generator, "discriminator": discriminator},
                               optimizers={"g": opt_g, "d": opt_d}, scalers=scalers,
                               extra={"history": history, **clock})

    def log_validation(step):
        scores = validate(generator, val_batch, cfg)
        history.setdefault("val_f1", []).append((step, scores["model"]["f1"]))
        history.setdefault("baseline_f1", []).append((step, scores["baseline"]["f1"]))
        write_samples(generator, val_batch, cfg, meta["palette"], run_dir / "samples" / f"step_{step:06d}.png")
        common.plot_curves({k: history.get(k, []) for k in ("d", "g_adv", "g_fm", "g_bce", "val_f1")},
                           run_dir / "loss.png", title="boundary generator")
        m, b = scores["model"], scores["baseline"]
        common.log(f"step {step}: val P/R/F1 {m['precision']:.3f}/{m['recall']:.3f}/{m['f1']:.3f} "
                   f"(class-boundary baseline {b['precision']:.3f}/{b['recall']:.3f}/{b['f1']:.3f}, "
                   f"tolerance {e.tolerance}px)")
        return scores

    scores, window = None, {}
    generator.train(), discriminator.train()
    progress = common.progress(range(start_step, e.steps), initial=start_step, total=e.steps,
                               disable=not dist.is_main, desc="edge")
    done = start_step
    with common.StopSignal(cfg.run.sync_every) as stop:
        for step in progress:
            tick, cpu_tick = time.perf_counter(), time.process_time()
            batch = next(loader)
            labels = batch["label"][:, 0].to(device, non_blocking=True)
            truth = true_boundaries(labels, batch["instance"][:, 0].to(device, non_blocking=True), e.boundary_source)
            losses = train_step(generator, discriminator, opt_g, opt_d, scalers, labels, truth, cfg, step, finite)
            clock["train_seconds"] += time.perf_counter() - tick
            clock["train_cpu_seconds"] += time.process_time() - cpu_tick
            done = step + 1
            if losses is not None:  # kept on the device until a log point: no host read per step
                for k, v in losses.items():
                    window.setdefault(k, []).append(v)
            finite.check(done, due_only=True)
            if done % e.log_every == 0 and window:
                means = {k: float(torch.stack(values).float().mean()) for k, values in window.items()}
                for k, mean in means.items():
                    history.setdefault(k, []).append((done, mean))
                progress.set_postfix(d=f"{means['d']:.3f}", adv=f"{means['g_adv']:.3f}", fm=f"{means['g_fm']:.3f}",
                                     refresh=False)
                window = {}
            if dist.is_main and (done % e.eval_every == 0 or done == e.steps):
                scores = log_validation(done)
            if stop.should_stop(done):
                save(done)
                common.log(f"stopped at step {done}; resume with --resume")
                break
            if done % e.save_every == 0 or done == e.steps:
                save(done)
    progress.close()
    common.assert_ranks_identical(generator, "generator parameters")
    common.assert_ranks_identical(discriminator, "discriminator parameters")
    result = {"run_dir": run_dir, "step": done, **clock, "val": scores}
    if dist.is_main:
        if scores is None:
            scores = log_validation(done)
        result["val"] = scores
        common.log(f"at step {done}: {clock['train_seconds']:.1f}s wall, {clock['train_cpu_seconds']:.1f}s process CPU "
                   f"in training steps (this run and any it resumed; {torch.get_num_threads()} threads)")
        common.atomic_write_bytes(run_dir / "metrics.json", json.dumps(
            {"step": done, **clock, "tolerance": e.tolerance, "threshold": e.threshold,
             "val_frames": len(val_batch["label"]), **scores}, indent=2).encode())
    return result


if __name__ == "__main__":
    common.main_guard(main)
