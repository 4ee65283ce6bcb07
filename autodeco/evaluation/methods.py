"""Decoding methods compared in the evaluation, and the `generate` kwargs that realise each one.

    >>> from autodeco.evaluation.methods import parse_methods, generation_kwargs
    >>> for method in parse_methods("greedy, static:0.6,0.95, autodeco, edt"):
    ...     out = model.generate(**inputs, **generation_kwargs(method), max_new_tokens=512)

Specs (VALID_METHODS): greedy; default (T=1, P=1, heads bypassed); static:T,P; oracle (the runner searches T over
ORACLE_TEMPERATURES at P=1, then P over ORACLE_TOP_PS, on the test set); meanshift (static at the heads' mean T
and P); autodeco (the heads' T and P at every token); autodeco-temperature-only / autodeco-top-p-only
(ablations); min_p:X (min-p at T=1); edt | edt:T0,N,THETA (entropy-based dynamic temperature, Zhang et al.
2024: T = T0 * N^(THETA / H)). `oracle` and `meanshift` must be resolved to a static method before
`generation_kwargs`. More: docs/evaluation.md.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from autodeco.features import entropy_from_log_probs

__all__ = [
    "Method",
    "VALID_METHODS",
    "parse_methods",
    "generation_kwargs",
    "EDTLogitsProcessor",
    "ORACLE_TEMPERATURES",
    "ORACLE_TOP_PS",
    "static_method",
    "EDT_DEFAULT_T0",
    "EDT_DEFAULT_N",
    "EDT_DEFAULT_THETA",
]

# The paper's oracle grid: T from 0.1 to 1.0 in steps of 0.1 (at P = 1), then P likewise at the best T.
# round() makes the values the decimal numbers people read (0.3, not 0.30000000000000004).
ORACLE_TEMPERATURES: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(1, 11))
ORACLE_TOP_PS: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(1, 11))

# EDT defaults. N = 0.8 and THETA = 1.0 are the EDT paper's. T0 is the temperature EDT can reach at most
# (a maximally uncertain token); 1.0 is the model's own distribution, the same temperature as our `default`
# baseline, so EDT vs default isolates the effect of cooling confident tokens.
EDT_DEFAULT_T0 = 1.0
EDT_DEFAULT_N = 0.8
EDT_DEFAULT_THETA = 1.0
# EDT's temperature is clamped to [EDT_MIN_TEMPERATURE, T0]. At 1e-2 a logit gap of 0.1 is already a
# factor e^10 in probability, i.e. effectively greedy, without the overflow risk of dividing by ~0.
EDT_MIN_TEMPERATURE = 1e-2
# Entropies (nats) below this are treated as this: H -> 0 means a one-hot distribution, where the formula's
# exponent THETA / H diverges; with H = EDT_ENTROPY_EPS the temperature underflows to the floor instead.
EDT_ENTROPY_EPS = 1e-6

# spec name -> number of numeric parameters it takes (a tuple lists the accepted counts).
_PARAM_COUNTS: dict[str, tuple[int, ...]] = {
    "greedy": (0,),
    "default": (0,),
    "static": (2,),
    "oracle": (0,),
    "meanshift": (0,),
    "autodeco": (0,),
    "autodeco-temperature-only": (0,),
    "autodeco-top-p-only": (0,),
    "min_p": (1,),
    "edt": (0, 3),
}

VALID_METHODS: tuple[str, ...] = (
    "greedy",
    "default",
    "static:T,P",
    "oracle",
    "meanshift",
    "autodeco",
    "autodeco-temperature-only",
    "autodeco-top-p-only",
    "min_p:X",
    "edt",
    "edt:T0,N,THETA",
)

_LABELS = {
    "greedy": "greedy",
    "default": "default (T=1 P=1)",
    "oracle": "oracle (expert-tuned static)",
    "meanshift": "MeanShift (static at mean T, P)",
    "autodeco": "AutoDeco",
    "autodeco-temperature-only": "AutoDeco (temperature head only)",
    "autodeco-top-p-only": "AutoDeco (top-p head only)",
}


def _fmt(x: float) -> str:
    """A float as a short, round-trippable-enough spec token: 0.6 -> '0.6', 1.0 -> '1'."""
    return format(x, ".10g")


@dataclass(frozen=True)
class Method:
    """One decoding method. `spec` is canonical (`static:0.6,0.95`), `kind` the spec name before ':', and
    `params` its numbers: static (T, P); min_p (X,); edt (T0, N, THETA); every other kind ()."""

    spec: str
    kind: str
    params: tuple = ()

    @property
    def label(self) -> str:
        """Human-readable name for tables and plots, e.g. "static T=0.6 P=0.95"."""
        if self.kind == "static":
            return f"static T={_fmt(self.params[0])} P={_fmt(self.params[1])}"
        if self.kind == "min_p":
            return f"min-p={_fmt(self.params[0])}"
        if self.kind == "edt":
            t0, n, theta = self.params
            return f"EDT T0={_fmt(t0)} N={_fmt(n)} theta={_fmt(theta)}"
        return _LABELS[self.kind]


def _check_range(spec: str, name: str, value: float, ok: bool, requirement: str) -> None:
    if not ok:
        raise ValueError(f"Method '{spec}': {name}={value!r} is invalid; {name} must be {requirement}.")


def _make(kind: str, params: tuple[float, ...], spec: str) -> Method:
    """Validate a parsed spec and build its canonical Method."""
    if kind == "static":
        t, p = params
        _check_range(spec, "T", t, math.isfinite(t) and t > 0, "a finite number > 0 (for T=0 use 'greedy')")
        _check_range(spec, "P", p, 0 < p <= 1, "in (0, 1] (1 keeps every token)")
        return static_method(t, p)
    if kind == "min_p":
        (x,) = params
        _check_range(spec, "X", x, 0 < x <= 1, "in (0, 1]; typical values are 0.02-0.2")
        return Method(f"min_p:{_fmt(x)}", "min_p", (float(x),))
    if kind == "edt":
        t0, n, theta = params if params else (EDT_DEFAULT_T0, EDT_DEFAULT_N, EDT_DEFAULT_THETA)
        try:
            EDTLogitsProcessor(t0, n, theta)  # validates, naming the bad argument
        except ValueError as err:
            raise ValueError(f"Method '{spec}': {err}") from None
        defaults = (EDT_DEFAULT_T0, EDT_DEFAULT_N, EDT_DEFAULT_THETA)
        canonical = "edt" if tuple(params or defaults) == defaults else f"edt:{_fmt(t0)},{_fmt(n)},{_fmt(theta)}"
        return Method(canonical, "edt", (float(t0), float(n), float(theta)))
    return Method(kind, kind, ())


def static_method(t: float, p: float) -> Method:
    """The static method at temperature `t` and top-p `p` (what `oracle` and `meanshift` resolve to)."""
    t, p = float(t), float(p)
    if not (math.isfinite(t) and t > 0):
        raise ValueError(f"static_method: t={t!r} must be a finite number > 0 (greedy decoding is 'greedy').")
    if not (0 < p <= 1):
        raise ValueError(f"static_method: p={p!r} must be in (0, 1].")
    return Method(f"static:{_fmt(t)},{_fmt(p)}", "static", (t, p))


def _is_number(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


def _needs_more_params(spec: str) -> bool:
    """Whether `spec` ("static:0.6") has fewer parameters than its kind takes at most."""
    name, _, arg_text = spec.partition(":")
    counts = _PARAM_COUNTS.get(name.lower(), (0,))
    return len(arg_text.split(",")) < max(counts)


def _split_tokens(text: str) -> list[str]:
    return [tok for tok in re.split(r"[\s,]+", text.strip()) if tok]


def parse_methods(text: str | list[str]) -> list[Method]:
    """Parse method specs separated by commas and/or spaces, e.g. "greedy, static:0.6,0.95 autodeco".

    The commas inside a spec's parameters are told apart from separators by what follows: a token that is
    not a method name continues the previous parameterised spec. A list of strings is parsed as if joined.
    Duplicates (same canonical spec) are kept once, in first-seen order. Raises ValueError for an unknown
    method (listing the valid ones), a wrong number of parameters, or a bad number (naming the spec).
    """
    if isinstance(text, str):
        parts = [text]
    else:
        parts = list(text)
        if not all(isinstance(part, str) for part in parts):
            raise ValueError(f"parse_methods expects a string or a list of strings, got {text!r}.")
    tokens = [tok for part in parts for tok in _split_tokens(part)]
    if not tokens:
        raise ValueError(f"No methods given. Valid methods: {', '.join(VALID_METHODS)}.")

    # Group tokens into specs: "static:0.6" followed by "0.95" is one spec.
    specs: list[str] = []
    for tok in tokens:
        name = tok.split(":", 1)[0].lower()
        if name not in _PARAM_COUNTS and specs and ":" in specs[-1] and (
            _is_number(tok) or _needs_more_params(specs[-1])
        ):
            specs[-1] += "," + tok
        else:
            specs.append(tok)

    methods: list[Method] = []
    seen: set[str] = set()
    for spec in specs:
        name, _, arg_text = spec.partition(":")
        kind = name.lower()
        if kind not in _PARAM_COUNTS:
            raise ValueError(f"Unknown method '{spec}'. Valid methods: {', '.join(VALID_METHODS)}.")
        args = arg_text.split(",") if arg_text else []
        params = []
        for arg in args:
            try:
                value = float(arg)
            except ValueError:
                raise ValueError(f"Method '{spec}': '{arg}' is not a number.") from None
            if not math.isfinite(value):
                raise ValueError(f"Method '{spec}': '{arg}' is not a finite number.")
            params.append(value)
        if len(params) not in _PARAM_COUNTS[kind]:
            usage = [v for v in VALID_METHODS if v.split(":")[0] == kind]
            raise ValueError(
                f"Method '{spec}' takes {' or '.join(str(n) for n in _PARAM_COUNTS[kind])} parameter(s), got "
                f"{len(params)}; write it as {' or '.join(usage)}."
            )
        method = _make(kind, tuple(params), spec)
        if method.spec not in seen:
            seen.add(method.spec)
            methods.append(method)
    return methods


def generation_kwargs(method: Method) -> dict:
    """Keyword arguments for `AutoDecoModelForCausalLM.generate` that decode with `method`.

    `oracle` and `meanshift` are not decodable as such: resolve them to `static_method(t, p)` first.
    """
    kind = method.kind
    if kind == "greedy":
        return {"do_sample": False}
    if kind == "default":
        return {"temperature": 1.0, "top_p": 1.0}
    if kind == "static":
        t, p = method.params
        return {"temperature": float(t), "top_p": float(p)}
    if kind == "autodeco":
        return {}
    if kind == "autodeco-temperature-only":
        return {"use_top_p_head": False}
    if kind == "autodeco-top-p-only":
        return {"use_temperature_head": False}
    if kind == "min_p":
        # Static T = 1, P = 1 bypasses the heads; min-p then filters the model's own distribution.
        return {"temperature": 1.0, "top_p": 1.0, "min_p": float(method.params[0])}
    if kind == "edt":
        # The processor runs before the (here no-op) T = 1, P = 1 warpers, on the raw next-token logits.
        return {
            "temperature": 1.0,
            "top_p": 1.0,
            "logits_processor": LogitsProcessorList([EDTLogitsProcessor(*method.params)]),
        }
    if kind in ("oracle", "meanshift"):
        raise ValueError(
            f"Method '{method.spec}' has no fixed decoding parameters: resolve it to a static method first "
            "(static_method(t, p); oracle searches ORACLE_TEMPERATURES then ORACLE_TOP_PS, meanshift uses "
            "diagnostics.meanshift_from_calibration)."
        )
    raise ValueError(f"Unknown method kind '{kind}' (spec '{method.spec}'). Valid methods: {', '.join(VALID_METHODS)}.")


class EDTLogitsProcessor(LogitsProcessor):
    r"""Entropy-based dynamic temperature (EDT; Zhang et al. 2024, "EDT: Improving Large Language Models'
    Generation by Entropy-based Dynamic Temperature Sampling").

    For every row of scores z [B, V]: H = entropy of softmax(z) in nats, T = T0 * N^(theta / H), clamped to
    [EDT_MIN_TEMPERATURE, T0], and the row is returned as z / T (float32). With 0 < N < 1 a confident row
    (small H) gets a small T (near greedy) and an uncertain one approaches T0. H = 0 (one-hot) is treated
    as H = EDT_ENTROPY_EPS, giving the floor temperature rather than a division by zero.

    Args:
        t0 (`float`): the largest temperature, > EDT_MIN_TEMPERATURE (default 1.0).
        n (`float`): the base N, in (0, 1) (default 0.8, the paper's).
        theta (`float`): the exponent scale, > 0 (default 1.0, the paper's).

    Use with static sampling at T = 1, P = 1 so nothing else rescales the scores:

        model.generate(**inputs, temperature=1.0, top_p=1.0,
                       logits_processor=LogitsProcessorList([EDTLogitsProcessor()]))
    """

    def __init__(self, t0: float = EDT_DEFAULT_T0, n: float = EDT_DEFAULT_N, theta: float = EDT_DEFAULT_THETA):
        for name, value in (("t0", t0), ("n", n), ("theta", theta)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"`{name}` has to be a finite float, but is {value!r}.")
        if not t0 > EDT_MIN_TEMPERATURE:
            raise ValueError(
                f"`t0` has to be a float > {EDT_MIN_TEMPERATURE} (EDT's temperature floor), but is {t0}; "
                "it is the largest temperature EDT uses, typically 1.0."
            )
        if not 0 < n < 1:
            raise ValueError(
                f"`n` has to be a float strictly between 0 and 1, but is {n}; the EDT paper uses 0.8 "
                "(n = 1 would be static sampling at t0; n > 1 would heat up confident tokens)."
            )
        if not theta > 0:
            raise ValueError(f"`theta` has to be a float > 0, but is {theta}; the EDT paper uses 1.0.")
        self.t0 = float(t0)
        self.n = float(n)
        self.theta = float(theta)

    def temperatures(self, scores: torch.Tensor) -> torch.Tensor:
        """The per-row EDT temperature [B] (float32) for scores [B, V]."""
        scores = scores.to(torch.float32)
        log_p = torch.log_softmax(scores, dim=-1)  # [B, V]
        p = log_p.exp()
        entropy = entropy_from_log_probs(log_p, probs=p)  # [B] nats; filtered tokens (p = 0) contribute 0
        entropy = entropy.clamp_min(EDT_ENTROPY_EPS)
        # log T = log T0 + (theta / H) * log N: finite for every H >= eps; exp may underflow to 0 -> clamped.
        log_t = math.log(self.t0) + (self.theta / entropy) * math.log(self.n)
        return log_t.exp().clamp(EDT_MIN_TEMPERATURE, self.t0)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        temperature = self.temperatures(scores)  # [B]
        return scores.to(torch.float32) / temperature.unsqueeze(-1)

    def __repr__(self) -> str:
        return f"EDTLogitsProcessor(t0={self.t0}, n={self.n}, theta={self.theta})"
