"""graphnorm: batch-independent normalization for PyTorch by analytic moment propagation.

Trace a model with torch.fx (:func:`trace`), propagate the per-channel mean and variance of the data
distribution through its graph analytically (:func:`propagate`), rewrite BatchNorm into normalizers whose
statistics are functions of the weights, not of the batch (:func:`convert`), export the result to ONNX with
onnxruntime verification (:func:`export_onnx`), and compare analytic with measured statistics
(:func:`inspect`). A converted trained model is calibrated to its running statistics, so it computes what the
original computes until its weights move; :class:`Agreement` in the conversion log says how closely it does.
"""

from .agreement import Agreement
from .converted import ConvertedModule
from .errors import GraphnormError, InputStatsError, RuleError, TraceError, UnsupportedOpError
from .export import ExportError, ExportResult, VerificationError, export_onnx
from .freeze import freeze
from .inspection import inspect
from .moments import Moments
from .noise import kl_divergence, predict
from .ops import register_op
from .propagate import MomentPropagator, MomentTable, propagate
from .report import Report
from .rewrite import ConversionLog, Rewrite, Skip, convert
from .rules import RULES, moment_rule
from .stats import InputStats
from .trace import trace

__version__ = "0.1.0"

__all__ = [
    "RULES",
    "Agreement",
    "ConversionLog",
    "ConvertedModule",
    "ExportError",
    "ExportResult",
    "GraphnormError",
    "InputStats",
    "InputStatsError",
    "MomentPropagator",
    "MomentTable",
    "Moments",
    "Report",
    "Rewrite",
    "RuleError",
    "Skip",
    "TraceError",
    "UnsupportedOpError",
    "VerificationError",
    "__version__",
    "convert",
    "export_onnx",
    "freeze",
    "inspect",
    "kl_divergence",
    "moment_rule",
    "predict",
    "propagate",
    "register_op",
    "trace",
]
