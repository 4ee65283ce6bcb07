"""Evaluation of decoding methods: benchmarks, scoring, the runner, reports, diagnostics, control, data building.

    from autodeco.evaluation import load_benchmark, parse_methods, run_evaluation, score_math, pass_at_k

Modules: benchmarks, answers (extraction, letters, exact boxes), verify (math-verify pool), metrics, methods,
generation (requests, completions, the Engine interface), records (store, keys, seeds), runner, results,
report, diagnostics, control (eval-control), data_builder, loading (models for the CLI). See docs/evaluation.md.
"""

from autodeco.evaluation.answers import extract_answer, score_choice, score_exact
from autodeco.evaluation.benchmarks import load_benchmark
from autodeco.evaluation.control import control_markdown, evaluate_control
from autodeco.evaluation.data_builder import build_training_data
from autodeco.evaluation.diagnostics import decompose
from autodeco.evaluation.methods import parse_methods
from autodeco.evaluation.metrics import majority_correct, pass_at_k
from autodeco.evaluation.report import results_markdown, write_reports
from autodeco.evaluation.runner import run_evaluation
from autodeco.evaluation.verify import close_math_verifier, score_math, score_math_many

__all__ = [
    "score_math",
    "score_math_many",
    "score_choice",
    "score_exact",
    "extract_answer",
    "close_math_verifier",
    "pass_at_k",
    "majority_correct",
    "run_evaluation",
    "load_benchmark",
    "parse_methods",
    "evaluate_control",
    "control_markdown",
    "build_training_data",
    "decompose",
    "write_reports",
    "results_markdown",
]
