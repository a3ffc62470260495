"""The benchmarks' baselines compute what they stand in for."""
import sys
from pathlib import Path

import torch

import common
import kernels
import structure_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from plain_structure import PlainStructureStep  # noqa: E402


def test_plain_eager_structure_step_gives_the_models_frames():
    """bench_rollout's baseline (one nn.Sequential per block, F.one_hot, plain LSTM cell) rolls out the same
    label maps as StructureModel.observe / step on the same weights, context and noise: 12 steps of a
    small paper-shaped model (kitti64's layout, widths / 8) with random weights, every pixel equal."""
    cfg = common.load_config("kitti64.yaml", ["structure.width_mult=0.125", "structure.lstm_mult=0.125",
                                              "structure.h_channels=16", "structure.z_channels=8"])
    torch.manual_seed(0)
    model = structure_model.build_model(cfg).for_rollout(channels_last=False)
    batch, steps = 3, 12
    context = torch.randint(0, model.num_classes, (3, batch, *model.size), dtype=torch.uint8)
    with kernels.using_backend("torch"), torch.inference_mode():
        generator = torch.Generator().manual_seed(1)
        state = model.init_state(batch)
        for frame in context:
            model.observe(state, frame, generator)
        expected = [model.step(state, generator) for _ in range(steps)]
        generator = torch.Generator().manual_seed(1)
        plain = PlainStructureStep(model, batch, torch.device("cpu"), generator, context)
        got = [plain.step(generator)["label"] for _ in range(steps)]
    changed = sum(int((a != b).sum()) for a, b in zip(expected[1:], expected[:-1]))
    assert changed > 0, "random weights that predict a still frame would not test the feedback"
    for t, (a, b) in enumerate(zip(expected, got)):
        assert torch.equal(a, b), f"step {t}: {(a != b).float().mean():.4%} of the pixels differ"


def test_training_bench_runs_each_trainers_real_step():
    """bench_training times train_step of all three trainers on random inputs; each case must train (finite
    losses), or its numbers time an error path."""
    import bench_training
    for config, component in (("synth_scroll.yaml", "structure"), ("synth_scroll.yaml", "image"),
                              ("synth_drive.yaml", "edge")):
        cfg = common.load_config(config, ["run.precision=fp32"])
        factory, cases, shape = bench_training.COMPONENTS[component]
        losses = factory(cfg, cases[0][1])(0)
        assert losses, component
        assert all(torch.isfinite(torch.as_tensor(v)).all() for v in losses.values()), (component, losses)
        assert shape(cfg)[0] >= 1
