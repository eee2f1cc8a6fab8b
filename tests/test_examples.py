"""The example the README points to keeps working."""

from __future__ import annotations

import os
import runpy
import sys

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "examples", "propagate_resnet18.py")


def test_propagate_resnet18_example_runs(capsys, monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", [EXAMPLE, "--size", "32"])
    runpy.run_path(EXAMPLE, run_name="__main__")
    output = capsys.readouterr().out
    assert "layer4_1_conv2" in output and "median over BatchNorm inputs" in output


DDP_EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "examples", "ddp_train.py")


def test_ddp_example_runs_under_torchrun() -> None:
    import socket
    import subprocess

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
               f"--master_port={port}", DDP_EXAMPLE, "--steps", "3"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "accuracy on the 1797 digits" in result.stdout and "2 ranks x batch 4" in result.stdout
