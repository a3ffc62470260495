"""The main job, end to end on the default synthetic data: data -> train -> rollout -> evaluate.

    python demo.py                                   # synth_scroll (the default config), ~8 minutes on 2 CPU cores
    python demo.py --cfg synth_lanes.yaml            # another world
    python demo.py --rollout.frames=500              # any config key, as for the other scripts

Each stage runs only when its output is missing or incomplete: data is generated once, a trained
generator whose checkpoint reached its configured steps is reused (a partial one is resumed), a
complete rollout is kept. Delete `runs/<config>/` to start over. On CPU the structure generator trains
in a second process, on half the threads, while the boundary and image generators train in this one
(demo.parallel_training): two small models on one thread each use two cores better than one after the
other on two threads. Its log: RUN_DIR/structure/train.log.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

import common
import data


def trained_steps(path: Path) -> int:
    if not path.is_file():
        return -1
    return int(common.read_checkpoint(path)["step"])


def stage(name: str, fn, argv) -> float:
    common.log(f"\n=== {name}: {' '.join(argv)}")
    started = time.perf_counter()
    fn(argv)
    seconds = time.perf_counter() - started
    common.log(f"=== {name} took {seconds:.0f}s")
    return seconds


def train_beside(structure_argv, others, log_path: Path, threads: int) -> dict:
    """train_structure.py in a second process on half of `threads` (its output in log_path) while the
    `others` train here on the rest; waits for both. A failure or an interrupt stops the other side
    with a checkpoint (SIGTERM: it saves and exits)."""
    background, restore = max(1, threads // 2), torch.get_num_threads()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    # its progress bar goes to a file, so common.progress redraws it every 30 s, not every step
    env = dict(os.environ, OMP_NUM_THREADS=str(background), MKL_NUM_THREADS=str(background))
    common.log(f"\n=== train structure (in a second process, {background} thread(s); log {log_path}): "
               f"{' '.join(structure_argv)}")
    timings, started = {"structure": 0.0}, time.perf_counter()
    with open(log_path, "ab") as log:
        process = subprocess.Popen([sys.executable, str(common.ROOT / "train_structure.py"), *structure_argv],
                                   stdout=log, stderr=subprocess.STDOUT, env=env)
    torch.set_num_threads(threads - background)
    try:
        for name, train, stage_argv in others:
            timings[name] = stage(f"train {name} ({threads - background} thread(s))", train, stage_argv)
        if process.poll() is None:
            common.log(f"=== waiting for the structure generator (log {log_path})")
        process.wait()
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.wait()
        torch.set_num_threads(restore)
    timings["structure"] = time.perf_counter() - started
    if process.returncode != 0:
        tail = log_path.read_text(errors="replace").replace("\r", "\n").strip().splitlines()[-5:]
        common.fail(f"train_structure.py exited with status {process.returncode}; the end of {log_path}:\n"
                    + "\n".join(tail))
    common.log(f"=== train structure took {timings['structure']:.0f}s (beside the others)")
    return timings


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg, _ = common.parse_args(argv, description=__doc__)
    run_dir = Path(cfg.run.dir)
    timings = {}
    started = time.perf_counter()

    common.log(f"=== data: {cfg.data.root}")
    t0 = time.perf_counter()
    data.ensure_dataset(cfg)
    timings["data"] = time.perf_counter() - t0

    import train_edge
    import train_image
    import train_structure
    components = [("structure", train_structure.main, cfg.structure.steps)]
    if cfg.structure.variant != "rgb":
        if cfg.image.use_edges:
            components.append(("edge", train_edge.main, cfg.edge.steps))
        components.append(("image", train_image.main, cfg.image.steps))
    todo = []
    for name, train, steps in components:
        done = trained_steps(run_dir / name / "last.pt")
        # a run with a wall-time budget ends before its step count by design
        budgeted = cfg[name].get("max_minutes", 0) > 0
        if done >= steps or (done >= 0 and budgeted):
            common.log(f"=== {name}: trained ({done} steps), reusing {run_dir / name / 'last.pt'}")
            continue
        todo.append((name, train, argv + (["--resume"] if done >= 0 else [])))
    threads = torch.get_num_threads()
    parallel = (cfg.demo.parallel_training and len(todo) > 1 and todo[0][0] == "structure" and threads >= 2
                and common.pick_device(cfg.run.device, 0).type == "cpu")
    if parallel:
        timings.update(train_beside(todo[0][2], todo[1:], run_dir / "structure" / "train.log", threads))
    else:
        for name, train, stage_argv in todo:
            timings[name] = stage(f"train {name}", train, stage_argv)

    import rollout
    from data.rollout_io import read_rollout
    out_dir = Path(cfg.rollout.out or run_dir / "rollout")
    try:
        complete = read_rollout(out_dir).protocol.get("complete", False)
    except Exception:
        complete = False
    if not complete:
        timings["rollout"] = stage("rollout", rollout.main, argv)

    import evaluate
    timings["evaluate"] = stage("evaluate", evaluate.main, argv + ["--shotwise", "--dynamics"])
    total = time.perf_counter() - started

    videos = sorted(out_dir.glob("clip_*/sample_*/grid.*")) or sorted(out_dir.glob("clip_*/sample_*/*.mp4"))
    plots = sorted((out_dir / "eval").glob("*.png"))
    common.log("\n=== done in {:.0f}s ({})".format(total, ", ".join(f"{k} {v:.0f}s" for k, v in timings.items())))
    common.log(f"videos: {videos[0] if videos else 'none'}" + (f" (+{len(videos) - 1} more)" if len(videos) > 1 else ""))
    for plot in plots:
        common.log(f"plot:   {plot}")
    common.log(f"metrics: {out_dir / 'eval' / 'metrics.json'}")
    return {"timings": timings, "videos": videos, "plots": plots}


if __name__ == "__main__":
    common.main_guard(main)
