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
