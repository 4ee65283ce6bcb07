"""`autodeco eval` (and `eval --diagnose`) and `autodeco data`: thin wrappers over autodeco.evaluation.

    autodeco eval --model runs/heads --benchmarks aime24.jsonl --methods greedy,default,oracle,meanshift,autodeco \\
        --n 16 --seeds 8 --k 1,16 --output-dir runs/eval
    autodeco eval --diagnose train.jsonl --model runs/heads [--output-dir runs/diag]     # gain decomposition
    autodeco data --model BASE_OR_AUTODECO_DIR --problems train_problems.jsonl --n 8 --output train.jsonl
    accelerate launch -m autodeco.cli eval ...                                             # several processes
    autodeco eval --engine vllm --vllm-arg tensor_parallel_size=8 ...                     # vLLM (one process)

Rerunning the same `autodeco eval` resumes from OUTPUT_DIR/records.jsonl. Flags and files are checked before a
model is loaded; mistakes are one line naming the problem, exit status 2. More: docs/evaluation.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from autodeco.atomic import write_json_atomic
from autodeco.cli.args import (
    add_engine_flags,
    add_model_loading_flags,
    k_list,
    positive_float,
    positive_int,
    read_template,
    vllm_kwargs,
)
from autodeco.evaluation.benchmarks import load_benchmark
from autodeco.evaluation.data_builder import build_training_data
from autodeco.evaluation.diagnostics import decompose
from autodeco.evaluation.generation import DEFAULT_BATCH_SIZE, DEFAULT_MAX_NEW_TOKENS
from autodeco.evaluation.loading import load_model, process_state, resolve_device
from autodeco.evaluation.methods import VALID_METHODS, parse_methods
from autodeco.evaluation.runner import run_evaluation
from autodeco.validation import check_input_file
from autodeco.vllm.engine import VLLMEngine  # imports no vLLM itself: only VLLMEngine() does


__all__ = ["register", "add_eval_parser", "add_data_parser", "cmd_eval", "cmd_data"]


def _common_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=positive_int, default=None,
                   help="tokens to generate per completion at most (default 2048)")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="sequences per generate call at most; a problem's n samples are one call when n <= this "
                        "(default 32; halved automatically on CUDA out-of-memory)")
    p.add_argument("--template", default=None, metavar="TEXT_OR_FILE",
                   help="prompt template with {problem} and {instruction} placeholders (or a file holding one), "
                        "put in the chat template's user turn; default: problem, blank line, the paper's \\boxed{} "
                        "instruction")
    p.add_argument("--limit", type=positive_int, default=None, help="use only the first N problems of each file")
    p.add_argument("--seed", type=int, default=0, help="base seed; every work item's seed is derived from it (default 0)")
    add_model_loading_flags(p)
    add_engine_flags(p, "generation engine: hf = transformers' generate (default), vllm = vLLM in this process "
                        "(pip install \"autodeco[vllm]\"; a merged directory, or heads-only with a local base; "
                        "records are kept apart per engine)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `eval` subcommand to `subparsers` and return its parser."""
    p = subparsers.add_parser(
        "eval",
        help="evaluate decoding methods (greedy, static, oracle, meanshift, AutoDeco, ...) on benchmarks",
        description="Sample n completions per problem and seed with each method, score them, and write "
                    "records.jsonl (resumable), results.json, results.md (the paper's Table 1 layout) and plots to "
                    "--output-dir. With --diagnose, run the inverse-temperature gain decomposition instead.",
        epilog="Methods: " + ", ".join(VALID_METHODS) + ". Several processes: accelerate launch -m "
               "autodeco.cli eval ... (each writes records.rank{R}.jsonl; rank 0 merges and reports).",
    )
    p.add_argument("--model", required=True, help="AutoDeco directory (heads-only or merged) to evaluate")
    p.add_argument("--benchmarks", nargs="+", metavar="FILE",
                   help="benchmark JSONL files ({\"problem\", \"gt\", optional \"id\"} per line; the name is the file "
                        "stem) or Hugging Face dataset names")
    p.add_argument("--methods", default="greedy,default,autodeco",
                   help="comma-separated methods (default greedy,default,autodeco); see the list below")
    p.add_argument("--n", type=positive_int, default=16, help="samples per problem and seed (default 16)")
    p.add_argument("--seeds", type=positive_int, default=8,
                   help="seeds; pass@1 is reported as mean ± std over them (default 8)")
    p.add_argument("--k", type=k_list, default=None, metavar="K,K,...",
                   help="k values for pass@k and maj@k, each at most n x seeds (default 1,N with N = --n)")
    p.add_argument("--output-dir", default=None,
                   help="where records.jsonl, results.json, results.md and the plots go (required for evaluation; "
                        "with --diagnose, where diagnostics.json goes)")
    p.add_argument("--calibration", nargs="+", metavar="FILE", default=None,
                   help="training-format JSONL files whose supervised tokens give MeanShift's T and P (default: the "
                        "tokens AutoDeco generates in this evaluation)")
    p.add_argument("--oracle-n", type=positive_int, default=None,
                   help="samples per problem and seed for each oracle grid point (default --n)")
    p.add_argument("--oracle-seeds", type=positive_int, default=None,
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
    p.add_argument("--n", type=positive_int, default=8, help="solutions sampled per problem (default 8)")
    p.add_argument("--output", required=True, help="training JSONL to write (atomically); samples are kept in "
                                                    "OUTPUT.samples.jsonl so a rerun resumes or only re-filters")
    p.add_argument("--max-per-problem", type=positive_int, default=None,
                   help="keep at most this many distinct correct solutions per problem (default: all)")
    p.add_argument("--temperature", type=positive_float, default=1.0, help="sampling temperature (default 1.0)")
    p.add_argument("--top-p", type=positive_float, default=1.0, help="sampling top-p in (0, 1] (default 1.0)")
    p.add_argument("--pack-samples", action="store_true",
                   help="sample up to max(1, batch_size // n) problems in one generate call instead of one "
                        "problem per call: much faster for small models; results then depend on --batch-size (and "
                        "on which problems were still pending)")
    _common_model_flags(p)
    p.set_defaults(func=cmd_data)
    return p


def register(subparsers) -> None:
    """Add `eval` and `data` to the `autodeco` command's subparsers."""
    add_eval_parser(subparsers)
    add_data_parser(subparsers)


def _vllm_engine(args, kwargs: dict | None, model, *, traces: bool = True):
    """The VLLMEngine for --engine vllm, tracing T/P on `model` (already loaded: not loaded twice); None for hf."""
    if kwargs is None:
        return None
    return VLLMEngine(args.model, traces=traces, trace_model=model if traces else None, **kwargs)


def _check_one_process(state, args) -> None:
    if args.engine == "vllm" and state.num_processes > 1:
        raise ValueError("--engine vllm runs in one process (vLLM spreads over GPUs itself: --vllm-arg "
                         "tensor_parallel_size=N); launch it without accelerate.")


def _check_files(flag: str, files) -> None:
    for f in files or ():
        check_input_file(f, flag)


def cmd_eval(args) -> dict:
    """Run `autodeco eval`; returns results.json's content (or the decomposition with --diagnose)."""
    if args.diagnose:
        return _cmd_diagnose(args)
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
    if args.engine == "vllm" and "edt" in kinds:
        raise ValueError("--methods edt: EDT's logits processor has no vLLM form; evaluate it with --engine hf.")
    _check_files("--calibration", args.calibration)
    template = read_template(args.template)
    benchmarks = [load_benchmark(spec, limit=args.limit) for spec in args.benchmarks]
    llm_kwargs = vllm_kwargs(args)

    state = process_state(args.device)
    _check_one_process(state, args)
    device = resolve_device(args.device, state)
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=device, trust_remote_code=args.trust_remote_code)
    engine = _vllm_engine(args, llm_kwargs, model)
    try:
        results = run_evaluation(
            model, tokenizer, benchmarks, methods,
            n=args.n, seeds=args.seeds, ks=ks, output_dir=args.output_dir,
            max_new_tokens=args.max_new_tokens or DEFAULT_MAX_NEW_TOKENS,
            batch_size=args.batch_size or DEFAULT_BATCH_SIZE,
            calibration_files=args.calibration, template=template, accelerator=state,
            oracle_n=args.oracle_n, oracle_seeds=args.oracle_seeds, seed=args.seed,
            plots=not args.no_plots, progress=not args.no_progress, pack_samples=args.pack_samples, engine=engine,
        )
    finally:
        if engine is not None:
            engine.close()
    if state.is_main_process:
        print((Path(args.output_dir) / "results.md").read_text(encoding="utf-8"), flush=True)
        print(f"Wrote {args.output_dir}/results.json, results.md, records.jsonl"
              + (f" and {', '.join(results.get('plots', []))}" if results.get("plots") else ""), flush=True)
    return results


def _cmd_diagnose(args) -> dict:
    if args.benchmarks:
        raise ValueError("--diagnose runs the decomposition instead of an evaluation; drop --benchmarks (or --diagnose).")
    _check_files("--diagnose", args.diagnose)
    if args.output_dir and Path(args.output_dir).is_file():
        raise ValueError(f"--output-dir '{args.output_dir}' is a file; pass a directory.")
    state = process_state(args.device)
    device = resolve_device(args.device, state)
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
    if not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p {args.top_p}: must be in (0, 1]; 1 keeps every token.")
    if Path(args.output).is_dir():
        raise ValueError(f"--output '{args.output}' is a directory; pass the path of the JSONL file to write.")
    template = read_template(args.template)
    for spec in args.problems:  # bad rows are reported before the model is loaded
        load_benchmark(spec, limit=args.limit)
    llm_kwargs = vllm_kwargs(args)
    state = process_state(args.device)
    if state.num_processes > 1:
        raise ValueError("`autodeco data` runs in one process; launch it without accelerate.")
    # With vLLM sampling, the transformers model only gives the sample keys and the context length (data needs no
    # T/P traces): on the CPU unless --device says otherwise, so the GPU is vLLM's.
    device = resolve_device("cpu" if llm_kwargs is not None and args.device == "auto" else args.device, state)
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=device, require_autodeco=False,
                                  trust_remote_code=args.trust_remote_code)
    engine = _vllm_engine(args, llm_kwargs, model, traces=False)  # static sampling: its T/P are constants
    try:
        return build_training_data(
            model, tokenizer, args.problems, args.n, output=args.output, max_per_problem=args.max_per_problem,
            max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, template=template,
            temperature=args.temperature, top_p=args.top_p, seed=args.seed, limit=args.limit,
            progress=not args.no_progress, pack_samples=args.pack_samples, engine=engine,
        )
    finally:
        if engine is not None:
            engine.close()
