"""`autodeco init | generate | merge | split`: fresh heads on a base, generation with per-token decoding, and the
heads-only <-> self-contained directory layouts.

    autodeco init     --base BASE --output-dir DIR          fresh heads on a base model (heads-only directory)
    autodeco generate --model DIR --prompt TEXT [--show-trace]
    autodeco merge    --model DIR --output-dir DIR           heads-only -> self-contained (base + heads)
    autodeco split    --model DIR --output-dir DIR           self-contained -> heads-only
"""

from __future__ import annotations

import torch
from rich.console import Console
from rich.table import Table

from autodeco.modeling.io import DTYPES, copy_tokenizer, load_tokenizer
from autodeco.cli.args import DTYPE_CHOICES, positive_int
from autodeco.modeling import AutoDecoModelForCausalLM

__all__ = ["cmd_generate", "cmd_init", "cmd_merge", "cmd_split", "register"]


def cmd_init(args) -> None:
    overrides = dict(max_temperature=args.max_temperature, head_hidden_size=args.head_hidden_size,
                     top_p_features=not args.no_top_p_features)
    model = AutoDecoModelForCausalLM.from_base(
        args.base, seed=args.seed, dtype=DTYPES[args.dtype], trust_remote_code=args.trust_remote_code, **overrides
    )
    model.save_pretrained(args.output_dir)
    copied = copy_tokenizer(args.base, args.output_dir)
    heads = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("llm."))
    print(f"Wrote fresh AutoDeco heads ({heads:,} parameters) for base '{model.config.base_model_name_or_path}' "
          f"to {args.output_dir}" + ("" if copied else " (no tokenizer found to copy)"))


def cmd_generate(args) -> None:
    model = AutoDecoModelForCausalLM.from_pretrained(args.model, dtype=DTYPES[args.dtype])
    model.to(args.device).eval()
    tokenizer = load_tokenizer(args.model, model.config.base_model_name_or_path)
    if args.chat:
        if tokenizer.chat_template is None:
            raise ValueError(f"--chat: the tokenizer of '{args.model}' has no chat template; drop --chat.")
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], tokenize=False,
                                               add_generation_prompt=True)
    else:
        prompt = args.prompt
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=not args.chat).to(args.device)
    gen_kwargs = dict(max_new_tokens=args.max_new_tokens, return_dict_in_generate=True)
    if args.greedy:
        gen_kwargs["do_sample"] = False
    if args.temperature is not None:
        gen_kwargs["temperature"] = args.temperature
    if args.top_p is not None:
        gen_kwargs["top_p"] = args.top_p
    if args.seed is not None:
        torch.manual_seed(args.seed)
    out = model.generate(**inputs, **gen_kwargs)
    new_tokens = out.sequences[0, inputs["input_ids"].shape[1]:]
    console = Console()
    console.print(tokenizer.decode(new_tokens, skip_special_tokens=True), markup=False, highlight=False)
    if args.show_trace:
        mode = "greedy (heads' predictions shown)" if args.greedy else (
            "static" if args.temperature is not None or args.top_p is not None else "dynamic")
        table = Table(title=f"Per-token decoding values ({mode})")
        table.add_column("#", justify="right")
        table.add_column("token")
        table.add_column("T", justify="right")
        table.add_column("P", justify="right")
        for i, token_id in enumerate(new_tokens.tolist()):
            t, p = float(out.temperatures[0, i]), float(out.top_ps[0, i])
            if t != t:  # NaN: padding after EOS
                break
            colour = "blue" if t < 0.7 else "red" if t > 1.3 else "default"
            table.add_row(str(i), repr(tokenizer.decode([token_id])), f"[{colour}]{t:.3f}[/]", f"{p:.3f}")
        console.print(table)


def cmd_merge(args) -> None:
    model = AutoDecoModelForCausalLM.from_pretrained(args.model)
    model.merge(args.output_dir, max_shard_size=args.max_shard_size)
    copy_tokenizer(args.model, args.output_dir) or copy_tokenizer(model.config.base_model_name_or_path or "", args.output_dir)
    print(f"Wrote merged model (base + heads) to {args.output_dir}")


def cmd_split(args) -> None:
    model = AutoDecoModelForCausalLM.from_pretrained(args.model)
    model.split(args.output_dir, base_output_dir=args.base_output_dir)
    copy_tokenizer(args.model, args.output_dir)
    if args.base_output_dir:
        copy_tokenizer(args.model, args.base_output_dir)
    print(f"Wrote heads-only model to {args.output_dir}" + (f" and its base to {args.base_output_dir}" if args.base_output_dir else ""))


def register(subparsers) -> None:
    """Add init, generate, merge and split to `subparsers`."""
    dtypes = sorted(DTYPE_CHOICES)
    p = subparsers.add_parser("init", help="wrap a base model with fresh heads and save the heads-only directory",
                              description="Create fresh AutoDeco heads on a base model and save config + heads (no "
                                          "base weights).")
    p.add_argument("--base", required=True, help="base causal LM: local directory or hub name (e.g. Qwen/Qwen2.5-0.5B)")
    p.add_argument("--output-dir", required=True, help="directory to write config.json, the heads and the tokenizer to")
    p.add_argument("--max-temperature", type=float, default=2.0, help="T = max_temperature * sigmoid(...) (default 2.0)")
    p.add_argument("--head-hidden-size", type=positive_int, default=256, help="hidden width of each head MLP (default 256)")
    p.add_argument("--no-top-p-features", action="store_true",
                   help="top-p head sees only [h, T], not the distribution statistics")
    p.add_argument("--seed", type=int, default=0, help="seed of the fresh heads (default 0)")
    p.add_argument("--dtype", choices=dtypes, default="auto", help="dtype to load the base in (default auto)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the base's own modelling code (off by default)")
    p.set_defaults(func=cmd_init)

    p = subparsers.add_parser("generate", help="generate with per-token dynamic decoding",
                              description="Generate a completion. By default every token is sampled with the heads' "
                                          "own temperature and top-p; --temperature/--top-p switch to static decoding.")
    p.add_argument("--model", required=True, help="AutoDeco directory (heads-only or merged) or hub name")
    p.add_argument("--prompt", required=True, help="prompt text")
    p.add_argument("--max-new-tokens", type=positive_int, default=128, help="tokens to generate at most (default 128)")
    p.add_argument("--show-trace", action="store_true", help="print a table of each generated token with its T and P")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn with the chat template")
    p.add_argument("--greedy", action="store_true", help="greedy decoding (the base's argmax; heads ignored)")
    p.add_argument("--temperature", type=float, help="static temperature instead of the heads' (heads bypassed)")
    p.add_argument("--top-p", type=float, help="static top-p instead of the heads' (heads bypassed)")
    p.add_argument("--seed", type=int, help="random seed for sampling")
    p.add_argument("--dtype", choices=dtypes, default="auto", help="dtype to load the base in (default auto)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device (default: cuda if available)")
    p.set_defaults(func=cmd_generate)

    p = subparsers.add_parser("merge", help="heads-only directory -> self-contained directory (base weights + heads)",
                              description="Write a self-contained directory holding the base weights and the heads.")
    p.add_argument("--model", required=True, help="heads-only AutoDeco directory")
    p.add_argument("--output-dir", required=True, help="new (or empty) directory for the merged model")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    p.set_defaults(func=cmd_merge)

    p = subparsers.add_parser("split", help="self-contained directory -> heads-only directory",
                              description="Write the heads-only layout of a merged model; optionally save its base too.")
    p.add_argument("--model", required=True, help="merged AutoDeco directory")
    p.add_argument("--output-dir", required=True, help="directory for config.json + heads")
    p.add_argument("--base-output-dir", help="also save the base model here and record it as the base")
    p.set_defaults(func=cmd_split)
