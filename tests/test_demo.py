"""demo.py's parallel training: the structure generator in a second process beside the others."""
import pytest
import torch

import common
import demo
import train_edge
from tests.test_structure import tiny_args


def test_structure_trains_in_a_second_process_beside_the_others(tiny_drive, tmp_path):
    structure_argv = tiny_args(tiny_drive, tmp_path, "--structure.steps=3")
    edge_argv = ["--cfg", "synth_drive.yaml", f"--data.root={tiny_drive}", f"--run.dir={tmp_path}", "--data.size=[32, 32]",
                 "--edge.width=0.125", "--edge.d_width=0.125", "--edge.res_blocks=1", "--edge.batch_size=2",
                 "--edge.val_frames=4", "--edge.steps=2", "--edge.eval_every=2", "--edge.save_every=2"]
    threads = torch.get_num_threads()
    log = tmp_path / "structure" / "train.log"
    timings = demo.train_beside(structure_argv, [("edge", train_edge.main, edge_argv)], log, threads=2)
    assert set(timings) == {"structure", "edge"} and timings["structure"] >= timings["edge"] > 0
    assert common.read_checkpoint(tmp_path / "structure" / "last.pt")["step"] == 3
    assert common.read_checkpoint(tmp_path / "edge" / "last.pt")["step"] == 2
    assert "structure generator: step 3" in log.read_text() and torch.get_num_threads() == threads


def test_a_failed_structure_process_names_its_log(tiny_drive, tmp_path, capsys):
    log = tmp_path / "structure" / "train.log"
    with pytest.raises(SystemExit):
        demo.train_beside(tiny_args(tiny_drive, tmp_path, "--structure.n_past=0"), [], log, threads=2)
    message = capsys.readouterr().err
    assert str(log) in message and "structure.n_past must be >= 1" in message
