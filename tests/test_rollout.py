"""rollout.py end to end with tiny untrained generators: long horizons, flat memory, determinism, resume."""
import resource

import numpy as np
import pytest

import common
import edge_model
import image_model
import rollout
import structure_model
from data.rollout_io import read_rollout

TINY = ["data.size=[32, 32]", "data.num_classes=19", "structure.width_mult=0.0625", "structure.lstm_mult=0.0625", "structure.h_channels=8",
        "structure.z_channels=4", "image.ngf=4", "image.n_downsample=1", "image.n_blocks=2", "image.tau=2",
        "image.num_d=1", "image.ndf=4", "image.use_edges=true", "edge.enabled=true", "edge.width=0.0625",
        "edge.res_blocks=1", "structure.stride=1", "image.stride=1"]


@pytest.fixture(scope="module")
def tiny_drive(tmp_path_factory):
    """Random 19-class label/RGB sequences at 32x32: the rollout does not care what they show."""
    from tests.conftest import write_random_dataset
    return write_random_dataset(tmp_path_factory.mktemp("rollout") / "data", sequences=2, frames=12, size=(32, 32),
                                num_classes=19, modalities=("label", "rgb"))


def _save_generators(root, run_dir, extra=()):
    cfg = common.load_config(None, [f"data.root={root}", f"run.dir={run_dir}", *TINY, *extra])
    for name, model_file, module in (("structure", structure_model, "structure"), ("image", image_model, "generator"),
                                     ("edge", edge_model, "generator")):
        model = model_file.build_model(cfg)
        common.save_checkpoint(run_dir / name / "last.pt", step=1, cfg=cfg, modules={module: model})
    return cfg


def _argv(root, run_dir, *extra):
    return [f"--data.root={root}", f"--run.dir={run_dir}", *[f"--{o}" for o in TINY], "--rollout.clips=2",
            "--rollout.samples=2", "--rollout.chunk=250", "--rollout.videos=false", "--run.kernel_backend=torch",
            *extra]


def _frames(out_dir, modality):
    reader = read_rollout(out_dir)
    return np.stack([np.stack([reader.frames(c, s, modality) for s in range(reader.num_samples)])
                     for c in range(reader.num_clips)])


def test_long_rollout_flat_memory_and_deterministic(tiny_drive, tmp_path):
    _save_generators(tiny_drive, tmp_path / "run")
    out_a = rollout.main(_argv(tiny_drive, tmp_path / "run", "--frames=250", f"--rollout.out={tmp_path / 'a'}"))
    peak_after_one_chunk = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out_b = rollout.main(_argv(tiny_drive, tmp_path / "run", "--frames=1250", f"--rollout.out={tmp_path / 'b'}"))
    peak_after_five_chunks = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # five times the horizon (five chunks of 250) may not grow the process's peak memory by more than a few MB
    assert peak_after_five_chunks - peak_after_one_chunk < 64 * 1024, (peak_after_one_chunk, peak_after_five_chunks)
    reader = read_rollout(out_b)
    assert reader.protocol["complete"] and reader.frames_done() == 1250
    labels_b = _frames(out_b, "label")
    assert labels_b.shape == (2, 2, 1250, 32, 32) and labels_b.max() < 19
    assert _frames(out_b, "rgb").shape == (2, 2, 1250, 32, 32, 3)
    # the same seed gives the same first 250 frames whatever the horizon
    assert np.array_equal(_frames(out_a, "label"), labels_b[:, :, :250])


def test_resume_from_partial_output(tiny_drive, tmp_path):
    _save_generators(tiny_drive, tmp_path / "run")
    full = rollout.main(_argv(tiny_drive, tmp_path / "run", "--frames=300", "--rollout.chunk=100",
                              f"--rollout.out={tmp_path / 'full'}"))
    partial = tmp_path / "partial"
    rollout.main(_argv(tiny_drive, tmp_path / "run", "--frames=300", "--rollout.chunk=100", f"--rollout.out={partial}"))
    # lose the last chunk of one sample and mark the rollout incomplete, as an interruption would
    (partial / "clip_0001" / "sample_001" / "label" / "000200.npy").unlink()
    protocol = (partial / "rollout.yaml").read_text().replace("complete: true", "complete: false")
    (partial / "rollout.yaml").write_text(protocol)
    state = partial / ".state" / "group_0000_000.pt"
    import torch
    saved = torch.load(state, weights_only=True)
    assert saved["frame"] == 300
    rollout.main(_argv(tiny_drive, tmp_path / "run", "--frames=300", "--rollout.chunk=100", f"--rollout.out={partial}"))
    assert read_rollout(partial).protocol["complete"]
    for modality in ("label", "rgb"):
        assert np.array_equal(_frames(full, modality), _frames(partial, modality))
    # a truncated state file is recomputed from frame 0, to the same frames
    (partial / "clip_0001" / "sample_001" / "label" / "000200.npy").unlink()
    (partial / "rollout.yaml").write_text((partial / "rollout.yaml").read_text().replace("complete: true", "complete: false"))
    state.write_bytes(state.read_bytes()[:100])
    rollout.main(_argv(tiny_drive, tmp_path / "run", "--frames=300", "--rollout.chunk=100", f"--rollout.out={partial}"))
    assert np.array_equal(_frames(full, "label"), _frames(partial, "label"))


def test_resume_mid_rollout_equals_uninterrupted(tiny_drive, tmp_path):
    """Stop after the first chunk (as SIGTERM would), then rerun: the frames equal an uninterrupted run."""
    _save_generators(tiny_drive, tmp_path / "run")
    full = rollout.main(_argv(tiny_drive, tmp_path / "run", "--frames=200", "--rollout.chunk=50",
                              f"--rollout.out={tmp_path / 'full'}"))
    stopped = tmp_path / "stopped"

    class StopAfterFirstChunk(common.StopSignal):
        requested = property(lambda self: True, lambda self, value: None)

    original = common.StopSignal
    rollout.common.StopSignal = StopAfterFirstChunk
    try:
        rollout.main(_argv(tiny_drive, tmp_path / "run", "--frames=200", "--rollout.chunk=50", f"--rollout.out={stopped}"))
    finally:
        rollout.common.StopSignal = original
    assert read_rollout(stopped).frames_done() == 50 and not read_rollout(stopped).protocol["complete"]
    rollout.main(_argv(tiny_drive, tmp_path / "run", "--frames=200", "--rollout.chunk=50", f"--rollout.out={stopped}"))
    assert np.array_equal(_frames(full, "label"), _frames(stopped, "label"))
    assert np.array_equal(_frames(full, "rgb"), _frames(stopped, "rgb"))


def test_a_rollout_that_fails_before_its_first_chunk_leaves_no_folder(tiny_drive, tmp_path, monkeypatch):
    _save_generators(tiny_drive, tmp_path / "run")

    def broken_step(self, generator):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(rollout.Pipeline, "step", broken_step)
    with pytest.raises(RuntimeError, match="out of memory"):
        rollout.main(_argv(tiny_drive, tmp_path / "run", "--frames=20", f"--rollout.out={tmp_path / 'out'}"))
    assert not (tmp_path / "out").exists()
    (tmp_path / "mine").mkdir()                                    # a folder the user made is never removed
    with pytest.raises(RuntimeError, match="out of memory"):
        rollout.main(_argv(tiny_drive, tmp_path / "run", "--frames=20", f"--rollout.out={tmp_path / 'mine'}"))
    assert (tmp_path / "mine").is_dir()


def test_videos_written(tiny_drive, tmp_path):
    _save_generators(tiny_drive, tmp_path / "run")
    out = rollout.main(_argv(tiny_drive, tmp_path / "run", "--frames=20", "--rollout.videos=true",
                             "--rollout.video_format=gif", f"--rollout.out={tmp_path / 'v'}"))
    import imageio.v3 as iio
    grid = iio.imread(out / "clip_0000" / "sample_001" / "grid.gif")
    assert grid.shape[0] == 5 + 20  # context frames, then the predicted ones
    assert (out / "clip_0001" / "sample_000" / "label.gif").is_file()


def test_videos_play_in_real_time_unless_told():
    """A rollout frame is `stride` source frames: real time is the dataset's fps over the stride."""
    assert rollout.video_fps(common.load_config("synth_drive.yaml"), {"fps": 10}, 2) == pytest.approx(5.0)
    assert rollout.video_fps(common.load_config("synth_drive.yaml", ["rollout.video_fps=24"]), {"fps": 10}, 2) == 24
    with pytest.raises(common.ConfigError, match="rollout.video_fps must be >= 0"):
        rollout.main(["--cfg", "synth_drive.yaml", "--rollout.video_fps=-1"])


def test_missing_and_mismatched_checkpoints_are_refused(tiny_drive, tmp_path):
    with pytest.raises(common.CheckpointError, match=r"structure/last\.pt does not exist"):
        rollout.main(_argv(tiny_drive, tmp_path / "empty", "--frames=10"))
    _save_generators(tiny_drive, tmp_path / "run", extra=["data.num_classes=25"])
    with pytest.raises(common.CheckpointError, match="data.num_classes=25 but the config says data.num_classes=19"):
        rollout.main(_argv(tiny_drive, tmp_path / "run", "--frames=10"))


def test_without_a_trained_structure_generator_the_shipped_one_rolls_out_label_maps(tiny_drive, tmp_path, monkeypatch):
    """checkpoints/<run folder name>_structure.pt stands in for RUN_DIR/structure/last.pt when that is absent;
    a trained one, or one named by rollout.structure_ckpt, comes first."""
    cfg = common.load_config(None, [f"data.root={tiny_drive}", *TINY])
    shipped = structure_model.build_model(cfg)
    monkeypatch.setattr(common, "ROOT", tmp_path / "repo")
    common.save_checkpoint(tmp_path / "repo" / "checkpoints" / "tinyworld_structure.pt", step=7, cfg=cfg,
                           modules={"structure": shipped})
    out = rollout.main(_argv(tiny_drive, tmp_path / "tinyworld", "--frames=6", f"--rollout.out={tmp_path / 'a'}"))
    models = read_rollout(out).protocol["models"]
    assert list(models) == ["structure"] and models["structure"]["step"] == 7
    assert read_rollout(out).modalities == ["label"]
    _save_generators(tiny_drive, tmp_path / "tinyworld")               # trained: step 1, with an image generator
    out = rollout.main(_argv(tiny_drive, tmp_path / "tinyworld", "--frames=6", f"--rollout.out={tmp_path / 'b'}"))
    assert read_rollout(out).protocol["models"]["structure"]["step"] == 1 and "rgb" in read_rollout(out).modalities


def test_a_rollout_folder_is_resumed_or_reused_only_with_the_checkpoints_that_wrote_it(tiny_drive, tmp_path):
    from data.rollout_io import RolloutError
    _save_generators(tiny_drive, tmp_path / "run")
    out = tmp_path / "out"
    rollout.main(_argv(tiny_drive, tmp_path / "run", "--frames=20", "--rollout.chunk=10", f"--rollout.out={out}"))
    recorded = read_rollout(out).protocol["models"]
    assert sorted(recorded) == ["edge", "image", "structure"] and recorded["structure"]["step"] == 1
    before = _frames(out, "label")
    _save_generators(tiny_drive, tmp_path / "run", extra=["run.seed=7"])   # retrained: other weights, same paths
    with pytest.raises(RolloutError, match=r"made with the (edge|image|structure) checkpoint .*sha256 .*this run loads .*another output folder"):
        rollout.main(_argv(tiny_drive, tmp_path / "run", "--frames=20", "--rollout.chunk=10", f"--rollout.out={out}"))
    assert np.array_equal(_frames(out, "label"), before)


def test_structure_only_data_rolls_out_without_an_image_generator(tmp_path):
    """The layout allows label maps without an rgb/ folder: with --rollout.image_ckpt=none nothing reads RGB."""
    from tests.conftest import write_random_dataset
    labels_only = write_random_dataset(tmp_path / "labels", sequences=2, frames=12, size=(32, 32), num_classes=19,
                                       modalities=("label",))
    assert not list(labels_only.glob("*/*/rgb"))
    _save_generators(labels_only, tmp_path / "run")
    out = rollout.main(_argv(labels_only, tmp_path / "run", "--frames=12", "--rollout.chunk=6", "--rollout.image_ckpt=none",
                             "--rollout.videos=true", f"--rollout.out={tmp_path / 'out'}"))
    reader = read_rollout(out)
    assert reader.protocol["complete"] and reader.modalities == ["label"]
    assert reader.frames(1, 1, "label").shape == (12, 32, 32)


def test_rollout_steps_at_the_training_stride(tiny_drive, tmp_path):
    """Generators trained on every 2nd frame see context and truth at that frame step, and the protocol
    records it (evaluation compares with training shots at the same step); differing strides are refused."""
    from data.layout import load_sequence_modalities, read_meta
    _save_generators(tiny_drive, tmp_path / "run", extra=["structure.stride=2", "image.stride=2"])
    out = rollout.main(_argv(tiny_drive, tmp_path / "run", "--frames=4", "--rollout.n_past=3",
                             "--rollout.truth_frames=3", f"--rollout.out={tmp_path / 'r'}"))
    reader = read_rollout(out)
    assert reader.protocol["stride"] == 2
    clip = reader.protocol["clips"][0]
    source = load_sequence_modalities(tiny_drive / "val" / clip["sequence"], ("label",), read_meta(tiny_drive))
    start = clip["start"]
    assert np.array_equal(reader.context(0, "label"), source["label"][start:start + 5:2])
    assert np.array_equal(reader.truth(0, "label"), source["label"][start + 6:start + 12:2])
    _save_generators(tiny_drive, tmp_path / "mixed", extra=["structure.stride=2", "image.stride=1"])
    with pytest.raises(common.ConfigError, match="structure.stride=2.*image.stride=1"):
        rollout.main(_argv(tiny_drive, tmp_path / "mixed", "--frames=4", "--rollout.n_past=3"))


def test_rgb_variant_pipeline_equals_the_model_on_uint8_context():
    """The non-hierarchical baseline sees its context as the model's own API does (uint8 RGB, scaled once)."""
    import torch
    cfg = common.load_config(None, [*TINY, "structure.variant=rgb", "structure.previous_frame=false",
                                       "structure.pooled_frames=false", "structure.posterior_births=false"])
    model = structure_model.build_model(cfg)
    context_rgb = torch.randint(0, 256, (2, 3, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    context_labels = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    expected = model.eval().generate(context_rgb, 4, generator=torch.Generator().manual_seed(1))[:, 0]
    pipeline = rollout.Pipeline(model, channels_last=False)
    generator = torch.Generator().manual_seed(1)
    pipeline.init(context_labels, context_rgb, 1, generator)
    frames = torch.stack([pipeline.step(generator)["rgb"] for _ in range(4)], 1)  # (B, T, H, W, 3)
    assert torch.equal(frames, expected.permute(0, 1, 3, 4, 2))


@pytest.mark.parametrize("num_clips,samples,batch,world_size", [(4, 2, 16, 1), (4, 2, 16, 8), (1, 2, 16, 4),
                                                                (5, 3, 4, 2), (3, 1, 2, 1), (2, 4, 16, 3)])
def test_plan_groups_cover_every_row_once_and_give_every_rank_work(num_clips, samples, batch, world_size):
    groups = rollout.plan_groups(num_clips, samples, batch, world_size)
    rows = sorted((c, s) for clip_ids, sample_ids in groups for c in clip_ids for s in sample_ids)
    assert rows == [(c, s) for c in range(num_clips) for s in range(samples)]
    assert len(groups) >= min(world_size, num_clips * samples)
    if world_size == 1:  # one rank: batch // samples clips with all their samples, as before ranks split them
        per_group = max(1, batch // samples)
        assert [g[0] for g in groups] == [list(range(i, min(i + per_group, num_clips)))
                                          for i in range(0, num_clips, per_group)]


def test_torchrun_two_ranks_split_the_samples_of_one_clip(tiny_drive, tmp_path, master_port):
    """One clip, two samples, two ranks: each rank rolls out (and encodes the video of) one sample."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    _save_generators(tiny_drive, tmp_path / "run")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={master_port}",
               "rollout.py", *_argv(tiny_drive, tmp_path / "run", "--frames=20", "--rollout.chunk=10",
                                    "--rollout.clips=1", "--rollout.videos=true", "--rollout.video_format=gif",
                                    "--run.device=cpu")]
    result = subprocess.run(command, cwd=Path(rollout.__file__).parent, env=dict(os.environ, OMP_NUM_THREADS="1"),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = tmp_path / "run" / "rollout"
    assert read_rollout(out).protocol["complete"] and read_rollout(out).frames_done() == 20
    assert sorted(p.name for p in (out / ".state").iterdir()) == ["group_0000_000.pt", "group_0000_001.pt"]
    for sample in ("sample_000", "sample_001"):
        assert (out / "clip_0000" / sample / "grid.gif").is_file()
