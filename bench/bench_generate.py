"""Decoding speed: AutoDeco dynamic decoding against transformers' greedy and temperature + top-p sampling.

The model is Qwen2.5-0.5B-shaped (Qwen2: hidden 896, 24 layers, 14 attention heads, 2 KV heads,
intermediate 4864, vocabulary 151,936, tied embeddings) with random weights built from its config under a
fixed seed, so nothing is downloaded. For each batch size it times, on the same random prompt:

  (a) greedy        base.generate(do_sample=False)
  (b) static        base.generate(do_sample=True, temperature=0.6, top_p=0.95, top_k=0)
  (c) autodeco      AutoDecoModelForCausalLM.from_base(base).generate()   (default: dynamic decoding)

Every run generates exactly --new-tokens tokens (EOS is disabled and the output length is asserted). Each
method is warmed up once, the methods are interleaved over --rounds rounds (a, b, c, a, b, c, ...), and the
median wall time of `generate` is reported as ms/step (wall / new tokens) and ms/token (wall / (batch x new
tokens)); prefill is included and identical for every method. Goals: (c) <= 1.05 x (a) and (c) <= 0.9 x (b),
judged on these wall medians. A streamer also clocks every decoding step; the median single-step time over
all rounds ("step ms") is far less sensitive to bursts of load from other processes.

A micro-benchmark then times the per-step sampling work alone on [batch, 151936] float32 logits (the random
model's next-token logits for the prompt, and the same logits x --peaked-scale): transformers' TemperatureLogitsWarper
+ TopPLogitsWarper (a full sort of the vocabulary), autodeco.sampling.dynamic_logits with per-row T and P,
and the top-p head's distribution_stats, which together explain the end-to-end ratios. The last table adds
each method's sampling work to the forward time (greedy's step minus its argmax): an estimate of the ratios
that machine noise cannot move.

Random weights give a nearly flat next-token distribution, so the 0.95 nucleus holds most of the vocabulary:
that is the worst case for dynamic_logits (its top-64 window never covers the nucleus, so it falls back to a
full sort). `--logit-scale S` multiplies the final norm's weight by S, i.e. every logit by S, which makes the
distributions peaked like a trained model's (x12: median nucleus ~16 tokens, ~2% of rows beyond the window);
the script prints the nucleus sizes it actually saw.

Run (full default configuration, a few minutes on 2 CPU cores):

    .venv/bin/python bench/bench_generate.py
    .venv/bin/python bench/bench_generate.py --layers 2 --new-tokens 16 --rounds 1   # quick check
    .venv/bin/python bench/bench_generate.py --logit-scale 12 --threads 1            # trained-like logits
    .venv/bin/python bench/bench_generate.py --device cuda                           # bf16 model on a GPU

On a CPU shared with other busy processes, `--threads` equal to the core count makes every parallel op wait
for a scheduler tick (steps become multiples of ~4 ms); `--threads 1` then gives far steadier numbers.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time

import torch
import transformers
from transformers import AutoModelForCausalLM, Qwen2Config
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper
from transformers.generation.streamers import BaseStreamer

from autodeco import AutoDecoModelForCausalLM
from autodeco.sampling import NUCLEUS_WINDOW, distribution_stats, dynamic_logits, scale_logits

STATIC_TEMPERATURE = 0.6
STATIC_TOP_P = 0.95
GOAL_VS_GREEDY = 1.05
GOAL_VS_STATIC = 0.9
METHODS = ("greedy", "static", "autodeco")
LABELS = {
    "greedy": "(a) greedy (do_sample=False)",
    "static": f"(b) static T={STATIC_TEMPERATURE} top_p={STATIC_TOP_P}",
    "autodeco": "(c) AutoDeco dynamic",
}


def qwen25_05b_config(layers: int) -> Qwen2Config:
    """Qwen2.5-0.5B's shape, with no EOS/BOS/PAD ids so that nothing stops generation early."""
    return Qwen2Config(
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=layers,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )


def build_base(layers: int, device: str, seed: int, logit_scale: float):
    torch.manual_seed(seed)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    base = AutoModelForCausalLM.from_config(qwen25_05b_config(layers), dtype=dtype).to(device).eval()
    if logit_scale != 1.0:
        with torch.no_grad():
            base.model.norm.weight.mul_(logit_scale)  # every logit is multiplied by logit_scale
    base.generation_config.eos_token_id = None
    base.generation_config.pad_token_id = None
    return base


class StepClock(BaseStreamer):
    """A streamer that only records when each decoding step hands over its tokens (the first put is the prompt)."""

    def __init__(self):
        self.stamps: list[float] = []

    def put(self, value) -> None:
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass

    def step_times(self) -> list[float]:
        """Seconds of each decoding step after the first (the first interval also holds the prefill)."""
        return [b - a for a, b in zip(self.stamps[1:], self.stamps[2:])]


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_generate(method: str, base, autodeco, inputs: dict, new_tokens: int, streamer=None):
    common = dict(**inputs, max_new_tokens=new_tokens, eos_token_id=None, streamer=streamer)
    if method == "greedy":
        return base.generate(**common, do_sample=False)
    if method == "static":
        return base.generate(**common, do_sample=True, temperature=STATIC_TEMPERATURE, top_p=STATIC_TOP_P, top_k=0)
    return autodeco.generate(**common)


def timed_generate(method, base, autodeco, inputs, new_tokens, device) -> tuple[float, list[float]]:
    """(wall seconds of generate, seconds of each decoding step after the first)."""
    clock = StepClock()
    synchronize(device)
    start = time.perf_counter()
    out = run_generate(method, base, autodeco, inputs, new_tokens, streamer=clock)
    synchronize(device)
    elapsed = time.perf_counter() - start
    expected = (inputs["input_ids"].shape[0], inputs["input_ids"].shape[1] + new_tokens)
    assert tuple(out.shape) == expected, f"{method}: generated shape {tuple(out.shape)}, expected {expected}"
    return elapsed, clock.step_times()


def interleaved_ms(fns: dict, pool: list, iters: int, device: str) -> dict[str, tuple[float, float]]:
    """(median, min) ms of each fn(x), timed round-robin (so load changes hit all alike); iteration i uses pool[i % len]."""
    for fn in fns.values():  # warm-up
        fn(pool[0])
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(iters):
        x = pool[i % len(pool)]
        for name, fn in fns.items():
            synchronize(device)
            start = time.perf_counter()
            fn(x)
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(ts) * 1e3, min(ts) * 1e3) for name, ts in times.items()}


def nucleus_sizes(autodeco, inputs: dict, new_tokens: int) -> torch.Tensor:
    """Nucleus size of every row at every step of one dynamic generation (its logits are -inf outside)."""
    out = autodeco.generate(
        **inputs, max_new_tokens=new_tokens, eos_token_id=None,
        return_dict_in_generate=True, output_logits=True,
    )
    return torch.stack([torch.isfinite(step).sum(-1) for step in out.logits]).flatten().cpu()


def describe_sizes(sizes: torch.Tensor) -> str:
    over = float((sizes > NUCLEUS_WINDOW).float().mean()) * 100
    return (
        f"nucleus size median {int(sizes.median())} (min {int(sizes.min())}, max {int(sizes.max())}); "
        f"{over:.0f}% of rows exceed the {NUCLEUS_WINDOW}-token window (full-sort fallback)"
    )


def end_to_end(base, autodeco, batch: int, args, vocab: int) -> dict[str, tuple[float, float]]:
    """Per method: (median wall seconds of generate over the rounds, median seconds of one decoding step)."""
    generator = torch.Generator().manual_seed(args.seed + batch)
    input_ids = torch.randint(0, vocab, (batch, args.prompt_tokens), generator=generator).to(args.device)
    inputs = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))

    print(f"\n--- batch {batch}: prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens, "
          f"{args.rounds} interleaved rounds")
    for method in METHODS:  # warm-up: a short run of each
        timed_generate(method, base, autodeco, inputs, min(4, args.new_tokens), args.device)
    print(f"AutoDeco {describe_sizes(nucleus_sizes(autodeco, inputs, min(16, args.new_tokens)))} "
          "(first 16 steps, untimed)")

    times: dict[str, list[float]] = {m: [] for m in METHODS}
    steps: dict[str, list[float]] = {m: [] for m in METHODS}
    for r in range(args.rounds):
        for method in METHODS:
            torch.manual_seed(args.seed + r)
            wall, step_times = timed_generate(method, base, autodeco, inputs, args.new_tokens, args.device)
            times[method].append(wall)
            steps[method].extend(step_times)
        print(f"round {r + 1}: " + ", ".join(f"{m} {times[m][-1]:.2f} s" for m in METHODS)
              + f"   (load average {os.getloadavg()[0]:.2f})", flush=True)
    return {m: (statistics.median(times[m]), statistics.median(steps[m]) if steps[m] else float("nan")) for m in METHODS}


def print_end_to_end_table(results: dict[int, dict[str, tuple[float, float]]], new_tokens: int) -> list[tuple[int, bool, bool]]:
    print("\n=== End to end. wall: median over rounds of generate's wall time, ms/step = wall / new tokens, "
          "ms/token = wall / (batch x new tokens);\n    step: median duration of a single decoding step over all "
          "steps of all rounds (robust to load bursts) ===")
    header = (f"{'batch':>5}  {'method':<34} {'ms/step':>9} {'ms/token':>9} {'(c)/this':>9}"
              f" {'step ms':>9} {'(c)/this':>9}")
    print(header)
    print("-" * len(header))
    goals = []
    for batch, med in results.items():
        for method in METHODS:
            wall, step = med[method]
            print(f"{batch:>5}  {LABELS[method]:<34} {wall / new_tokens * 1e3:>9.1f} "
                  f"{wall / (batch * new_tokens) * 1e3:>9.1f} {med['autodeco'][0] / wall:>9.3f}"
                  f" {step * 1e3:>9.1f} {med['autodeco'][1] / step:>9.3f}")
        vs_greedy = med["autodeco"][0] / med["greedy"][0]
        vs_static = med["autodeco"][0] / med["static"][0]
        goals.append((batch, vs_greedy <= GOAL_VS_GREEDY, vs_static <= GOAL_VS_STATIC))
        print(f"{batch:>5}  wall: (c)/(a) = {vs_greedy:.3f}  goal <= {GOAL_VS_GREEDY}: "
              f"{'MET' if vs_greedy <= GOAL_VS_GREEDY else 'MISSED'};   "
              f"(c)/(b) = {vs_static:.3f}  goal <= {GOAL_VS_STATIC}: "
              f"{'MET' if vs_static <= GOAL_VS_STATIC else 'MISSED'}"
              f"   [step medians: {med['autodeco'][1] / med['greedy'][1]:.3f}, "
              f"{med['autodeco'][1] / med['static'][1]:.3f}]")
    return goals


def micro_benchmark(base, autodeco, batch: int, args, vocab: int, peaked_scale: float) -> dict[str, dict[str, float]]:
    """Per-step sampling work alone on next-token logits [batch, vocab] float32, in a flat and a peaked regime.

    The logits are the raw (unscaled) random model's own, from the steps of a 16-token greedy generation, so
    the iterations rotate through 16 real [batch, V] logit tensors (nucleus sizes vary from step to step).
    Returns, per regime, the median ms of each method's sampling work per step.
    """
    generator = torch.Generator().manual_seed(args.seed + batch)
    input_ids = torch.randint(0, vocab, (batch, args.prompt_tokens), generator=generator).to(args.device)
    with torch.inference_mode():
        out = base.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                            max_new_tokens=16, eos_token_id=None, return_dict_in_generate=True, output_logits=True)
        hidden = base(input_ids=input_ids, logits_to_keep=1, output_hidden_states=True).hidden_states[-1][:, -1:]
    raw_pool = [step.float() / args.logit_scale for step in out.logits]  # what unscaled random weights give

    warpers = (TemperatureLogitsWarper(STATIC_TEMPERATURE), TopPLogitsWarper(STATIC_TOP_P))
    temperature = torch.full((batch,), 1.0, device=args.device)  # what fresh heads predict
    top_p = torch.full((batch,), 0.95, device=args.device)

    def hf_warpers(x):
        x = x.clone()  # generate hands the warpers a fresh copy too
        for w in warpers:
            x = w(input_ids, x)
        return x

    rows = {
        "argmax (greedy's step)": lambda x: x.argmax(-1),
        "softmax + multinomial (every sampler)": lambda x: torch.multinomial(torch.softmax(x, -1), 1),
        f"HF Temperature+TopP warpers (T={STATIC_TEMPERATURE}, p={STATIC_TOP_P})": hf_warpers,
        "autodeco dynamic_logits (per-row T=1, P=0.95)": lambda x: dynamic_logits(x, temperature, top_p, validate=False),
        "autodeco distribution_stats(scale_logits)": lambda x: distribution_stats(scale_logits(x, temperature)),
        "autodeco heads incl. stats (predict_decoding)": lambda x: autodeco.predict_decoding(hidden, x[:, None]),
    }
    hf_label = f"HF Temperature+TopP warpers (T={STATIC_TEMPERATURE}, p={STATIC_TOP_P})"
    regimes: dict[str, dict[str, float]] = {}
    for name, scale in (("flat: raw random-weight logits", 1.0), (f"peaked: logits x {peaked_scale:g}", peaked_scale)):
        pool = [x * scale for x in raw_pool]
        sizes = torch.cat([torch.isfinite(dynamic_logits(x, temperature, top_p)).sum(-1).cpu() for x in pool])
        print(f"\nbatch {batch}, {name}: {describe_sizes(sizes)}")
        with torch.inference_mode():
            timings = interleaved_ms(rows, pool, args.micro_iters, args.device)
        print(f"  {'':<58} {'median':>8} {'min':>8}")
        for label, (median, best) in timings.items():
            print(f"  {label:<58} {median:>8.2f} {best:>8.2f} ms")
        ours = (timings["autodeco dynamic_logits (per-row T=1, P=0.95)"][0]
                + timings["autodeco heads incl. stats (predict_decoding)"][0])
        print(f"  AutoDeco step work (heads + stats + dynamic_logits) / HF warpers = {ours / timings[hf_label][0]:.2f} "
              "(medians)")
        regimes[name] = {
            "greedy": timings["argmax (greedy's step)"][0],
            "static": timings[hf_label][0] + timings["softmax + multinomial (every sampler)"][0],
            "autodeco": ours + timings["softmax + multinomial (every sampler)"][0],
        }
    return regimes


def print_estimate(results: dict[int, dict[str, tuple[float, float]]], work: dict[int, dict[str, dict[str, float]]]) -> None:
    """Noise-free view: the measured greedy step minus its argmax is the forward; add each method's sampling work."""
    print("\n=== Estimate: forward = measured greedy step median - argmax; step = forward + the method's micro-"
          "benchmarked sampling work ===")
    header = f"{'batch':>5}  {'regime':<36} {'forward ms':>10} {'(c)/(a)':>8} {'(c)/(b)':>8}"
    print(header)
    print("-" * len(header))
    for batch, regimes in work.items():
        for name, ms in regimes.items():
            forward = results[batch]["greedy"][1] * 1e3 - ms["greedy"]
            step = {m: forward + ms[m] for m in METHODS}
            vs_greedy, vs_static = step["autodeco"] / step["greedy"], step["autodeco"] / step["static"]
            print(f"{batch:>5}  {name:<36} {forward:>10.1f} {vs_greedy:>8.3f} {vs_static:>8.3f}"
                  f"   goals: {'met' if vs_greedy <= GOAL_VS_GREEDY else 'missed'} / "
                  f"{'met' if vs_static <= GOAL_VS_STATIC else 'missed'}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-sizes", default="1,8", help="comma-separated batch sizes (default 1,8)")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated per run (default 64)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (default 3)")
    parser.add_argument("--layers", type=int, default=24, help="decoder layers (default 24, Qwen2.5-0.5B)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="cpu (float32) or cuda (bf16)")
    parser.add_argument("--prompt-tokens", type=int, default=16, help="random prompt length (default 16)")
    parser.add_argument("--micro-iters", type=int, default=50, help="micro-benchmark iterations (default 50)")
    parser.add_argument("--logit-scale", type=float, default=1.0,
                        help="multiply every logit by this (final norm weight); >1 gives peaked, trained-like "
                             "distributions (default 1: raw random weights, nearly flat)")
    parser.add_argument("--peaked-scale", type=float, default=12.0,
                        help="logit factor of the micro-benchmark's peaked regime (default 12)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch CPU threads (default: the core count)")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights and prompts (default 0)")
    parser.add_argument("--skip-micro", action="store_true", help="skip the per-step micro-benchmark")
    args = parser.parse_args(argv)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    if args.new_tokens < 1 or args.rounds < 1 or not batch_sizes:
        parser.error("--new-tokens and --rounds must be >= 1 and --batch-sizes non-empty")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")

    torch.set_num_threads(args.threads)
    print(f"date {datetime.date.today()}  python {platform.python_version()}  torch {torch.__version__}  "
          f"transformers {transformers.__version__}")
    print(f"device {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else f" ({platform.processor() or platform.machine()})")
          + f"  torch threads {torch.get_num_threads()} (os.cpu_count {os.cpu_count()})"
          + f"  load average {os.getloadavg()[0]:.2f}")

    base = build_base(args.layers, args.device, args.seed, args.logit_scale)
    autodeco = AutoDecoModelForCausalLM.from_base(base).eval()
    n_params = sum(p.numel() for p in base.parameters())
    vocab = base.config.vocab_size
    print(f"model Qwen2 (Qwen2.5-0.5B shape), {args.layers} layers, {n_params / 1e6:.0f}M parameters, "
          f"{next(base.parameters()).dtype}, random weights (seed {args.seed}), logit scale {args.logit_scale:g}")

    results = {}
    with torch.inference_mode():
        for batch in batch_sizes:
            results[batch] = end_to_end(base, autodeco, batch, args, vocab)
    goals = print_end_to_end_table(results, args.new_tokens)

    if not args.skip_micro:
        print(f"\n=== Per-step sampling work alone, float32 [batch, {vocab}] logits, "
              f"{args.micro_iters} interleaved iterations ===")
        work = {batch: micro_benchmark(base, autodeco, batch, args, vocab, args.peaked_scale) for batch in batch_sizes}
        print_estimate(results, work)

    met = all(g and s for _, g, s in goals)
    print(f"\nGoals on the wall medians (AutoDeco <= {GOAL_VS_GREEDY}x greedy and <= {GOAL_VS_STATIC}x static sampling): "
          + ("all MET" if met else "NOT all met: " + "; ".join(
              f"batch {b}: vs greedy {'met' if g else 'missed'}, vs static {'met' if s else 'missed'}"
              for b, g, s in goals)))


if __name__ == "__main__":
    main()
