"""Accuracy of the per-sample normalization rule (LayerNorm over D units) against Monte Carlo: the population
limit (the sample's statistics replaced by their expectation) beside graphnorm's second-order rule
(graphnorm/rules/feature_norms.py), for D = 16, 64 and 256 units with spread means and stds.

    python benchmarks/feature_norms.py            # about 10 seconds
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from common import markdown_table, write_result

import graphnorm

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from montecarlo import monte_carlo


def population_limit(mean: torch.Tensor, var: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    center = mean.mean()
    spread = (var + mean * mean).mean() - center * center
    return (mean - center) / (spread + eps).sqrt(), var / (spread + eps)


def main() -> None:
    rows = []
    for units in (16, 64, 256):
        mean = torch.linspace(-2, 2, units, dtype=torch.float64)
        std = torch.linspace(0.5, 2, units, dtype=torch.float64)
        norm = torch.nn.LayerNorm(units, elementwise_affine=False).double()
        reference = monte_carlo(norm, mean.tolist(), std.tolist(), (units,))
        rule = graphnorm.propagate(norm, graphnorm.InputStats(mean, std), (1, units), dtype=torch.float64)["output"]
        limit_mean, limit_var = population_limit(mean, std.square(), norm.eps)
        std_ref = reference.var.sqrt()
        for name, m, v in (("population limit", limit_mean, limit_var), ("graphnorm rule", rule.mean, rule.var)):
            rows.append({"units": units, "method": name,
                         "mean_error_worst_std": float(((m - reference.mean).abs() / std_ref).max()),
                         "var_error_worst_rel": float(((v - reference.var).abs() / reference.var).max())})
    write_result("feature_norms", {"command": "python benchmarks/feature_norms.py", "rows": rows})
    print(markdown_table(["units D", "method", "worst mean error (std)", "worst variance error (relative)"],
                         [[str(r["units"]), r["method"], f"{r['mean_error_worst_std']:.3f}",
                           f"{100 * r['var_error_worst_rel']:.1f}%"] for r in rows]))


if __name__ == "__main__":
    main()
