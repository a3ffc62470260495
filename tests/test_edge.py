"""Boundary generator (train_edge.py): shapes, ground-truth boundaries, scores, training, resume, DDP."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import common
import edge_model
import train_edge
from data.layout import write_frame, write_meta
from tests.conftest import assert_resumed_equal

ROOT = Path(__file__).resolve().parents[1]
NUM_CLASSES = 19
TINY = ["--cfg", "synth_drive", "--edge.enabled=true", "--data.size=[32,32]", "--edge.width=0.125",
        "--edge.d_width=0.125", "--edge.res_blocks=1", "--edge.batch_size=4", "--edge.val_frames=8",
        "--edge.log_every=1", "--edge.lr=0.001"]


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory):
    """Hand-made 32x32 street frames: sky, building, road (instance 0) and moving cars (class 13) with
    their own ids, two of which touch so that only the instance map separates them."""
    root = tmp_path_factory.mktemp("edge_toy") / "toy"
    palette = np.random.default_rng(0).integers(0, 256, (NUM_CLASSES, 3))
    write_meta(root, kind="toy", class_names=[f"class{i}" for i in range(NUM_CLASSES)], palette=palette, fps=10,
               size=(32, 32))
    for split, count in (("train", 2), ("val", 1), ("test", 1)):
        for s in range(count):
            rng = np.random.default_rng(10 * ("train", "val", "test").index(split) + s)
            x0 = int(rng.integers(0, 8))
            for t in range(10):
                label = np.full((32, 32), 0, np.uint8)
                label[:10], label[10:16] = 10, 2
                ids = np.zeros((32, 32), np.uint16)
                x = (x0 + t) % 12
                for k, (left, top, w, h) in enumerate([(x, 18, 6, 5), (x + 6, 18, 5, 5), (20 - x, 25, 7, 4)]):
                    label[top:top + h, left:left + w] = 13
                    ids[top:top + h, left:left + w] = 1000 + k
                write_frame(root / split / f"seq{s}", "label", t, label)
                write_frame(root / split / f"seq{s}", "instance", t, ids)
    return root


def tiny_args(root, run_dir, *extra):
    return TINY + [f"--data.root={root}", f"--run.dir={run_dir}", *extra]


# ----------------------------------------------------------------------------- ground truth and scores

def boundaries_by_loops(ids: np.ndarray) -> np.ndarray:
    height, width = ids.shape
    out = np.zeros_like(ids, bool)
    for y in range(height):
        for x in range(width):
            for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                if 0 <= y + dy < height and 0 <= x + dx < width and ids[y + dy, x + dx] != ids[y, x]:
                    out[y, x] = True
    return out


def test_instance_boundaries_hand_made():
    ids = torch.tensor([[0, 0, 0, 0, 0],
                        [0, 7, 7, 0, 0],
                        [0, 7, 7, 8, 8],
                        [0, 0, 0, 8, 8]])
    expected = torch.tensor([[0, 1, 1, 0, 0],
                             [1, 1, 1, 1, 1],
                             [1, 1, 1, 1, 1],
                             [0, 1, 1, 1, 0]], dtype=torch.bool)
    assert torch.equal(edge_model.instance_boundaries(ids), expected)
    # One id everywhere: the image border alone is not a boundary.
    assert not edge_model.instance_boundaries(torch.full((4, 6), 3)).any()
    # Diagonal neighbours do not count.
    diagonal = torch.tensor([[1, 2], [2, 1]])
    assert edge_model.instance_boundaries(diagonal).all()
    checker = torch.tensor([[5, 5, 5], [5, 9, 5], [5, 5, 5]])
    assert torch.equal(edge_model.instance_boundaries(checker),
                       torch.tensor([[0, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=torch.bool))


def test_stuff_classes_follow_the_ids():
    """Stuff with instance id 0 everywhere: class changes count only with boundary_source=instance+class."""
    labels = torch.tensor([[10, 10, 10], [2, 2, 2], [2, 13, 2]], dtype=torch.uint8)
    ids = torch.tensor([[0, 0, 0], [0, 0, 0], [0, 1004, 0]], dtype=torch.int32)
    instance_only = edge_model.true_boundaries(labels, ids, "instance")
    assert torch.equal(instance_only, torch.tensor([[0, 0, 0], [0, 1, 0], [1, 1, 1]], dtype=torch.bool))
    both = edge_model.true_boundaries(labels, ids, "instance+class")
    assert torch.equal(both, torch.tensor([[1, 1, 1], [1, 1, 1], [1, 1, 1]], dtype=torch.bool))
    with pytest.raises(common.ConfigError, match="boundary_source"):
        edge_model.true_boundaries(labels, ids, "edges")


def test_instance_boundaries_match_loops_on_random_maps():
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 3, (4, 9, 13)).astype(np.int32)
    got = edge_model.instance_boundaries(torch.from_numpy(ids)).numpy()
    for i in range(len(ids)):
        np.testing.assert_array_equal(got[i], boundaries_by_loops(ids[i]))


@pytest.mark.parametrize("tolerance", [0, 1, 2])
def test_boundary_counts_match_scipy(tolerance):
    from scipy.ndimage import binary_dilation
    rng = np.random.default_rng(tolerance)
    predicted = rng.random((3, 17, 23)) < 0.1
    truth = rng.random((3, 17, 23)) < 0.1
    structure = np.ones((2 * tolerance + 1, 2 * tolerance + 1), bool)
    expected = np.zeros(4, np.int64)
    for p, t in zip(predicted, truth):
        near_t = binary_dilation(t, structure) if tolerance else t
        near_p = binary_dilation(p, structure) if tolerance else p
        expected += [(p & near_t).sum(), p.sum(), (t & near_p).sum(), t.sum()]
    got = train_edge.boundary_counts(torch.from_numpy(predicted), torch.from_numpy(truth), tolerance)
    np.testing.assert_array_equal(got, expected)
    scores = train_edge.scores_from_counts(got)
    precision, recall = expected[0] / expected[1], expected[2] / expected[3]
    assert scores["f1"] == pytest.approx(2 * precision * recall / (precision + recall), abs=1e-12)


def test_scores_perfect_and_empty():
    truth = edge_model.instance_boundaries(torch.tensor([[[1, 1, 2, 2]] * 4]))
    assert train_edge.scores_from_counts(train_edge.boundary_counts(truth, truth, 0)) == \
        {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    nothing = torch.zeros_like(truth)
    assert train_edge.scores_from_counts(train_edge.boundary_counts(nothing, truth, 1))["f1"] == 0.0


# ----------------------------------------------------------------------------- networks

def test_one_hot_ignores_out_of_range():
    labels = torch.tensor([[[0, 3, 255]]], dtype=torch.uint8)
    onehot = edge_model.one_hot(labels, 4)
    assert onehot.shape == (1, 4, 1, 3)
    assert torch.equal(onehot[0, :, 0, 0], torch.tensor([1.0, 0, 0, 0]))
    assert torch.equal(onehot[0, :, 0, 1], torch.tensor([0.0, 0, 0, 1]))
    assert onehot[0, :, 0, 2].sum() == 0


def paper_generator_params(num_classes, c1=64, c2=128, c3=256, blocks=8):
    """Parameter count of the paper-width generator worked out by hand (no conv bias under spectral norm)."""
    return (num_classes * c1 * 49 + c1 * c2 * 16 + c2 * c3 * 16 + blocks * 2 * c3 * c3 * 9
            + c3 * c2 * 16 + c2 * c1 * 16 + c1 * 49 + 1)


@pytest.mark.parametrize("name,classes", [("kitti64", 19), ("kitti256", 19), ("cityscapes128x256", 19),
                                          ("dance64", 25)])
def test_paper_configs_build(name, classes):
    cfg = common.load_config(name)
    generator = edge_model.build_model(cfg)
    assert common.count_parameters(generator) == paper_generator_params(classes)
    discriminator = edge_model.build_discriminator(cfg)
    assert discriminator.blocks[0][0].in_channels == classes + 1
    assert [b[0].out_channels for b in discriminator.blocks[:-1]] == [64, 128, 256, 512]


def test_shapes_and_predict_boundaries():
    cfg = common.load_config("kitti64")
    torch.manual_seed(0)
    generator, discriminator = edge_model.build_model(cfg), edge_model.build_discriminator(cfg)
    labels = torch.randint(0, 19, (2, 64, 64), dtype=torch.uint8)
    onehot = edge_model.one_hot(labels, 19)
    logits = generator(onehot)
    assert logits.shape == (2, 1, 64, 64)
    features = discriminator(torch.cat([onehot, torch.sigmoid(logits)], 1))
    assert [tuple(f.shape[1:]) for f in features] == [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 7, 7),
                                                      (1, 6, 6)]

    small = edge_model.BoundaryGenerator(19, width=0.125, res_blocks=1)
    small.train()
    maps = torch.randint(0, 19, (3, 2, 32, 32), dtype=torch.uint8)
    edges = edge_model.predict_boundaries(small, maps)
    assert edges.shape == (3, 2, 1, 32, 32) and edges.dtype == torch.float32
    assert edges.min() >= 0 and edges.max() <= 1
    assert small.training, "predict_boundaries must restore the caller's mode"
    # Per frame: a frame's boundary does not depend on the rest of its batch.
    one = edge_model.predict_boundaries(small, maps[1, 0][None])
    torch.testing.assert_close(one[0], edges[1, 0], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="divisible by 4"):
        edge_model.predict_boundaries(small, torch.zeros(1, 30, 32, dtype=torch.uint8))


def test_a_few_steps_reduce_the_loss(toy_root):
    """Ten GAN + feature-matching steps on one fixed batch (bce_weight=0: the per-pixel BCE is only
    monitored) move the predicted boundary toward the truth."""
    cfg = common.load_config("synth_drive", TINY[2:] + [f"--data.root={toy_root}"])
    assert cfg.edge.bce_weight == 0.0
    torch.manual_seed(0)
    generator, discriminator = edge_model.build_model(cfg), edge_model.build_discriminator(cfg)
    opt_g = torch.optim.Adam(generator.parameters(), lr=1e-3, betas=(0.0, 0.9))
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=1e-4, betas=(0.0, 0.9))
    scalers = {k: common.grad_scaler(torch.device("cpu"), "fp32") for k in "gd"}
    from data.clips import ClipDataset, fixed_batch
    batch = fixed_batch(ClipDataset(toy_root, "train", 1, 0, 1, ("label", "instance")), 8)
    labels = batch["label"][:, 0]
    truth = edge_model.true_boundaries(labels, batch["instance"][:, 0])

    def error():
        with torch.no_grad():
            return (torch.sigmoid(generator(edge_model.one_hot(labels, 19)))[:, 0] - truth.float()).abs().mean().item()

    before = error()
    finite = common.FiniteLosses(cfg)
    losses = [{k: float(v) for k, v in train_edge.train_step(generator, discriminator, opt_g, opt_d, scalers, labels,
                                                             truth, cfg, step, finite).items()}
              for step in range(10)]
    assert all(np.isfinite(list(step.values())).all() for step in losses)
    assert losses[-1]["g_bce"] < 0.7 * losses[0]["g_bce"], [step["g_bce"] for step in losses]
    assert min(step["g_fm"] for step in losses[1:]) < 0.85 * losses[0]["g_fm"], [step["g_fm"] for step in losses]
    assert error() < 0.8 * before, (before, error())


# ----------------------------------------------------------------------------- the script

def test_train_resume_equals_uninterrupted(toy_root, tmp_path):
    def train(folder, *extra):
        return train_edge.main(tiny_args(toy_root, tmp_path / folder, *extra))

    def checkpoint(folder):
        return common.read_checkpoint(tmp_path / folder / "edge" / "last.pt")

    def weights(payload):
        return {f"{n}.{k}": v for n in ("generator", "discriminator") for k, v in payload["modules"][n].items()}

    def rerun():
        train("again", "--steps=6", "--edge.eval_every=3")
        return weights(checkpoint("again"))
    straight = train("a", "--steps=6", "--edge.eval_every=3")
    assert straight["step"] == 6
    first = train("b", "--steps=3", "--edge.eval_every=100")
    assert first["step"] == 3
    resumed = train("b", "--steps=6", "--edge.eval_every=3", "--resume")
    assert resumed["step"] == 6
    a, b = checkpoint("a"), checkpoint("b")
    assert_resumed_equal(weights(a), weights(b), rerun)
    assert len(a["extra"]["history"]["d"]) == len(b["extra"]["history"]["d"]) == 6
    run = tmp_path / "a" / "edge"
    assert (run / "samples" / "step_000003.png").is_file() and (run / "loss.png").is_file()
    assert set(straight["val"]) == {"model", "model_strict", "baseline", "baseline_strict"}
    # The baseline (class changes) finds every car outline but misses the touching cars' shared edge.
    assert straight["val"]["baseline"]["recall"] < 1.0

    loaded = edge_model.load(tmp_path / "a" / "edge" / "last.pt", common.load_config("synth_drive", TINY[2:]))
    assert not loaded.training and loaded.checkpoint_identity["step"] == 6
    with pytest.raises(common.CheckpointError, match="data.num_classes"):
        edge_model.load(tmp_path / "a" / "edge" / "last.pt", common.load_config("synth_drive", ["data.num_classes=8"]))
    with pytest.raises(common.CheckpointError, match="edge.width"):
        train_edge.main(tiny_args(toy_root, tmp_path / "a", "--steps=8", "--edge.width=0.25", "--resume"))


def test_trains_on_synthetic_drive(tiny_drive, tmp_path):
    """The real synth-drive generator's label and instance frames go through the loop end to end."""
    result = train_edge.main(tiny_args(tiny_drive, tmp_path, "--steps=2", "--edge.eval_every=2"))
    metrics = __import__("json").loads((tmp_path / "edge" / "metrics.json").read_text())
    assert metrics["step"] == 2 and metrics["val_frames"] == 8
    assert 0.0 < metrics["baseline"]["f1"] <= 1.0 and result["val"]["model"] == metrics["model"]
    assert (tmp_path / "edge" / "samples" / "step_000002.png").is_file()


def test_disabled_config_is_refused(toy_root, tmp_path):
    with pytest.raises(common.ConfigError, match="edge.enabled"):
        train_edge.main(tiny_args(toy_root, tmp_path, "--edge.enabled=false"))



def test_two_process_ddp_keeps_ranks_identical(toy_root, tmp_path, master_port):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={master_port}",
               "train_edge.py", *tiny_args(toy_root, tmp_path, "--steps=3", "--edge.batch_size=2",
                                           "--edge.eval_every=3", "--run.device=cpu")]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=240,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "generator parameters identical on all 2 ranks" in done.stdout + done.stderr
    assert "discriminator parameters identical on all 2 ranks" in done.stdout + done.stderr
    assert (tmp_path / "edge" / "last.pt").is_file()
