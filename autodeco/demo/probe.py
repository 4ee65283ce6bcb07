"""The headroom probe: how much a per-token temperature could gain over the best static one on the demo's tasks,
measured on the frozen base before any heads are trained. It is a probe for the report, not a decoding method.

    from autodeco.demo.probe import run_probe
    probe = run_probe(base, tokenizer, benchmark, output="runs/demo/probe.json", n=2, seeds=2)
    probe["headroom"]        # Pass@1 of the hand schedule minus that of the best static T of the grid (points)

The hand schedule knows the task: on a "pairs" line the tokens of the two numbers (line start up to " =") are the
choices, sampled at CHOICE_TEMPERATURE, the heads' ceiling, with the nucleus CHOICE_TOP_P (which pair comes next:
only a high temperature breaks the base's re-checking habit, and only a nucleus keeps that temperature from lifting
digits of numbers that are not in the problem); every other token (sums, verdicts, arithmetic, the boxed answer) is
copying or adding, sampled at PRECISE_TEMPERATURE. The static grid runs the same sampler at one T everywhere (P = 1 throughout). Each
setting is sampled with `seeds` seeds of `n` samples per problem (packed, like the evaluation) and written to
`output` as soon as it is done, so a rerun resumes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from autodeco.atomic import write_json_atomic
from autodeco.sampling import dynamic_logits
from autodeco.evaluation.benchmarks import Benchmark, build_prompt, score_completions
from autodeco.evaluation.generation import GenerationRequest, generate_completions
from autodeco.evaluation.metrics import sample_std

__all__ = ["CHOICE_TEMPERATURE", "CHOICE_TOP_P", "PRECISE_TEMPERATURE", "STATIC_GRID", "TokenKindSchedule", "run_probe"]

CHOICE_TEMPERATURE = 2.0  # AutoDecoConfig's default max_temperature: the most the heads could ask for
PRECISE_TEMPERATURE = 0.3
CHOICE_TOP_P = 0.7  # keeps the two or three live choices and drops the junk digits that T = 2 would lift
STATIC_GRID: tuple[float, ...] = (0.5, 0.7, 1.0)  # the best static T is inside it (docs/experiments.md)
PAIRS_MARKER = "Find two of"  # how a "pairs" prompt begins (autodeco.demo.tasks)


def _ids_where(tokenizer, keep) -> list[int]:
    return [i for token, i in tokenizer.get_vocab().items() if keep(tokenizer.convert_tokens_to_string([token]))]


class TokenKindSchedule(LogitsProcessor):
    """AutoDeco's distribution (sampling.dynamic_logits) with a hand-set T and P per row: (`choice_t`, `choice_p`) at
    the number tokens of a "pairs" line, (`precise_t`, 1) everywhere else.

    Reads the kind off the ids seen so far (prompt included), so it needs no state across steps: a row is a "pairs"
    row when its prompt holds the first token of PAIRS_MARKER, and the next token is a choice when the current line
    (after the last newline) has neither " =" nor "\\boxed{" yet."""

    def __init__(self, tokenizer, choice_t: float, precise_t: float, choice_p: float = 1.0):
        self.choice_t, self.precise_t, self.choice_p = float(choice_t), float(precise_t), float(choice_p)
        self.newline = torch.tensor(_ids_where(tokenizer, lambda s: s == "\n"))
        self.equals = torch.tensor(_ids_where(tokenizer, lambda s: s.strip() == "="))
        self.boxed = torch.tensor(_ids_where(tokenizer, lambda s: "boxed" in s))
        self.marker = int(tokenizer(PAIRS_MARKER, add_special_tokens=False).input_ids[0])
        if not (len(self.newline) and len(self.equals) and len(self.boxed)):
            raise ValueError("TokenKindSchedule needs a tokenizer with a newline, an '=' and a '\\boxed{' token "
                             "(the demo base's); got one without.")

    def _last(self, input_ids: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(1, input_ids.shape[1] + 1, device=input_ids.device)  # 0 means "never"
        return (torch.isin(input_ids, ids.to(input_ids.device)) * positions).amax(dim=1)  # [B]

    def choices(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B] bool: whether each row's next token is a choice."""
        line_start = self._last(input_ids, self.newline)
        return ((input_ids == self.marker).any(dim=1) & (self._last(input_ids, self.equals) < line_start)
                & (self._last(input_ids, self.boxed) < line_start))

    def temperatures(self, input_ids: torch.Tensor) -> torch.Tensor:
        return torch.where(self.choices(input_ids), self.choice_t, self.precise_t).float()  # [B]

    def top_ps(self, input_ids: torch.Tensor) -> torch.Tensor:
        return torch.where(self.choices(input_ids), self.choice_p, 1.0).float()  # [B]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        return dynamic_logits(scores, self.temperatures(input_ids).to(scores.device),
                              self.top_ps(input_ids).to(scores.device))


def _pass1(model, tokenizer, benchmark: Benchmark, schedule: TokenKindSchedule, *, n: int, seeds: int,
           max_new_tokens: int, batch_size: int, template: str | None, seed: int) -> dict:
    """Pass@1 (percent) of one schedule: mean and sample std over seeds, and per task family (the id's prefix)."""
    prompts = [build_prompt(p, tokenizer, template) for p in benchmark.problems]
    kwargs = {"do_sample": True, "temperature": 1.0, "top_p": 1.0, "top_k": 0,
              "logits_processor": LogitsProcessorList([schedule])}
    per_seed, families = [], {}
    for s in range(seeds):
        requests = [GenerationRequest(prompt, n, seed=seed + s, group=("probe", s)) for prompt in prompts]
        outputs = generate_completions(model, tokenizer, requests, generation_kwargs=kwargs,
                                       max_new_tokens=max_new_tokens, batch_size=batch_size)
        correct = []
        for problem, completions in zip(benchmark.problems, outputs):
            hits = score_completions(problem, [c.text for c in completions])
            correct.append(sum(hits) / len(hits))
            families.setdefault(problem.id.split("-", 1)[0], []).append(correct[-1])
        per_seed.append(100 * sum(correct) / len(correct))
    return {"pass1": sum(per_seed) / len(per_seed), "pass1_std": sample_std(per_seed),
            "families": {f: 100 * sum(v) / len(v) for f, v in sorted(families.items())}}


def run_probe(model, tokenizer, benchmark: Benchmark, *, output: str | Path, n: int = 2, seeds: int = 2,
              max_new_tokens: int = 128, batch_size: int = 256, template: str | None = None, seed: int = 0,
              grid: tuple[float, ...] = STATIC_GRID, choice_t: float = CHOICE_TEMPERATURE,
              precise_t: float = PRECISE_TEMPERATURE, choice_p: float = CHOICE_TOP_P) -> dict:
    """The hand schedule and every static T of `grid` on `benchmark`; returns (and writes to `output`) their Pass@1,
    the best static T and the headroom. Settings already in `output` from the same arguments are not resampled."""
    output = Path(output)
    settings = {"n": n, "seeds": seeds, "max_new_tokens": max_new_tokens, "batch_size": batch_size, "seed": seed,
                "problems": [p.id for p in benchmark.problems], "choice_t": choice_t, "precise_t": precise_t, "choice_p": choice_p}
    done = json.loads(output.read_text(encoding="utf-8")) if output.is_file() else {}
    if done.get("settings") != settings:
        done = {"settings": settings, "static": {}, "hand": None}
    model.eval()
    common = dict(n=n, seeds=seeds, max_new_tokens=max_new_tokens, batch_size=batch_size, template=template,
                  seed=seed)
    with torch.no_grad():
        for t in grid:
            if f"{t:g}" not in done["static"]:
                done["static"][f"{t:g}"] = _pass1(model, tokenizer, benchmark, TokenKindSchedule(tokenizer, t, t),
                                                  **common)
                write_json_atomic(output, done)
        if done["hand"] is None:
            done["hand"] = _pass1(model, tokenizer, benchmark, TokenKindSchedule(tokenizer, choice_t, precise_t, choice_p),
                                  **common)
    best = max(done["static"], key=lambda t: done["static"][t]["pass1"])
    done["best_static_t"] = float(best)
    done["headroom"] = done["hand"]["pass1"] - done["static"][best]["pass1"]
    write_json_atomic(output, done)
    return done
