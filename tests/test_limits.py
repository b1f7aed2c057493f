"""benchmarks/limits.py: FLOPs counted by kind, nested phases, the arithmetic floor of a phase."""

import torch
import torch.nn.functional as F

from benchmarks import limits
from benchmarks.limits import MatrixFlops, Phases


def test_matrix_flops_counts_convs_and_matmuls_forward_and_backward():
    a = torch.randn(8, 16, requires_grad=True)
    b = torch.randn(16, 4)
    x = torch.randn(1, 2, 5, 5)
    w = torch.randn(3, 2, 3, 3)
    with MatrixFlops() as counter:
        y = a @ b  # 2 * 8 * 16 * 4 = 1024
        F.conv2d(x, w)  # 2 * (3 * 3 * 3) output pixels x 2 * 3 * 3 = 972
        y.sum().backward()  # grad of a only: 2 * 8 * 4 * 16 = 1024
    assert counter.counts == {"conv": 972, "matmul": 2048}


def test_nested_phases_and_exclusive_time():
    phases = Phases(torch.device("cpu"), count_flops=True)
    m = torch.randn(32, 32)
    with phases("outer"):
        m @ m
        with phases("inner"):
            m @ m
    assert phases.flops["outer"]["matmul"] == 2 * 2 * 32**3 and phases.flops["inner"]["matmul"] == 2 * 32**3
    phases.exclusive("outer", "inner", "rest")
    assert "outer" not in phases.seconds and phases.flops["rest"] == {"conv": 0, "matmul": 2 * 32**3}
    assert 0 <= phases.seconds["rest"] and phases.seconds["inner"] > 0


def test_floor_and_peak_rates():
    probes = [dict(kind="conv", dtype="float32", flop_per_s=100.0), dict(kind="conv", dtype="float32", flop_per_s=200.0),
              dict(kind="matmul", dtype="float32", flop_per_s=50.0), dict(kind="matmul", dtype="bfloat16", flop_per_s=9e9)]
    rates = limits.peak_rates(probes, "float32")
    assert rates == {"conv": 200.0, "matmul": 50.0}
    assert limits.floor_seconds({"conv": 400, "matmul": 100}, rates) == 4.0
