from __future__ import annotations

import operator

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import graphnorm
from graphnorm import TraceError
from graphnorm.trace import OP_KEY


class Spellings(nn.Module):
    """The same ops spelled as modules, functions, torch.* and methods, and operators."""

    def __init__(self):
        super().__init__()
        self.relu = nn.ReLU()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        a = self.relu(x) + F.relu(x)
        b = torch.relu(x) + x.relu()
        c = torch.add(a, b) + a.add(b)
        c = operator.iadd(c, x)
        d = self.conv(c) + F.conv2d(c, self.conv.weight)
        return torch.flatten(d, 1) + d.view(d.size(0), -1) + d.reshape(d.shape[0], -1)


def test_spellings_of_one_op_share_a_key() -> None:
    gm = graphnorm.trace(Spellings())
    keys = [node.meta[OP_KEY] for node in gm.graph.nodes if node.op != "placeholder"]
    assert keys.count("relu") == 4
    assert keys.count("add") == 9
    assert keys.count("conv") == 2
    assert keys.count("flatten") == 1 and keys.count("reshape") == 2
    assert keys[-1] == "output"
    size_queries = [n for n in gm.graph.nodes if n.op == "call_method" and n.target == "size"]
    assert size_queries and size_queries[0].meta[OP_KEY] is None


def test_node_names_are_deterministic() -> None:
    names = [[n.name for n in graphnorm.trace(Spellings()).graph.nodes] for _ in range(2)]
    assert names[0] == names[1]
    assert "relu" in names[0] and "conv" in names[0]


class ControlFlow(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Sequential(nn.Conv2d(3, 3, 1), Branchy())

    def forward(self, x):
        return self.inner(x)


class Branchy(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x
        return -x


def test_trace_error_names_module_and_line_and_suggests_a_fix() -> None:
    with pytest.raises(TraceError) as info:
        graphnorm.trace(ControlFlow())
    message = str(info.value)
    assert "module 'inner.1'" in message
    assert "test_trace.py" in message and "if x.sum() > 0" in message
    assert "leaf_modules" in message and "concrete_args" in message


def test_leaf_modules_by_type_and_name() -> None:
    by_type = graphnorm.trace(ControlFlow(), leaf_modules=[Branchy])
    by_name = graphnorm.trace(ControlFlow(), leaf_modules=["inner.1"])
    for gm in (by_type, by_name):
        targets = [n.target for n in gm.graph.nodes if n.op == "call_module"]
        assert targets == ["inner.0", "inner.1"]
    with pytest.raises(TraceError, match="not submodules"):
        graphnorm.trace(ControlFlow(), leaf_modules=["inner.7"])


def test_concrete_args_fix_control_flow() -> None:
    class Flag(nn.Module):
        def forward(self, x, double=False):
            return x * 2 if double else x

    gm = graphnorm.trace(Flag(), concrete_args={"double": True})
    assert [n.meta[OP_KEY] for n in gm.graph.nodes if n.meta[OP_KEY] == "mul"] == ["mul"]
    table = graphnorm.propagate(Flag(), graphnorm.InputStats([1.0], [3.0]), (1, 1), concrete_args={"double": True})
    assert table["output"].mean.item() == 2.0 and table["output"].var.item() == 36.0


def test_a_lone_leaf_module_is_one_call() -> None:
    gm = graphnorm.trace(nn.BatchNorm2d(3))
    assert [n.meta[OP_KEY] for n in gm.graph.nodes] == ["placeholder", "batch_norm", "output"]


def test_the_model_is_not_modified() -> None:
    model = Spellings()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    graphnorm.trace(model)
    graphnorm.propagate(model, graphnorm.InputStats.standard(3), (1, 3, 4, 4))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(isinstance(m, torch.fx.GraphModule) for m in model.modules())
