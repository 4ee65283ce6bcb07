"""`autodeco eval` and `autodeco data`: evaluate decoding methods on benchmarks; build training data by rejection
sampling.

    autodeco eval --model runs/heads --benchmarks aime24.jsonl aime25.jsonl \\
        --methods greedy,default,oracle,meanshift,autodeco --n 16 --seeds 8 --k 1,16 --output-dir runs/eval
    autodeco eval ... --oracle-n 4 --oracle-seeds 2          # cheaper oracle search, chosen (T, P) rerun at full n
    autodeco eval ... --methods meanshift --calibration train.jsonl    # MeanShift's T, P from calibration data
    autodeco eval --diagnose train.jsonl --model runs/heads [--output-dir runs/diag]   # gain decomposition
    autodeco data --model BASE_OR_AUTODECO_DIR --problems train_problems.jsonl --n 8 --output train.jsonl
    accelerate launch -m autodeco.evaluation.eval_cli eval ...   # several processes share the work

Rerunning the same `autodeco eval` command resumes: finished work is read back from OUTPUT_DIR/records.jsonl.
What every number means: autodeco/evaluation/runner.py; the report files: autodeco/evaluation/report.py; the data
builder's filter: autodeco/evaluation/data_builder.py.

This module exposes `add_eval_parser(subparsers)` and `add_data_parser(subparsers)` for autodeco/cli.py;
`python -m autodeco.evaluation.eval_cli {eval,data} ...` runs them on their own. Errors in what is passed (bad rows,
unknown methods, k larger than the samples) are one line naming the problem, exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from autodeco.cli import load_tokenizer, resolve_dtype

DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got '{text}'") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got '{text}'") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {value}")
    return value


def _k_list(text: str) -> list[int]:
    values = []
    for part in text.replace(" ", ",").split(","):
        if not part:
            continue
        try:
            value = int(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated positive integers like 1,16, got '{text}'") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"every k must be >= 1, got {value}")
        values.append(value)
    if not values:
        raise argparse.ArgumentTypeError("give at least one k, e.g. 1,16")
    return sorted(set(values))


def _common_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=_positive_int, default=None,
                   help="tokens to generate per completion at most (default 2048)")
    p.add_argument("--batch-size", type=_positive_int, default=None,
                   help="sequences per generate call at most; a problem's n samples are one call when n <= this "
                        "(default 32; halved automatically on CUDA out-of-memory)")
    p.add_argument("--template", default=None, metavar="TEXT_OR_FILE",
                   help="prompt template with {problem} and {instruction} placeholders (or a file holding one), "
                        "put in the chat template's user turn; default: problem, blank line, the paper's \\boxed{} "
                        "instruction")
    p.add_argument("--limit", type=_positive_int, default=None, help="use only the first N problems of each file")
    p.add_argument("--seed", type=int, default=0, help="base seed; every work item's seed is derived from it (default 0)")
    add_model_loading_flags(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_model_loading_flags(p: argparse.ArgumentParser) -> None:
    """--dtype, --device and --trust-remote-code, as every command that loads a model for inference takes them."""
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                   help="dtype of the base model (the heads stay float32); auto = bfloat16 on a CUDA GPU that "
                        "supports it, else float32")
    p.add_argument("--device", default="auto",
                   help="torch device; auto = this process's GPU under accelerate launch, else cuda if available, "
                        "else cpu")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow the base model's own modelling code from its repository (off by default)")


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `eval` subcommand to `subparsers` and return its parser."""
    from autodeco.evaluation.methods import VALID_METHODS

    p = subparsers.add_parser(
        "eval",
        help="evaluate decoding methods (greedy, static, oracle, meanshift, AutoDeco, ...) on benchmarks",
        description="Sample n completions per problem and seed with each method, score them, and write "
                    "records.jsonl (resumable), results.json, results.md (the paper's Table 1 layout) and plots to "
                    "--output-dir. With --diagnose, run the inverse-temperature gain decomposition instead.",
        epilog="Methods: " + ", ".join(VALID_METHODS) + ". Several processes: accelerate launch -m "
               "autodeco.evaluation.eval_cli eval ... (each writes records.rank{R}.jsonl; rank 0 merges and reports).",
    )
    p.add_argument("--model", required=True, help="AutoDeco directory (heads-only or merged) to evaluate")
    p.add_argument("--benchmarks", nargs="+", metavar="FILE",
                   help="benchmark JSONL files ({\"problem\", \"gt\", optional \"id\"} per line; the name is the file "
                        "stem) or Hugging Face dataset names")
    p.add_argument("--methods", default="greedy,default,autodeco",
                   help="comma-separated methods (default greedy,default,autodeco); see the list below")
    p.add_argument("--n", type=_positive_int, default=16, help="samples per problem and seed (default 16)")
    p.add_argument("--seeds", type=_positive_int, default=8,
                   help="seeds; pass@1 is reported as mean ± std over them (default 8)")
    p.add_argument("--k", type=_k_list, default=None, metavar="K,K,...",
                   help="k values for pass@k and maj@k, each at most n x seeds (default 1,N with N = --n)")
    p.add_argument("--output-dir", default=None,
                   help="where records.jsonl, results.json, results.md and the plots go (required for evaluation; "
                        "with --diagnose, where diagnostics.json goes)")
    p.add_argument("--calibration", nargs="+", metavar="FILE", default=None,
                   help="training-format JSONL files whose supervised tokens give MeanShift's T and P (default: the "
                        "tokens AutoDeco generates in this evaluation)")
    p.add_argument("--oracle-n", type=_positive_int, default=None,
                   help="samples per problem and seed for each oracle grid point (default --n)")
    p.add_argument("--oracle-seeds", type=_positive_int, default=None,
                   help="seeds for each oracle grid point (default --seeds); with fewer, the chosen (T, P) is rerun "
                        "at --n x --seeds")
    p.add_argument("--no-plots", action="store_true", help="do not draw the PNG plots")
    p.add_argument("--pack-samples", action="store_true",
                   help="sample up to max(1, batch_size // n) problems in one generate call instead of one "
                        "problem per call: much faster for small models; results then depend on --batch-size "
                        "(which then enters the records' key)")
    p.add_argument("--diagnose", nargs="+", metavar="FILE", default=None,
                   help="instead of evaluating, teacher-force the model over these training-format JSONL files and "
                        "print the inverse-temperature gain decomposition (saved to OUTPUT_DIR/diagnostics.json)")
    _common_model_flags(p)
    p.set_defaults(func=cmd_eval)
    return p


def add_data_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `data` subcommand to `subparsers` and return its parser."""
    p = subparsers.add_parser(
        "data",
        help="build head-training data by rejection sampling (keep verified-correct solutions)",
        description="Sample --n solutions per problem from the base distribution (T=1, P=1 unless told), keep the "
                    "ones whose answer verifies and that ended with EOS, deduplicate, cap per problem, and write "
                    "prompt/completion JSONL for `autodeco train`.",
    )
    p.add_argument("--model", required=True, help="base model directory / hub name, or an AutoDeco directory (its "
                                                  "heads are bypassed: sampling is static)")
    p.add_argument("--problems", required=True, nargs="+", metavar="FILE",
                   help="problem JSONL files in benchmark format ({\"problem\", \"gt\", optional \"id\"} per line)")
    p.add_argument("--n", type=_positive_int, default=8, help="solutions sampled per problem (default 8)")
    p.add_argument("--output", required=True, help="training JSONL to write (atomically); samples are kept in "
                                                    "OUTPUT.samples.jsonl so a rerun resumes or only re-filters")
    p.add_argument("--max-per-problem", type=_positive_int, default=None,
                   help="keep at most this many distinct correct solutions per problem (default: all)")
    p.add_argument("--temperature", type=_positive_float, default=1.0, help="sampling temperature (default 1.0)")
    p.add_argument("--top-p", type=_positive_float, default=1.0, help="sampling top-p in (0, 1] (default 1.0)")
    p.add_argument("--pack-samples", action="store_true",
                   help="sample up to max(1, batch_size // n) problems in one generate call instead of one "
                        "problem per call: much faster for small models; results then depend on --batch-size (and "
                        "on which problems were still pending)")
    _common_model_flags(p)
    p.set_defaults(func=cmd_data)
    return p


# ---------------------------------------------------------------------------------------------------- helpers


def _read_template(value: str | None) -> str | None:
    if value is None:
        return None
    path = Path(value)
    if "{" not in value and path.is_file():
        return path.read_text(encoding="utf-8")
    if "{problem}" not in value:
        raise ValueError(f"--template '{value}': neither a file nor a template containing {{problem}}.")
    return value


def _model_type(name: str) -> str | None:
    """model_type of a local model directory's config.json (None for a hub name)."""
    path = Path(name).expanduser()
    if not path.exists():
        if name.startswith((".", "/", "~")) or name.count("/") != 1:
            raise FileNotFoundError(f"--model '{name}' does not exist; pass a model directory (or a hub name).")
        return None
    config = path / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"--model '{name}' has no config.json; pass a model directory.")
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except json.JSONDecodeError as exc:
        raise ValueError(f"--model '{name}': config.json is not valid JSON ({exc}).") from None


def _process_state(device: str):
    from accelerate import PartialState

    return PartialState(cpu=device == "cpu")


def _device(choice: str, state) -> torch.device:
    if choice == "auto":
        return state.device
    device = torch.device(choice)
    if device.type == "cuda" and device.index is None and state.num_processes > 1:
        return state.device  # one GPU per process
    return device



def load_model(name: str, *, dtype: str = "auto", device: torch.device, require_autodeco: bool = True,
               trust_remote_code: bool = False):
    """(model, tokenizer) on `device`, in eval mode. An AutoDeco directory loads with its heads; a plain base is
    refused when `require_autodeco`, else loaded as is."""
    from transformers import AutoModelForCausalLM

    from autodeco import AutoDecoModelForCausalLM

    model_type = _model_type(name)
    torch_dtype = resolve_dtype(dtype, on_gpu=device.type == "cuda")
    if model_type == "autodeco" or (model_type is None and require_autodeco):
        model = AutoDecoModelForCausalLM.from_pretrained(name, dtype=torch_dtype, trust_remote_code=trust_remote_code)
        tokenizer = load_tokenizer(name, model.config.base_model_name_or_path)
    elif require_autodeco:
        raise ValueError(
            f"--model '{name}' is a plain '{model_type}' model, not an AutoDeco one: evaluation needs the heads. "
            f"Create them with `autodeco init --base {name} --output-dir DIR` (or train them) and pass DIR."
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype, trust_remote_code=trust_remote_code)
        tokenizer = load_tokenizer(name)
    return model.to(device).eval(), tokenizer


def _check_files(flag: str, files) -> None:
    for f in files or ():
        if not Path(f).is_file():
            raise FileNotFoundError(f"{flag} '{f}' does not exist.")


# ---------------------------------------------------------------------------------------------------- commands


def cmd_eval(args) -> dict:
    """Run `autodeco eval`; returns results.json's content (or the decomposition with --diagnose)."""
    if args.diagnose:
        return _cmd_diagnose(args)
    from autodeco.evaluation.benchmarks import load_benchmark
    from autodeco.evaluation.methods import parse_methods
    from autodeco.evaluation.runner import DEFAULT_BATCH_SIZE, DEFAULT_MAX_NEW_TOKENS, run_evaluation

    # Everything that can be wrong in the flags and files is checked before a model is loaded.
    if not args.benchmarks:
        raise ValueError("--benchmarks is required: pass one or more benchmark JSONL files (or use --diagnose FILE).")
    if not args.output_dir:
        raise ValueError("--output-dir is required: the directory for records.jsonl, results.json and results.md.")
    if Path(args.output_dir).is_file():
        raise ValueError(f"--output-dir '{args.output_dir}' is a file; pass a directory.")
    methods = parse_methods(args.methods)
    ks = args.k if args.k is not None else sorted({1, args.n})
    for k in ks:
        if k > args.n * args.seeds:
            raise ValueError(f"--k {k}: pass@{k} and maj@{k} need at least {k} samples per problem, but --n {args.n} "
                             f"x --seeds {args.seeds} gives {args.n * args.seeds}; raise --n/--seeds or lower --k.")
    kinds = {m.kind for m in methods}
    if args.calibration and "meanshift" not in kinds:
        raise ValueError("--calibration only sets MeanShift's T and P: add meanshift to --methods or drop --calibration.")
    if (args.oracle_n or args.oracle_seeds) and "oracle" not in kinds:
        raise ValueError("--oracle-n/--oracle-seeds only apply to the oracle method: add oracle to --methods.")
    _check_files("--calibration", args.calibration)
    template = _read_template(args.template)
    benchmarks = [load_benchmark(spec, limit=args.limit) for spec in args.benchmarks]

    state = _process_state(args.device)
    device = _device(args.device, state)
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=device, trust_remote_code=args.trust_remote_code)
    results = run_evaluation(
        model, tokenizer, benchmarks, methods,
        n=args.n, seeds=args.seeds, ks=ks, output_dir=args.output_dir,
        max_new_tokens=args.max_new_tokens or DEFAULT_MAX_NEW_TOKENS,
        batch_size=args.batch_size or DEFAULT_BATCH_SIZE,
        calibration_files=args.calibration, template=template, accelerator=state,
        oracle_n=args.oracle_n, oracle_seeds=args.oracle_seeds, seed=args.seed,
        plots=not args.no_plots, progress=not args.no_progress, pack_samples=args.pack_samples,
    )
    if state.is_main_process:
        print((Path(args.output_dir) / "results.md").read_text(encoding="utf-8"), flush=True)
        print(f"Wrote {args.output_dir}/results.json, results.md, records.jsonl"
              + (f" and {', '.join(results.get('plots', []))}" if results.get("plots") else ""), flush=True)
    return results


def _cmd_diagnose(args) -> dict:
    from autodeco.evaluation.diagnostics import decompose
    from autodeco.evaluation.report import write_json_atomic

    if args.benchmarks:
        raise ValueError("--diagnose runs the decomposition instead of an evaluation; drop --benchmarks (or --diagnose).")
    _check_files("--diagnose", args.diagnose)
    if args.output_dir and Path(args.output_dir).is_file():
        raise ValueError(f"--output-dir '{args.output_dir}' is a file; pass a directory.")
    state = _process_state(args.device)
    device = _device(args.device, state)
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=device, trust_remote_code=args.trust_remote_code)
    report = decompose(model, tokenizer, list(args.diagnose))
    print(report["summary"], flush=True)
    if args.output_dir:
        path = Path(args.output_dir) / "diagnostics.json"
        write_json_atomic(path, {"model": args.model, "files": list(args.diagnose), **report})
        print(f"Wrote {path}", flush=True)
    return report


def cmd_data(args) -> dict:
    """Run `autodeco data`; returns the counts it prints."""
    from autodeco.evaluation.benchmarks import load_benchmark
    from autodeco.evaluation.data_builder import build_training_data

    if not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p {args.top_p}: must be in (0, 1]; 1 keeps every token.")
    if Path(args.output).is_dir():
        raise ValueError(f"--output '{args.output}' is a directory; pass the path of the JSONL file to write.")
    template = _read_template(args.template)
    for spec in args.problems:  # bad rows are reported before the model is loaded
        load_benchmark(spec, limit=args.limit)
    state = _process_state(args.device)
    if state.num_processes > 1:
        raise ValueError("`autodeco data` runs in one process; launch it without accelerate.")
    device = _device(args.device, state)
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=device, require_autodeco=False,
                                  trust_remote_code=args.trust_remote_code)
    return build_training_data(
        model, tokenizer, args.problems, args.n, output=args.output, max_per_problem=args.max_per_problem,
        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, template=template,
        temperature=args.temperature, top_p=args.top_p, seed=args.seed, limit=args.limit,
        progress=not args.no_progress, pack_samples=args.pack_samples,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="autodeco", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_eval_parser(subparsers)
    add_data_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """`python -m autodeco.evaluation.eval_cli {eval,data} ...` with the CLI's one-line errors (exit 2)."""
    args = build_parser().parse_args(argv)
    from autodeco.cli import run_parsed

    return run_parsed(args)


if __name__ == "__main__":
    sys.exit(main())
