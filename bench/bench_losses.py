"""Benchmark of autodeco.losses: the chunked closed-form losses against the naive autograd formulas.

    python bench/bench_losses.py                           # 1,024 tokens x 151,936 vocabulary (~4 min on 2 cores)
    python bench/bench_losses.py --tokens 64 --vocab 5000         # quick check
    python bench/bench_losses.py --chunk-size 8 --scaling-tokens 256,1024

Each measured variant runs forward + backward once in a fresh subprocess (this script with --worker), so
its peak memory is its own: on CPU, peak extra memory = ru_maxrss at the end minus ru_maxrss once the
inputs exist (and a tiny warm-up has run); on CUDA, max_memory_allocated minus what was allocated then.
Accuracy is measured against float64 in two ways: (1) the chunked fast path run in float64 on all rows
(cheap, but the same algorithm), (2) the naive autograd reference in float64 on the first --check-rows
rows (independent formula, a subset because float64 autograd over all rows needs ~14 GB).

Inputs (--distribution): "flat" (default): logits ~ N(0, 1) * LOGIT_SCALE in float32, a high-entropy
distribution; "peaked": the same plus 1-20 favoured tokens per row PEAK_GAP higher, a confident-LM
caricature. Half the labels are the argmax (easy tokens), T ~ U[0.3, 1.5], P ~ U[0.05, 1].
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from autodeco.losses import (  # noqa: E402
    _soft_top_p_loss_reference,
    _temperature_loss_reference,
    soft_top_p_loss,
    temperature_loss,
)

LOGIT_SCALE = 2.0
PEAK_GAP = 16.0
MASK_SEED = 1234
GOAL_MEMORY_RATIO = 1 / 8
GOAL_TIME_RATIO = 0.5
GOAL_LOSS_RTOL = 1e-4
GOAL_GRAD_RTOL = 5e-3


def make_inputs(tokens: int, vocab: int, seed: int, device: str, distribution: str = "flat"):
    gen = torch.Generator().manual_seed(seed)
    # Filled in place: a temporary [tokens, V] here would raise the baseline peak and hide real extra memory.
    logits = torch.empty(tokens, vocab).normal_(generator=gen).mul_(LOGIT_SCALE)
    labels = torch.randint(0, vocab, (tokens,), generator=gen)
    easy = torch.rand(tokens, generator=gen) < 0.5
    if distribution == "peaked":
        # A confident-LM caricature: per row 1-20 favoured tokens sit PEAK_GAP above the N(0, 2^2) rest, so the
        # mass outside them is ~1e-6..1e-3; labels are mostly favoured tokens.
        count = torch.randint(1, 21, (tokens,), generator=gen)
        favoured = torch.randint(0, vocab, (tokens, 20), generator=gen)
        boost = PEAK_GAP + torch.randn(tokens, 20, generator=gen)
        boost[torch.arange(20)[None, :] >= count[:, None]] = 0
        logits.scatter_add_(1, favoured, boost)
        labels = torch.where(torch.rand(tokens, generator=gen) < 0.8, favoured[:, 0], labels)
    labels = torch.where(easy, logits.argmax(dim=-1), labels)
    temperature = 0.3 + 1.2 * torch.rand(tokens, generator=gen)
    top_p = 0.05 + 0.95 * torch.rand(tokens, generator=gen)
    return logits.to(device), temperature.to(device), top_p.to(device), labels.to(device)


def run_loss(loss_name: str, variant: str, logits, temperature, top_p, labels, chunk_size):
    """Forward + backward; returns (loss, dT, dP or None)."""
    t = temperature.detach().clone().requires_grad_()
    p = top_p.detach().clone().requires_grad_()
    if loss_name == "top_p":
        if variant == "naive":
            loss = _soft_top_p_loss_reference(logits, t, p, labels)
        else:
            loss = soft_top_p_loss(logits, t, p, labels, chunk_size=chunk_size)
    else:
        gen = torch.Generator().manual_seed(MASK_SEED)
        if variant == "naive":
            loss = _temperature_loss_reference(logits, t, labels, generator=gen)
        else:
            loss = temperature_loss(logits, t, labels, generator=gen, chunk_size=chunk_size)
    loss.backward()
    return loss.detach(), t.grad, (p.grad if loss_name == "top_p" else None)


class PeakMemory:
    """Peak extra resident memory of this process on CPU, robustly.

    Linux: reset the high-water mark through /proc/self/clear_refs ("5"), then read VmHWM; this counts only
    this process after the reset. ru_maxrss is not enough on its own: after fork + exec it can start from
    the parent's resident size, which hides everything below it. Fallback where /proc is unavailable:
    ru_maxrss difference (then run from a small parent, as main() does).
    """

    def __init__(self) -> None:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.base, self.proc = self._status("VmRSS"), True
        except OSError:
            self.base, self.proc = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, False

    @staticmethod
    def _status(field: str) -> float:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024  # kB -> MB
        raise OSError(f"{field} not in /proc/self/status")

    def extra_mb(self) -> float:
        peak = self._status("VmHWM") if self.proc else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return peak - self.base


def worker(args) -> None:
    device = args.device
    dtype = torch.float64 if args.dtype == "float64" else torch.float32
    # Warm-up on a tiny problem: thread pools, kernels and lazy imports are not what we measure.
    if args.threads:
        torch.set_num_threads(args.threads)
    tiny = make_inputs(4, 64, 0, device)
    run_loss(args.loss, args.variant, *tiny, args.chunk_size)
    del tiny
    logits, temperature, top_p, labels = make_inputs(args.tokens, args.vocab, args.seed, device, args.distribution)
    if args.rows:
        logits, temperature, top_p, labels = (
            logits[: args.rows],
            temperature[: args.rows],
            top_p[: args.rows],
            labels[: args.rows],
        )
    if dtype != logits.dtype:
        logits, temperature, top_p = logits.to(dtype), temperature.to(dtype), top_p.to(dtype)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    memory = PeakMemory()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    loss, d_t, d_p = run_loss(args.loss, args.variant, logits, temperature, top_p, labels, args.chunk_size)
    if device == "cuda":
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    if device == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = memory.extra_mb()
    if args.save:
        torch.save({"loss": loss.cpu(), "dT": d_t.cpu(), "dP": None if d_p is None else d_p.cpu()}, args.save)
    print(json.dumps({"wall_s": wall, "cpu_s": cpu, "peak_extra_mb": peak, "loss": float(loss)}))


def spawn(args, env: dict | None = None, **overrides) -> dict:
    opts = {
        "loss": "top_p",
        "variant": "fast",
        "dtype": "float32",
        "tokens": args.tokens,
        "vocab": args.vocab,
        "chunk_size": args.chunk_size,
        "seed": args.seed,
        "device": args.device,
        "rows": 0,
        "save": "",
        "distribution": args.distribution,
        "threads": args.threads,
    }
    opts.update(overrides)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker"]
    for key, value in opts.items():
        if value is None or value == "":
            continue
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, **(env or {})})
    return json.loads(out.stdout.strip().splitlines()[-1])


def rel(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(||a - b||_2 / ||b||_2, max|a - b| / max|b|) in float64."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300)), float(
        (a - b).abs().max() / b.abs().max().clamp_min(1e-300)
    )


def errors(result: dict, reference: dict) -> dict:
    out = {"loss": abs(float(result["loss"]) - float(reference["loss"])) / abs(float(reference["loss"]))}
    out["dT"] = rel(result["dT"], reference["dT"])
    if reference.get("dP") is not None:
        out["dP"] = rel(result["dP"], reference["dP"])
    return out


def subset_check(args) -> list:
    """Naive fp32, fast fp32 and the naive reference in float64, on the first --check-rows rows."""
    if args.threads:
        torch.set_num_threads(args.threads)
    logits, temperature, top_p, labels = make_inputs(args.tokens, args.vocab, args.seed, args.device, args.distribution)
    n = min(args.check_rows, args.tokens)
    logits, temperature, top_p, labels = logits[:n].clone(), temperature[:n], top_p[:n], labels[:n]
    out = []
    for loss_name in ("top_p", "temperature"):
        ref = run_loss(loss_name, "naive", logits.double(), temperature.double(), top_p.double(), labels, None)
        ref = dict(zip(("loss", "dT", "dP"), ref))
        for variant in ("naive", "fast"):
            res = dict(
                zip(
                    ("loss", "dT", "dP"),
                    run_loss(loss_name, variant, logits, temperature, top_p, labels, args.chunk_size),
                )
            )
            out.append([loss_name, variant, errors(res, ref)])
    return out


def fmt_err(e: dict, key: str) -> str:
    if key not in e:
        return "-"
    return f"{e[key]:.1e}" if key == "loss" else f"{e[key][0]:.1e} / {e[key][1]:.1e}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--chunk-size", type=int, default=None, help="rows per chunk (default: the module's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--distribution", choices=["flat", "peaked"], default="flat", help="logits to benchmark on (see above)"
    )
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads in the measured runs (default: torch's choice)"
    )
    parser.add_argument("--check-rows", type=int, default=64, help="rows for the float64 autograd reference check")
    parser.add_argument(
        "--scaling-tokens", default="256,1024,4096", help="token counts for the memory-vs-length run ('' to skip)"
    )
    # Internal: one measured run per subprocess.
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--subset-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--loss", choices=["top_p", "temperature"], default="top_p", help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=["naive", "fast"], default="fast", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32", help=argparse.SUPPRESS)
    parser.add_argument("--rows", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--save", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if args.subset_worker:
        print(json.dumps(subset_check(args)))
        return

    print(
        f"# bench_losses: {args.tokens} tokens x {args.vocab} vocab, {args.distribution} fp32 logits, "
        "forward + backward, "
        f"device={args.device}"
    )
    print(
        f"# torch {torch.__version__}, {args.threads or torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
        f"{platform.processor() or platform.machine()}, "
        f"load average at start {os.getloadavg()[0]:.2f}, chunk_size={args.chunk_size or 'default'}"
    )
    goals_met = True
    with tempfile.TemporaryDirectory() as tmp:
        for loss_name, title in (("top_p", "soft top-p loss"), ("temperature", "temperature loss")):
            runs, saved = {}, {}
            for variant, dtype in (("naive", "float32"), ("fast", "float32"), ("fast", "float64")):
                path = os.path.join(tmp, f"{loss_name}-{variant}-{dtype}.pt")
                runs[(variant, dtype)] = spawn(args, loss=loss_name, variant=variant, dtype=dtype, save=path)
                saved[(variant, dtype)] = torch.load(path)
            naive, fast = runs[("naive", "float32")], runs[("fast", "float32")]
            reference = saved[("fast", "float64")]
            err = {v: errors(saved[(v, "float32")], reference) for v in ("naive", "fast")}
            time_ratio = fast["wall_s"] / naive["wall_s"]
            cpu_ratio = fast["cpu_s"] / naive["cpu_s"]
            mem_ratio = fast["peak_extra_mb"] / max(naive["peak_extra_mb"], 1e-9)
            print(f"\n## {title}")
            print(
                "| variant | wall (s) | CPU (s) | peak extra memory (MB) | loss rel. err "
                "| dT rel. err (L2 / max) | dP rel. err (L2 / max) |"
            )
            print("|---|---|---|---|---|---|---|")
            for variant, label in (("naive", "naive autograd (fp32)"), ("fast", "chunked closed form (fp32)")):
                r, e = runs[(variant, "float32")], err[variant]
                print(
                    f"| {label} | {r['wall_s']:.2f} | {r['cpu_s']:.2f} | {r['peak_extra_mb']:.0f} | "
                    f"{fmt_err(e, 'loss')} | "
                    f"{fmt_err(e, 'dT')} | {fmt_err(e, 'dP')} |"
                )
            print(f"| ratio chunked / naive | {time_ratio:.3f} | {cpu_ratio:.3f} | {mem_ratio:.4f} | | | |")
            print("(errors vs the chunked path run in float64 on all rows)")
            if loss_name == "top_p":
                ok = {
                    f"peak extra memory <= 1/8 of naive ({mem_ratio:.4f})": mem_ratio <= GOAL_MEMORY_RATIO,
                    f"time <= 0.5x naive (wall {time_ratio:.3f}, CPU {cpu_ratio:.3f})": time_ratio <= GOAL_TIME_RATIO,
                    f"loss within 1e-4 of float64 ({err['fast']['loss']:.1e})": err["fast"]["loss"] <= GOAL_LOSS_RTOL,
                    f"dT, dP within 5e-3 of float64 (L2: {err['fast']['dT'][0]:.1e}, {err['fast']['dP'][0]:.1e})": max(
                        err["fast"]["dT"][0], err["fast"]["dP"][0]
                    )
                    <= GOAL_GRAD_RTOL,
                }
                for text, passed in ok.items():
                    print(f"goal: {text}: {'met' if passed else 'MISSED'}", flush=True)
                    goals_met &= passed

    # In a subprocess too: float64 autograd is big, and this parent must stay small (see PeakMemory).
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--subset-worker",
        "--tokens",
        str(args.tokens),
        "--vocab",
        str(args.vocab),
        "--seed",
        str(args.seed),
        "--device",
        args.device,
        "--check-rows",
        str(args.check_rows),
        "--distribution",
        args.distribution,
        "--threads",
        str(args.threads),
    ]
    if args.chunk_size:
        cmd += ["--chunk-size", str(args.chunk_size)]
    sub = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
    n = min(args.check_rows, args.tokens)
    print(f"\n## accuracy vs the naive autograd formula in float64, first {n} rows")
    print("| loss | variant | loss rel. err | dT rel. err (L2 / max) | dP rel. err (L2 / max) |")
    print("|---|---|---|---|---|")
    for loss_name, variant, e in sub:
        print(f"| {loss_name} | {variant} fp32 | {fmt_err(e, 'loss')} | {fmt_err(e, 'dT')} | {fmt_err(e, 'dP')} |")

    if args.scaling_tokens:
        # glibc keeps some freed blocks in its heap, so peak RSS with the default allocator drifts from run to
        # run; with MALLOC_MMAP_THRESHOLD_ every large block is unmapped when freed and the peak shows what is
        # actually alive at once.
        unmapped = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
        print("\n## chunked soft top-p loss: peak extra memory vs number of tokens")
        print(
            "| tokens | logits (MB) | wall (s) | peak extra (MB), default malloc "
            "| peak extra (MB), freed blocks unmapped |"
        )
        print("|---|---|---|---|---|")
        for tokens in (int(t) for t in args.scaling_tokens.split(",")):
            r = spawn(args, tokens=tokens)
            u = spawn(args, env=unmapped, tokens=tokens)
            print(
                f"| {tokens} | {tokens * args.vocab * 4 / 2**20:.0f} | {r['wall_s']:.2f} | {r['peak_extra_mb']:.0f} | "
                f"{u['peak_extra_mb']:.0f} |",
                flush=True,
            )
    print(f"\nall soft top-p goals met: {goals_met}")


if __name__ == "__main__":
    main()
