"""Long-term rollout: context clips -> thousands of future label maps -> (boundaries) -> RGB, streamed to disk.

    python rollout.py --frames 2500                                  # the default config's trained models
    python rollout.py --cfg kitti64.yaml --frames 2500 --samples 4 --clips 8
    torchrun --nproc 8 rollout.py --cfg kitti64.yaml --frames 2500   # clips split over GPUs

Loads the structure (+ boundary) + image generator checkpoints of the run (or the ones named by
rollout.*_ckpt; without a trained structure generator, the one shipped in checkpoints/ for the run
folder's name, label maps only unless an image generator is trained), takes `clips` context clips
from a split, draws `samples` futures per clip as one batch, and steps all of them together:
structure.step -> predict_boundaries -> image.step. One step is one step of the generators' training
clips (structure.stride = image.stride source frames; the context, the kept ground truth and the
protocol use the same step). Frames are buffered on the device for `chunk` steps, then written as
uint8 chunks (data/rollout_io.py), so memory is flat in --frames. After each chunk the recurrent state
and the noise generator are saved, so an interrupted rollout (Ctrl-C, SIGTERM, a crash) resumes from
its last complete chunk and gives exactly the frames the uninterrupted run would have. The hot loop
is inference-only, shape-static and free of host synchronisation; on CUDA one step is captured in a
CUDA graph.
"""
from __future__ import annotations

import itertools
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch

import common
import edge_model
import image_model
import kernels
import structure_model
from data import ensure_dataset, list_sequences, load_sequence_modalities
from data.layout import DatasetError
from data.rollout_io import RolloutWriter, read_rollout

ALIASES = {"frames": "rollout.frames", "samples": "rollout.samples", "clips": "rollout.clips",
           "split": "rollout.split", "out": "rollout.out", "chunk": "rollout.chunk"}


# ----------------------------------------------------------------------------- loading the generators

def checkpoint_path(cfg, key: str, component: str) -> Path:
    named = cfg.rollout[key]
    return Path(named) if named else Path(cfg.run.dir) / component / "last.pt"


def shipped_structure(cfg) -> Path | None:
    """checkpoints/<run folder name>_structure.pt, the long-trained generator that ships with the repository,
    when neither rollout.structure_ckpt nor a trained RUN_DIR/structure/last.pt names another."""
    if cfg.rollout.structure_ckpt or checkpoint_path(cfg, "structure_ckpt", "structure").exists():
        return None
    shipped = common.ROOT / "checkpoints" / f"{Path(cfg.run.dir).name}_structure.pt"
    return shipped if shipped.exists() else None


class Pipeline:
    """The generators behind one step with fixed buffers: call init() with the context, then step()."""

    def __init__(self, structure, image=None, edge=None, device=torch.device("cpu"), channels_last: bool = True,
                 stride: int = 1):
        self.device, self.structure, self.image, self.edge = device, structure, image, edge
        self.stride = stride  # frames of the source video between two rollout steps, as the models trained
        self.structure.for_rollout(channels_last=channels_last)
        self.variant = structure.variant
        self.tau = image.tau if image is not None else 0
        if image is not None and image.use_edges and edge is None:
            raise common.ConfigError("the image generator was trained with boundary maps: a boundary generator is needed")
        self.modalities = ["rgb"] if self.variant == "rgb" else ["label"] + (["rgb"] if image is not None else [])
        # what the context clips must hold: label maps always, RGB only where a generator reads it
        self.context_modalities = ("label", "rgb") if "rgb" in self.modalities else ("label",)
        self.models = {name: model.checkpoint_identity for name, model in
                       (("structure", structure), ("edge", edge), ("image", image))
                       if model is not None and hasattr(model, "checkpoint_identity")}

    @classmethod
    def from_checkpoints(cls, cfg, device) -> "Pipeline":
        structure_path, shipped = checkpoint_path(cfg, "structure_ckpt", "structure"), shipped_structure(cfg)
        if shipped is not None:
            common.log(f"no {structure_path}: rolling out the shipped {shipped}")
        structure = structure_model.load(shipped or structure_path, cfg, device)
        image = edge = None
        image_path = checkpoint_path(cfg, "image_ckpt", "image")
        if shipped is not None and not cfg.rollout.image_ckpt and not image_path.exists():
            common.log(f"no {image_path}: label maps only")
        elif structure.variant != "rgb" and cfg.rollout.image_ckpt != "none":
            image = image_model.load(image_path, cfg, device)
            if image.use_edges:
                edge = edge_model.load(checkpoint_path(cfg, "edge_ckpt", "edge"), cfg, device)
        # one step of the rollout is one step of the structure generator's training clips; the image
        # generator must have learnt motion at the same frame step
        stride = structure.trained_config.structure.stride
        if image is not None and image.trained_config.image.stride != stride:
            raise common.ConfigError(
                f"the structure generator trained at structure.stride={stride}, the image generator at "
                f"image.stride={image.trained_config.image.stride}: their frame steps must match")
        return cls(structure, image, edge, device, cfg.rollout.channels_last, stride)

    def init(self, context_labels: torch.Tensor, context_rgb: torch.Tensor | None, samples: int, generator):
        """context_labels (B, n_past, H, W) uint8, context_rgb (B, n_past, 3, H, W) uint8 (None when neither
        the structure variant nor an image generator uses RGB: see context_modalities)."""
        self.sstate = self.structure.init_state(context_labels.shape[0], samples, self.device)
        frames = context_rgb if self.variant == "rgb" else context_labels  # uint8: observe() scales RGB itself
        for t in range(frames.shape[1]):
            self.structure.observe(self.sstate, frames[:, t], generator)
        self.istate = None
        if self.image is not None:
            labels = context_labels[:, -self.tau:].repeat_interleave(samples, 0)
            rgb = (context_rgb[:, -self.tau:].float() / 127.5 - 1).repeat_interleave(samples, 0)
            edges = self._edges(labels) if self.edge is not None else None
            self.istate = self.image.init_state(rgb, labels, edges)

    def _edges(self, labels):
        return edge_model.predict_boundaries(self.edge, labels)

    @torch.inference_mode()
    def step(self, generator) -> dict:
        """One future frame for every row: uint8 label (R, H, W) and/or RGB (R, H, W, 3)."""
        out = {}
        frame = self.structure.step(self.sstate, generator)
        if self.variant == "rgb":
            out["rgb"] = frame.permute(0, 2, 3, 1)
            return out
        out["label"] = frame
        if self.image is not None:
            edges = self._edges(frame) if self.edge is not None else None
            rgb, new_state = self.image.step(self.istate, frame, edges)
            for key, value in new_state.items():  # in place: the state stays one set of buffers
                self.istate[key].copy_(value)
            out["rgb"] = ((rgb.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
        return out

    def state_tensors(self) -> list[torch.Tensor]:
        return _tensors_of(self.sstate) + _tensors_of(self.istate)


def _tensors_of(obj, seen=None) -> list[torch.Tensor]:
    """Every tensor reachable from a state object, in a fixed order (for snapshots and resume)."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        return [obj]
    if obj is None or id(obj) in seen or isinstance(obj, (int, float, str, bool)):
        return []
    seen.add(id(obj))
    if isinstance(obj, dict):
        return [t for k in sorted(obj, key=str) for t in _tensors_of(obj[k], seen)]
    if isinstance(obj, (list, tuple)):
        return [t for item in obj for t in _tensors_of(item, seen)]
    if hasattr(obj, "__dict__"):
        return _tensors_of(vars(obj), seen)
    return []


# ----------------------------------------------------------------------------- context clips

def pick_clips(cfg, meta, n_past: int, stride: int = 1, modalities=("label", "rgb")) -> list[dict]:
    """`clips` context windows of n_past frames `stride` apart, spread over the split's sequences
    (round-robin, then later starts), each with up to rollout.truth_frames true future frames at the same
    step, of `modalities` (structure-only data has no RGB to read)."""
    sequences = list_sequences(cfg.data.root, cfg.rollout.split)
    clips = []
    for i in range(cfg.rollout.clips):
        seq_dir = sequences[i % len(sequences)]
        arrays = load_sequence_modalities(seq_dir, modalities, meta)
        length, span = arrays["label"].shape[0], (n_past - 1) * stride + 1
        if length < span:
            raise DatasetError(f"{seq_dir}: {length} frames, fewer than rollout.n_past={n_past} at stride {stride}")
        rounds = math.ceil(cfg.rollout.clips / len(sequences))
        start = (i // len(sequences)) * (length - span) // max(rounds, 1)
        future = start + n_past * stride  # the first frame the rollout predicts
        truth_end = min(future + cfg.rollout.truth_frames * stride, length)
        context = {m: np.array(arrays[m][start:start + span:stride]) for m in modalities}
        truth = ({m: np.array(arrays[m][future:truth_end:stride]) for m in modalities}
                 if truth_end > future else None)
        clips.append({"sequence": seq_dir.name, "start": int(start), "context": context, "truth": truth})
    return clips


# ----------------------------------------------------------------------------- the loop

class StepRunner:
    """Runs Pipeline.step eagerly, or replays it from a CUDA graph captured once per group."""

    def __init__(self, pipeline: Pipeline, generator, use_graph: bool, precision: str):
        self.pipeline, self.generator, self.precision = pipeline, generator, precision
        self.graph, self.static_out = None, None
        if use_graph:
            self._capture()

    def _eager(self):
        with common.autocast(self.pipeline.device, self.precision):
            return self.pipeline.step(self.generator)

    def _capture(self):
        # Warm-up runs advance the state and the generator, so both are restored before capture.
        state = self.pipeline.state_tensors()
        snapshot = [t.clone() for t in state]
        rng = self.generator.get_state()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._eager()
        torch.cuda.current_stream().wait_stream(stream)
        for t, saved in zip(state, snapshot):
            t.copy_(saved)
        self.generator.set_state(rng)
        self.graph = torch.cuda.CUDAGraph()
        self.graph.register_generator_state(self.generator)
        with torch.cuda.graph(self.graph):
            self.static_out = self._eager()
        for t, saved in zip(state, snapshot):  # capture records kernels; keep the state exact anyway
            t.copy_(saved)
        self.generator.set_state(rng)

    def __call__(self) -> dict:
        if self.graph is None:
            return self._eager()
        self.graph.replay()
        return self.static_out


def plan_groups(num_clips: int, samples: int, batch: int, world_size: int = 1) -> list[tuple[list, list]]:
    """The batches rolled out together, as (clip ids, sample ids): `batch // samples` clips with all their
    samples each; with fewer of those than ranks, the largest is halved (by clips, then by samples) until
    every rank has one or none can be split, so that no rank waits behind a barrier while another rolls out
    everything. A batch's noise is seeded by its first clip and sample: the frames depend on this grouping
    (rollout.batch and, when it splits, the number of ranks), and on one rank they do not depend on the rank count."""
    per_group = max(1, batch // samples)
    groups = [(list(range(i, min(i + per_group, num_clips))), list(range(samples)))
              for i in range(0, num_clips, per_group)]
    while len(groups) < world_size:
        i = max(range(len(groups)), key=lambda k: len(groups[k][0]) * len(groups[k][1]))
        clip_ids, sample_ids = groups[i]
        if len(clip_ids) > 1:
            half = (len(clip_ids) + 1) // 2
            groups[i:i + 1] = [(clip_ids[:half], sample_ids), (clip_ids[half:], sample_ids)]
        elif len(sample_ids) > 1:
            half = (len(sample_ids) + 1) // 2
            groups[i:i + 1] = [(clip_ids, sample_ids[:half]), (clip_ids, sample_ids[half:])]
        else:
            break
    return groups


@torch.inference_mode()
def run_group(cfg, pipeline: Pipeline, writer: RolloutWriter, clip_ids: list, sample_ids: list, clips: list,
              state_dir: Path, progress, stop: common.StopSignal) -> bool:
    """Roll out one batch (clips x samples) to the end (or until a stop signal); returns True when complete."""
    r, device = cfg.rollout, pipeline.device
    frames, samples, chunk = r.frames, len(sample_ids), r.chunk
    first = (clip_ids[0], sample_ids[0])
    state_path = state_dir / f"group_{first[0]:04d}_{first[1]:03d}.pt"
    generator = torch.Generator(device).manual_seed(cfg.run.seed * 1_000_003 + first[0] + 7919 * first[1])
    context_labels = torch.stack([torch.from_numpy(clips[c]["context"]["label"]) for c in clip_ids]).to(device)
    context_rgb = (torch.stack([torch.from_numpy(clips[c]["context"]["rgb"]).permute(0, 3, 1, 2)
                                for c in clip_ids]).to(device) if "rgb" in clips[clip_ids[0]]["context"] else None)
    pipeline.init(context_labels, context_rgb, samples, generator)
    start = 0
    saved = None
    if state_path.is_file():
        try:
            saved = torch.load(state_path, map_location="cpu", weights_only=True)
        except Exception as e:  # a state cut short (disk full, a kill outside its atomic write) only costs time
            common.log(f"{state_path} is unreadable ({type(e).__name__}); recomputing this group from frame 0")
    # The state is saved after its chunk is on disk; if chunks were lost since, or the state is of another
    # grouping (another rollout.batch or number of ranks), recompute from frame 0.
    if (saved is not None and saved.get("rows") == [clip_ids, sample_ids]
            and 0 < saved["frame"] <= writer.frames_done(clip_ids, sample_ids)):
        start = int(saved["frame"])
        for t, value in zip(pipeline.state_tensors(), saved["tensors"]):
            t.copy_(value)
        generator.set_state(saved["generator"])
        progress.update(start * len(clip_ids) * samples)
    if start >= frames:
        return True
    runner = StepRunner(pipeline, generator, device.type == "cuda" and r.cuda_graph, cfg.run.precision)
    rows = len(clip_ids) * samples
    height, width = cfg.data.size
    buffers = {"label": torch.empty(rows, chunk, height, width, dtype=torch.uint8, device=device),
               "rgb": torch.empty(rows, chunk, height, width, 3, dtype=torch.uint8, device=device)}
    for chunk_start in range(start, frames, chunk):
        length = min(chunk, frames - chunk_start)
        for i in range(length):
            for modality, frame in runner().items():
                buffers[modality][:, i].copy_(frame)
        # one device->host transfer per chunk; the steps above never wait on the host
        arrays = {m: buffers[m][:, :length].cpu().numpy().reshape(len(clip_ids), samples, length, *buffers[m].shape[2:])
                  for m in writer.modalities}
        writer.write_chunk(chunk_start, clips=clip_ids, samples=sample_ids, **arrays)
        common.atomic_write_bytes(state_path, _serialise({
            "frame": chunk_start + length, "rows": [clip_ids, sample_ids], "tensors": [t.cpu() for t in pipeline.state_tensors()],
            "generator": generator.get_state()}))
        progress.update(rows * length)
        if stop.requested:
            return chunk_start + length >= frames
    return True


def _serialise(obj) -> bytes:
    import io
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def video_fps(cfg, meta: dict, stride: int) -> float:
    """rollout.video_fps, or real time (0): one rollout frame spans `stride` frames of the dataset's fps."""
    return cfg.rollout.video_fps or common.real_time_fps(meta, stride)


def write_videos(cfg, out_dir: Path, rows: list, meta: dict) -> None:
    """Per (clip, sample) of `rows`: colourised labels, RGB and a side-by-side grid (context frames first),
    streamed."""
    reader = read_rollout(out_dir)
    fps = video_fps(cfg, meta, reader.protocol["stride"])
    scale, ext = cfg.rollout.video_scale, cfg.rollout.video_format
    palette = meta["palette"]
    for c, sample_ids in itertools.groupby(rows, key=lambda row: row[0]):
        context = {m: reader.context(c, m) for m in reader.modalities}
        for _, s in sample_ids:
            folder = out_dir / f"clip_{c:04d}" / f"sample_{s:03d}"

            def frames_of(modality):
                yield from context[modality]
                for begin in range(0, reader.num_frames, reader.chunk):
                    yield from reader.frames(c, s, modality, begin, min(begin + reader.chunk, reader.num_frames))

            def as_rgb(modality, frame):
                return common.colorize(frame, palette) if modality == "label" else frame

            for modality in reader.modalities:
                common.write_video_stream(folder / f"{modality}.{ext}",
                                          (as_rgb(modality, f) for f in frames_of(modality)), fps, scale)
            if len(reader.modalities) > 1:
                streams = [frames_of(m) for m in reader.modalities]
                grid = (common.tile([as_rgb(m, f)[None] for m, f in zip(reader.modalities, row)])[0]
                        for row in zip(*streams))
                common.write_video_stream(folder / f"grid.{ext}", grid, fps, scale)


@common.releases_folder_locks
def main(argv=None) -> Path:
    cfg, _ = common.parse_args(argv, aliases=ALIASES, description=__doc__)
    dist = common.setup_distributed(cfg.run.device)
    kernels.set_backend(cfg.run.kernel_backend)
    common.seed_everything(cfg.run.seed)
    r = cfg.rollout
    meta = ensure_dataset(cfg)
    pipeline = Pipeline.from_checkpoints(cfg, dist.device)
    if pipeline.image is not None and r.n_past < pipeline.tau:
        raise common.ConfigError(f"rollout.n_past={r.n_past} is shorter than the image generator's tau={pipeline.tau}")
    clips = pick_clips(cfg, meta, r.n_past, pipeline.stride, pipeline.context_modalities)
    out_dir = Path(r.out or Path(cfg.run.dir) / "rollout")
    fresh = not out_dir.exists()
    common.lock_folder(out_dir)
    try:
        return roll_out(cfg, dist, meta, pipeline, clips, out_dir)
    except BaseException:
        if fresh and dist.is_main and not any(out_dir.glob("clip_*/sample_*/*/*.npy")):
            shutil.rmtree(out_dir, ignore_errors=True)  # a failed first start leaves no folder of stray files
        raise


def roll_out(cfg, dist, meta, pipeline: Pipeline, clips: list, out_dir: Path) -> Path:
    """Write the protocol and contexts, step every clip group to the end in chunks, then the videos."""
    r = cfg.rollout
    writer_args = dict(dataset_root=cfg.data.root, split=r.split, n_past=r.n_past, frames=r.frames,
                       samples=r.samples, clips=[{"sequence": c["sequence"], "start": c["start"]} for c in clips],
                       size=cfg.data.size, num_classes=cfg.data.num_classes, chunk=r.chunk, seed=cfg.run.seed,
                       stride=pipeline.stride,
                       modalities=pipeline.modalities, models=pipeline.models,
                       extra={"structure_variant": pipeline.variant, "edge": pipeline.edge is not None})
    if dist.is_main:  # the folder, protocol and contexts once (a few frames per clip)
        writer = RolloutWriter(out_dir, **writer_args)
        common.save_config(cfg, out_dir / "config.yaml")
        for c, clip in enumerate(clips):
            writer.write_context(c, **clip["context"])
            if clip["truth"] is not None:
                writer.write_truth(c, **clip["truth"])
    common.barrier()
    writer = RolloutWriter(out_dir, **writer_args)
    common.log(f"rolling out on {pipeline.device} in {common.resolve_precision(cfg.run.precision, pipeline.device)}")
    my_groups = plan_groups(len(clips), r.samples, r.batch, dist.world_size)[dist.rank::dist.world_size]
    rows = [(c, s) for clip_ids, sample_ids in my_groups for c in clip_ids for s in sample_ids]
    total = len(rows) * r.frames
    started = time.perf_counter()
    complete = True
    with common.StopSignal() as stop, common.progress(total=total, unit="frame", unit_scale=True, desc="rollout",
                                                      disable=not dist.is_main, smoothing=0.1) as progress:
        for clip_ids, sample_ids in my_groups:
            complete &= run_group(cfg, pipeline, writer, clip_ids, sample_ids, clips, out_dir / ".state", progress,
                                  stop)
            if stop.requested:
                break
    seconds = time.perf_counter() - started
    if not complete:
        common.log(f"stopped; resume with the same command to continue from frame {writer.frames_done()}")
        return out_dir
    common.log(f"rolled out {total} frame-steps in {seconds:.1f}s ({total / max(seconds, 1e-9):.0f} frames/s)")
    if r.videos:
        write_videos(cfg, out_dir, sorted(rows), meta)  # each rank its own rows: no one encodes while others wait
    common.barrier()
    if dist.is_main:
        writer.finish()
        common.log(f"rollout complete: {out_dir}")
    return out_dir


if __name__ == "__main__":
    common.main_guard(main)
