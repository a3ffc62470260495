import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import common
from tests.toy_loop import run

ROOT = Path(__file__).resolve().parents[1]


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def test_resume_equals_uninterrupted(random_dataset, tmp_path):
    straight, _ = run(random_dataset, tmp_path / "straight", steps=6)
    run(random_dataset, tmp_path / "split", steps=3)
    resumed, step = run(random_dataset, tmp_path / "split", steps=6, resume=True)
    assert step == 6
    for a, b in zip(_params(straight), _params(resumed)):
        assert torch.equal(a, b)


def test_checkpoint_is_atomic_and_saves_config(random_dataset, tmp_path):
    run(random_dataset, tmp_path / "r", steps=2)
    assert (tmp_path / "r" / "last.pt").is_file()
    saved = common.load_config(str(tmp_path / "r" / "last.yaml"))
    assert saved.data.root == str(random_dataset)
    assert not list((tmp_path / "r").glob("*.tmp")) and [p.name for p in (tmp_path / "r").glob(".*")] == [".lock"]


def test_a_full_disk_during_a_checkpoint_is_one_line_and_keeps_the_previous_one(random_dataset, tmp_path, monkeypatch, capsys):
    """ENOSPC while the next checkpoint is written: main_guard prints one line naming the file and saying the
    previous checkpoint is intact, which it is, and no temporary file is left."""
    import errno
    run(random_dataset, tmp_path / "r", steps=2)
    last = tmp_path / "r" / "last.pt"
    before = last.read_bytes()

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(SystemExit) as stop:
        common.main_guard(lambda: common.save_checkpoint(last, step=3, cfg=common.load_config(None), modules={}))
    assert stop.value.code == 2
    message = capsys.readouterr().err.strip()
    assert "\n" not in message and message.startswith(f"error: {last}: No space left on device.")
    assert "previous checkpoint and the finished rollout chunks are intact" in message and "--resume" in message
    assert last.read_bytes() == before and not list((tmp_path / "r").glob(".last.pt.*"))
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    with pytest.raises(OSError, match="I/O error"):   # other I/O errors are not dressed up as a full disk
        common.main_guard(lambda: common.save_checkpoint(last, step=3, cfg=common.load_config(None), modules={}))


def test_mismatched_checkpoint_is_refused(random_dataset, tmp_path):
    run(random_dataset, tmp_path / "r", steps=1)
    payload = common.read_checkpoint(tmp_path / "r" / "last.pt")
    trained = common.saved_config(payload).data.num_classes
    cfg = common.load_config(None, ["data.num_classes=25"])
    with pytest.raises(common.CheckpointError, match=f"data.num_classes={trained} but the config says data.num_classes=25"):
        common.check_compatible(payload, cfg, ["data.num_classes"], "last.pt")


def test_a_key_added_after_the_checkpoint_reads_as_its_default():
    """A checkpoint written before a schema key existed (here structure.z_to_decoder, dropped from its saved config)
    is read with that key's default, for the architecture check and for rebuilding the model."""
    saved = common.load_config(None, ["structure.lr=0.01"]).to_dict()
    del saved["structure"]["z_to_decoder"]
    payload = {"config": saved}
    config = common.saved_config(payload)
    assert config.structure.z_to_decoder is False and config.structure.lr == 0.01
    common.check_compatible(payload, common.load_config(None, ["structure.z_to_decoder=false"]), ["structure.z_to_decoder"],
                            "old.pt")
    with pytest.raises(common.CheckpointError, match="structure.z_to_decoder=False but the config says structure.z_to_decoder=True"):
        common.check_compatible(payload, common.load_config(None, ["structure.z_to_decoder=true"]),
                                ["structure.z_to_decoder"], "old.pt")


def test_a_renamed_key_reads_under_its_new_name():
    """structure.iterations / ckpt_every became structure.steps / save_every: a checkpoint written before
    reads its values under the new names, and the old names are gone."""
    saved = common.load_config(None).to_dict()
    saved["structure"]["iterations"] = saved["structure"].pop("steps")
    saved["structure"]["ckpt_every"] = saved["structure"].pop("save_every")
    saved["structure"]["iterations"], saved["structure"]["ckpt_every"] = 1234, 56
    config = common.saved_config({"config": saved})
    assert (config.structure.steps, config.structure.save_every) == (1234, 56)
    assert "iterations" not in config.structure and "ckpt_every" not in config.structure


def test_a_retired_key_is_dropped_when_it_holds_the_kept_behaviour_and_refused_otherwise():
    """structure.prior_weights left the code (only learnt weights are built): a checkpoint that saved it as learnt
    loads, one trained with uniform weights is refused with the file and the value."""
    saved = common.load_config(None).to_dict()
    saved["structure"]["prior_weights"] = "learnt"
    assert "prior_weights" not in common.saved_config({"config": saved}, "old.pt").structure
    saved["structure"]["prior_weights"] = "uniform"
    with pytest.raises(common.CheckpointError, match="old.pt was trained with structure.prior_weights='uniform', an "
                                                      "option since removed"):
        common.saved_config({"config": saved}, "old.pt")
    with pytest.raises(common.ConfigError, match="unknown config key 'structure.prior_weights'"):
        common.load_config(None, ["structure.prior_weights=learnt"])


def test_unreadable_checkpoint_names_file(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(common.CheckpointError, match="bad.pt cannot be read"):
        common.read_checkpoint(bad)
    with pytest.raises(common.CheckpointError, match="does not exist"):
        common.read_checkpoint(tmp_path / "missing.pt")


def test_sigterm_checkpoints_and_exits_cleanly(random_dataset, tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "toy_loop.py"), str(random_dataset),
                             str(tmp_path / "sig"), "100", "--signal-at", "3"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == common.EXIT_STOPPED, result.stderr   # not 0: a scheduler can tell it from a finished run
    assert "stopped at step 3" in result.stdout
    assert common.read_checkpoint(tmp_path / "sig" / "last.pt")["step"] == 3


def test_nonfinite_policy():
    assert common.loss_is_finite(torch.tensor(1.0), 0, "stop")
    assert not common.loss_is_finite(torch.tensor(float("nan")), 0, "skip")
    with pytest.raises(common.NonFiniteLoss, match="step 4"):
        common.loss_is_finite(torch.tensor(float("inf")), 4, "stop")


def test_nonfinite_losses_are_read_every_sync_every_steps_and_before_a_checkpoint():
    finite = common.FiniteLosses(common.load_config(None, ["run.sync_every=4"]))
    for step, loss in enumerate([1.0, float("nan"), 2.0]):
        assert finite.ok(torch.tensor(loss), step)     # stop: the update goes on, nothing is read yet
        finite.check(step + 1, due_only=True)          # steps 1, 2, 3: not due
    finite.ok(torch.tensor(3.0), 3)
    with pytest.raises(common.NonFiniteLoss, match=r"in 0\.\.3"):
        finite.check(4, due_only=True)
    finite.ok(torch.tensor(float("inf")), 4)
    finite.check(5, due_only=True)                     # not due ...
    with pytest.raises(common.NonFiniteLoss, match=r"in 4\.\.4"):
        finite.check(5)                                # ... but a checkpoint is about to be written
    finite.ok(torch.tensor(1.0), 5)
    finite.check(8, due_only=True)                     # finite since: nothing raised
    skip = common.FiniteLosses(common.load_config(None, ["run.on_nonfinite=skip", "run.sync_every=4"]))
    assert not skip.ok(torch.tensor(float("nan")), 0) and skip.ok(torch.tensor(1.0), 1)


def test_loader_workers_default_to_processes_on_cuda_only(monkeypatch):
    assert common.loader_workers(3, torch.device("cpu")) == 3
    assert common.loader_workers(-1, torch.device("cpu")) == 0
    monkeypatch.setattr(common.os, "cpu_count", lambda: 16)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert common.loader_workers(-1, torch.device("cuda", 0)) == 1      # 2 CPUs per rank: one for the step
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert common.loader_workers(-1, torch.device("cuda", 0)) == 4
    with pytest.raises(common.ConfigError, match="run.num_workers"):
        common.load_config(None, ["run.num_workers=-2"])


def test_video_and_plot_writers(tmp_path):
    import imageio.v3 as iio
    import numpy as np
    labels = np.random.default_rng(0).integers(0, 4, (5, 9, 11), dtype=np.uint8)
    palette = [[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255]]
    colour = common.colorize(labels, palette)
    assert colour.shape == (5, 9, 11, 3) and (colour[labels == 1] == [255, 0, 0]).all()
    grid = common.tile([colour, colour, colour], columns=2)
    assert grid.shape == (5, 2 * 11 + 2, 2 * 13 + 2, 3)
    gif = common.write_video(tmp_path / "v.gif", grid, fps=5)
    mp4 = common.write_video(tmp_path / "v.mp4", grid, fps=5)  # odd sides get padded for H.264
    assert iio.imread(gif).shape[0] == 5
    assert mp4.stat().st_size > 0
    png = common.plot_curves({"loss": [(0, 1.0), (1, 0.5)], "kl": [(0, 2.0), (1, 1.0)]}, tmp_path / "p.png")
    assert png.stat().st_size > 0


class _RunsCode:
    """A pickle that would run code when loaded (here it would touch a file)."""
    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_checkpoint_that_would_run_code_is_refused_not_executed(random_dataset, tmp_path):
    run(random_dataset, tmp_path / "r", steps=1)
    payload = torch.load(tmp_path / "r" / "last.pt", weights_only=True)   # what HVP writes loads weights-only
    marker = tmp_path / "executed"
    hostile = _RunsCode()
    hostile.marker = str(marker)
    payload["extra"]["note"] = hostile
    torch.save(payload, tmp_path / "r" / "last.pt")
    with pytest.raises(common.CheckpointError, match="last.pt is refused: it holds a .* object, and HVP loads weights only"):
        common.read_checkpoint(tmp_path / "r" / "last.pt")
    assert not marker.exists()


def test_resume_restores_every_rng_from_a_weights_only_checkpoint(random_dataset, tmp_path):
    import random
    import numpy as np
    common.seed_everything(3)
    np.random.rand(5)   # a cached Gaussian and a moved position are part of the state
    np.random.randn(1)
    saved = common.rng_state()
    expected = (random.random(), np.random.randn(3).tolist(), torch.rand(2).tolist())
    common.seed_everything(9)
    common.set_rng_state(saved)
    assert (random.random(), np.random.randn(3).tolist(), torch.rand(2).tolist()) == expected


def test_outputs_respect_the_umask(tmp_path):
    """A lab's shared run folder: files come out 0644 under umask 022 (mkstemp alone gives 0600)."""
    old = os.umask(0o022)
    try:
        mode = subprocess.run([sys.executable, "-c", "import common, os, sys; common.atomic_write_bytes(sys.argv[1], b'x');"
                               "print(oct(os.stat(sys.argv[1]).st_mode & 0o777))", str(tmp_path / "f.bin")],
                              capture_output=True, text=True, cwd=ROOT, check=True).stdout.strip()
    finally:
        os.umask(old)
    assert mode == "0o644"


def test_a_second_run_into_a_busy_folder_is_refused_naming_the_holder(random_dataset, tmp_path):
    folder = tmp_path / "busy"
    common.lock_folder(folder)
    try:
        result = subprocess.run([sys.executable, str(ROOT / "tests" / "toy_loop.py"), str(random_dataset), str(folder), "2"],
                                capture_output=True, text=True, timeout=120)
    finally:
        common.unlock_folder(folder)
    assert result.returncode == 2
    assert f"in use by another run (pid {os.getpid()})" in result.stderr and "Traceback" not in result.stderr
    assert not (folder / "last.pt").exists()
    run(random_dataset, folder, steps=1)   # free again once the holder lets go


def test_a_failed_main_in_this_process_leaves_its_folder_unlocked(tmp_path):
    @common.releases_folder_locks
    def failing_main(folder):
        common.lock_folder(folder)
        raise common.ConfigError("bad value")
    with pytest.raises(common.ConfigError):
        failing_main(tmp_path / "run")
    probe = subprocess.run([sys.executable, "-c", "import common, sys; common.lock_folder(sys.argv[1]); print('locked')",
                            str(tmp_path / "run")], capture_output=True, text=True, cwd=ROOT)
    assert probe.stdout.strip() == "locked", probe.stderr


def test_taking_the_lock_removes_temporary_files_of_dead_writers(tmp_path):
    folder = tmp_path / "run"
    (folder / "samples").mkdir(parents=True)
    orphans = [folder / ".last.pt.k2j4_x.tmp", folder / "samples" / ".step0000010.4242.tmp.mp4"]
    kept = [folder / "last.pt", folder / "notes.tmp.txt", folder / "samples" / "step0000010.mp4"]
    for path in orphans + kept:
        path.write_bytes(b"x")
    common.lock_folder(folder)
    common.unlock_folder(folder)
    assert not any(p.exists() for p in orphans) and all(p.exists() for p in kept)


def test_a_folder_that_cannot_be_written_is_named_before_any_work(random_dataset, tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "toy_loop.py"), str(random_dataset),
                             str(tmp_path / "a_file" / "run"), "2"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "a_file/run cannot be written" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_failing_rank_ends_the_job_instead_of_hanging(master_port):
    """One DDP rank fails while the other waits for it: the job ends (torchrun stops the waiting rank) with the
    failing rank's one-line error, instead of hanging in main_guard's closing barrier."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={master_port}",
               str(ROOT / "tests" / "dist_failure.py")]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode != 0
    assert "rank 1 failed on purpose" in done.stdout + done.stderr
