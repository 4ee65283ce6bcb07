"""Cost of the reward objective's optimisation step against plain sampling of the same completions, per token.

    python bench/bench_reward_step.py                       # demo base, 4 problems x G 8, 48 new tokens, 3 repeats
    python bench/bench_reward_step.py --group-size 4 --max-new-tokens 32 --repeats 2    # quicker

On the bundled demo base (autodeco.demo.base.load_base(), fresh heads) and demo problems (prompted with the demo's
template, exact-match reward), each repeat: (1) "sample": the G completions of every problem drawn with the heads'
dynamic sampling (TransformersEngine, what RewardTrainer uses); (2) "step": RewardTrainer.compute_loss on those
completions (the base's no-grad pass over prompt + completion, the heads, the policy log-probs, the surrogate)
plus backward, as one optimisation step runs it. Both are reported in ms per completion token, and the ratio
step / sample is measured in the same run (medians over repeats), which is what to compare on a shared machine.
Results: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from autodeco import AutoDecoModelForCausalLM  # noqa: E402
from autodeco.demo.base import DEMO_TEMPLATE, load_base  # noqa: E402
from autodeco.demo.tasks import generate_problems  # noqa: E402
from autodeco.evaluation.benchmarks import Problem, build_prompt  # noqa: E402
from autodeco.evaluation.generation import TransformersEngine  # noqa: E402
from autodeco.training import RewardTrainer, RewardTrainingArguments  # noqa: E402


class TimedEngine(TransformersEngine):
    """TransformersEngine that records the wall time and the completion tokens of each generate call."""

    def __init__(self, model, tokenizer):
        super().__init__(model, tokenizer)
        self.seconds, self.tokens = [], []

    def generate(self, requests, **kwargs):
        start = time.perf_counter()
        out = super().generate(requests, **kwargs)
        self.seconds.append(time.perf_counter() - start)
        self.tokens.append(sum(c.num_tokens for samples in out for c in samples))
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", type=int, default=4, help="problems per step (default 4)")
    parser.add_argument("--group-size", type=int, default=8, help="G, completions per problem (default 8)")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="tokens per completion at most (default 48)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats after one warm-up (default 3)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    base, tokenizer = load_base()
    model = AutoDecoModelForCausalLM.from_base(base, seed=0)

    rows = [p.as_benchmark_row() for p in generate_problems("train", args.problems, seed=0)]
    problems = [Problem(r["id"], r["problem"], r["gt"], "demo", r["kind"]) for r in rows]
    prompts = [build_prompt(p, tokenizer, DEMO_TEMPLATE) for p in problems]
    engine = TimedEngine(model, tokenizer)
    with tempfile.TemporaryDirectory() as out:
        config = RewardTrainingArguments(output_dir=out, per_device_train_batch_size=args.problems,
                                         group_size=args.group_size, max_new_tokens=args.max_new_tokens,
                                         generation_batch_size=args.problems * args.group_size, report_to="none",
                                         max_steps=args.repeats + 1)
        # A reward that splits almost every group (a checksum bit of the text): nearly every token is scored.
        trainer = RewardTrainer(model=model, args=config, problems=problems, prompts=prompts,
                                reward_fn=lambda problem, c: float(zlib.crc32(c.text.encode()) % 2),
                                processing_class=tokenizer, engine=engine)
        sample_ms, step_ms, tokens_seen = [], [], []
        for repeat in range(args.repeats + 1):
            rollout = trainer._rollout(list(range(args.problems)), repeat)
            trainer.rollouts = {0: rollout}
            tokens = sum(len(c) for _, c, a in rollout["rows"] if a is not None)  # tokens of the kept groups
            model.train()
            start = time.perf_counter()
            loss = trainer.compute_loss(model, {"micro": torch.tensor(0)},
                                        num_items_in_batch=torch.tensor(float(tokens), dtype=torch.float64))
            loss.backward()
            step = time.perf_counter() - start
            model.zero_grad(set_to_none=True)
            if repeat == 0:
                continue  # warm-up
            # Sampling per sampled token; the step per token it scored (skipped groups are not forwarded).
            sample_ms.append(1000 * engine.seconds[-1] / max(engine.tokens[-1], 1))
            step_ms.append(1000 * step / max(tokens, 1))
            tokens_seen.append((engine.tokens[-1], tokens))
    sample, step = statistics.median(sample_ms), statistics.median(step_ms)
    print(f"demo base, fresh heads; {args.problems} problems x G {args.group_size}, <= {args.max_new_tokens} new "
          f"tokens, {args.threads} threads; (sampled, scored) completion tokens per repeat: {tokens_seen}")
    print("| what | ms per completion token (median of repeats) |\n|---|---|")
    print(f"| plain sampling (generate, dynamic AutoDeco decoding) | {sample:.3f} |")
    print(f"| reward step (base no-grad pass + heads fwd/bwd + loss) | {step:.3f} |")
    print(f"| ratio step / sampling | {step / sample:.3f} |")
    print("per-repeat ratios:", [round(b / a, 3) for a, b in zip(sample_ms, step_ms)])


if __name__ == "__main__":
    main()
