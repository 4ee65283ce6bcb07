"""Evaluation methods: spec parsing, generate kwargs that really decode as named, and the EDT processor."""

import math

import pytest
import torch
from transformers import LogitsProcessorList

from autodeco import AutoDecoModelForCausalLM
from autodeco.evaluation.methods import (
    EDT_MIN_TEMPERATURE,
    ORACLE_TEMPERATURES,
    ORACLE_TOP_PS,
    EDTLogitsProcessor,
    Method,
    generation_kwargs,
    parse_methods,
    static_method,
)
from autodeco.testing import build_tiny_model

MAX_NEW = 16


def force_constant_heads(model, temperature: float, top_p: float) -> tuple[float, float]:
    """Make the heads output constants; returns the exact float32 values they produce."""
    with torch.no_grad():
        for head, value in ((model.temperature_head, temperature / model.config.max_temperature), (model.top_p_head, top_p)):
            head.mlp[2].weight.zero_()
            head.mlp[2].bias.fill_(math.log(value / (1 - value)))
        out = model(input_ids=torch.tensor([[5, 6, 7]]))
    return float(out.temperature[0, 0]), float(out.top_p[0, 0])


@pytest.fixture()
def base():
    # A random tiny model's next-token distributions are nearly uniform (entropy ~ log V); scaling the output
    # layer makes them peaked and varied, so temperature, min-p and EDT visibly change what is sampled.
    model = build_tiny_model("llama", seed=0)
    with torch.no_grad():
        model.lm_head.weight.mul_(25.0)
    return model


@pytest.fixture()
def model(base):
    m = AutoDecoModelForCausalLM.from_base(base)
    # Heads far from T=1, P=1: any method that wrongly applied them (or wrongly bypassed them) shows.
    force_constant_heads(m, 0.3, 0.5)
    return m


@pytest.fixture()
def ids():
    return torch.randint(4, 100, (3, 5), generator=torch.Generator().manual_seed(0))


def sample(model, ids, seed=1234, max_new_tokens=MAX_NEW, **kwargs):
    torch.manual_seed(seed)
    return model.generate(ids, max_new_tokens=max_new_tokens, pad_token_id=0, **kwargs)


# ---------------------------------------------------------------------------------------------- parsing


def test_parse_methods_canonical_specs_params_and_labels():
    methods = parse_methods("greedy, static:0.6,0.95 autodeco,edt edt:1.0,0.8,2 min_p:0.10 oracle meanshift default")
    assert [m.spec for m in methods] == [
        "greedy", "static:0.6,0.95", "autodeco", "edt", "edt:1,0.8,2", "min_p:0.1", "oracle", "meanshift", "default",
    ]
    static = methods[1]
    assert static == Method("static:0.6,0.95", "static", (0.6, 0.95)) and static.label == "static T=0.6 P=0.95"
    assert methods[3].params == (1.0, 0.8, 1.0)  # edt defaults: T0 = 1, the EDT paper's N = 0.8, theta = 1
    assert methods[5].params == (0.1,) and methods[5].kind == "min_p"
    assert len({m.label for m in methods}) == len(methods)  # labels tell every method apart
    # A list parses as if joined; duplicates (also the default-valued edt) are kept once, first-seen order.
    again = parse_methods(["autodeco-temperature-only", "static:0.6,0.95", "edt:1,0.8,1", "static:0.60,0.950"])
    assert [m.spec for m in again] == ["autodeco-temperature-only", "static:0.6,0.95", "edt"]
    assert parse_methods("AUTODECO-TOP-P-ONLY")[0].kind == "autodeco-top-p-only"


@pytest.mark.parametrize(
    "text,match",
    [
        ("", "No methods given"),
        ("beam", r"Unknown method 'beam'.*static:T,P.*edt:T0,N,THETA"),
        ("static:0.6,0.95 foo", "Unknown method 'foo'"),
        ("static:0.6,abc", r"'static:0.6,abc': 'abc' is not a number"),
        ("static:0.6", r"'static:0.6' takes 2 parameter.*static:T,P"),
        ("min_p:0.1,0.2", r"'min_p:0.1,0.2' takes 1"),
        ("greedy:1", "takes 0"),
        ("static:0,1", r"'static:0,1': T=0.0.*greedy"),
        ("static:0.7,1.5", r"P=1.5 is invalid"),
        ("static:inf,1", "not a finite number"),
        ("min_p:0", r"X=0.0 is invalid"),
        ("edt:1,1.2,1", r"'edt:1,1.2,1'.*`n`.*1.2"),
        ("edt:1,0.8", "takes 0 or 3"),
    ],
)
def test_parse_methods_errors_name_the_spec(text, match):
    with pytest.raises(ValueError, match=match):
        parse_methods(text)


def test_oracle_grid_and_static_method():
    assert ORACLE_TEMPERATURES == (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
    assert ORACLE_TOP_PS == ORACLE_TEMPERATURES
    m = static_method(0.3, 1.0)
    assert m == parse_methods("static:0.3,1")[0] and m.label == "static T=0.3 P=1"
    assert generation_kwargs(m) == {"temperature": 0.3, "top_p": 1.0}
    with pytest.raises(ValueError, match="greedy"):
        static_method(0.0, 1.0)
    with pytest.raises(ValueError, match=r"p=1.2"):
        static_method(0.5, 1.2)


@pytest.mark.parametrize("spec", ["oracle", "meanshift"])
def test_unresolved_methods_have_no_kwargs(spec):
    with pytest.raises(ValueError, match="static_method"):
        generation_kwargs(parse_methods(spec)[0])


# ---------------------------------------------------------------------------------------------- decoding


def test_every_decodable_method_runs_through_generate(model, ids):
    for method in parse_methods("greedy default static:0.6,0.95 autodeco autodeco-temperature-only "
                                "autodeco-top-p-only min_p:0.1 edt edt:0.9,0.5,2"):
        out = sample(model, ids, max_new_tokens=4, return_dict_in_generate=True, **generation_kwargs(method))
        assert out.sequences.shape[0] == 3 and out.sequences.shape[1] > ids.shape[1], method.spec
        assert out.temperatures.shape == (3, out.sequences.shape[1] - ids.shape[1]), method.spec


def test_greedy_is_base_greedy(model, base, ids):
    kwargs = generation_kwargs(parse_methods("greedy")[0])
    assert kwargs == {"do_sample": False}
    assert torch.equal(sample(model, ids, **kwargs), base.generate(ids, do_sample=False, max_new_tokens=MAX_NEW, pad_token_id=0))


@pytest.mark.parametrize("spec,t,p", [("static:0.7,0.9", 0.7, 0.9), ("default", 1.0, 1.0)])
def test_static_methods_equal_base_static_sampling(model, base, ids, spec, t, p):
    ours = sample(model, ids, **generation_kwargs(parse_methods(spec)[0]))
    ref = sample(base, ids, do_sample=True, temperature=t, top_p=p, top_k=0)
    assert torch.equal(ours, ref)
    # Guard: the heads' own decoding (T=0.3, P=0.5) samples something else with the same seed.
    assert not torch.equal(sample(model, ids), ref)


def test_autodeco_and_ablation_traces(model, ids):
    traces = {}
    for spec in ("autodeco", "autodeco-temperature-only", "autodeco-top-p-only"):
        out = sample(model, ids, return_dict_in_generate=True, **generation_kwargs(parse_methods(spec)[0]))
        finite = torch.isfinite(out.temperatures)
        traces[spec] = (out.temperatures[finite], out.top_ps[finite])
    t_heads, p_heads = traces["autodeco"]
    assert torch.allclose(t_heads, torch.tensor(0.3)) and torch.allclose(p_heads, torch.tensor(0.5))
    t_only_t, t_only_p = traces["autodeco-temperature-only"]
    assert torch.allclose(t_only_t, torch.tensor(0.3)) and torch.all(t_only_p == 1.0)
    p_only_t, p_only_p = traces["autodeco-top-p-only"]
    assert torch.all(p_only_t == 1.0) and torch.allclose(p_only_p, torch.tensor(0.5))


def test_min_p_is_transformers_min_p_at_t1(model, base, ids):
    kwargs = generation_kwargs(parse_methods("min_p:0.2")[0])
    assert kwargs == {"temperature": 1.0, "top_p": 1.0, "min_p": 0.2}
    ours = sample(model, ids, **kwargs)
    assert torch.equal(ours, sample(base, ids, do_sample=True, temperature=1.0, top_p=1.0, top_k=0, min_p=0.2))
    assert not torch.equal(ours, sample(base, ids, do_sample=True, temperature=1.0, top_p=1.0, top_k=0))


def test_edt_generate_applies_the_processor_and_changes_sampling(model, base, ids):
    kwargs = generation_kwargs(parse_methods("edt")[0])
    processors = kwargs["logits_processor"]
    assert isinstance(processors, LogitsProcessorList) and isinstance(processors[0], EDTLogitsProcessor)
    assert (processors[0].t0, processors[0].n, processors[0].theta) == (1.0, 0.8, 1.0)
    ours = sample(model, ids, **kwargs)
    # Same seed, the base with the same processor and no heads: EDT alone decides the distribution.
    ref = sample(base, ids, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                 logits_processor=LogitsProcessorList([EDTLogitsProcessor()]))
    assert torch.equal(ours, ref)
    assert not torch.equal(ours, sample(model, ids, **generation_kwargs(parse_methods("default")[0])))


# ---------------------------------------------------------------------------------------------- EDT


def _entropy(row: list[float]) -> float:
    finite = [x for x in row if x != -math.inf]
    m = max(finite)
    weights = [math.exp(x - m) for x in finite]
    total = sum(weights)
    return -sum(w / total * math.log(w / total) for w in weights if w > 0)


@pytest.mark.parametrize("t0,n,theta", [(1.0, 0.8, 1.0), (0.7, 0.5, 2.5)])
def test_edt_processor_equals_the_formula_by_hand(t0, n, theta):
    scores = torch.tensor(
        [
            [2.0, 1.0, 0.0, -1.0],  # moderately confident
            [0.3, 0.3, 0.3, 0.3],  # uniform: H = log 4, the hottest row
            [9.0, 0.0, -2.0, -5.0],  # confident: small H, small T
            [1.0, -math.inf, 0.5, -math.inf],  # already filtered tokens count as p = 0
        ]
    )
    processor = EDTLogitsProcessor(t0, n, theta)
    out = processor(torch.zeros(4, 1, dtype=torch.long), scores.clone())
    for i, row in enumerate(scores.tolist()):
        h = _entropy(row)
        t = min(max(t0 * n ** (theta / h), EDT_MIN_TEMPERATURE), t0)
        expected = torch.tensor([x / t for x in row])
        torch.testing.assert_close(out[i], expected, rtol=2e-6, atol=0.0)
        assert math.isclose(float(processor.temperatures(scores)[i]), t, rel_tol=2e-6)
    assert out.dtype == torch.float32
    assert math.isclose(float(processor.temperatures(scores)[1]), t0 * n ** (theta / math.log(4)), rel_tol=1e-6)


def test_edt_zero_entropy_gives_the_floor_not_nan():
    processor = EDTLogitsProcessor()
    one_hot = torch.tensor([[3.0, -math.inf, -math.inf], [100.0, 0.0, 0.0]])  # H = 0 exactly / H underflows to 0
    t = processor.temperatures(one_hot)
    assert torch.equal(t, torch.full((2,), EDT_MIN_TEMPERATURE))
    out = processor(None, one_hot)
    assert out[0, 0] == 300.0 and torch.isfinite(out[1]).all() and out[1].argmax() == 0
    bf16 = processor(None, torch.tensor([[2.0, 1.0, 0.0]], dtype=torch.bfloat16))
    assert bf16.dtype == torch.float32


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(t0=0.0), r"`t0` has to be a float > 0.01.*0.0"),
        (dict(n=1.0), r"`n` has to be a float strictly between 0 and 1.*1.0"),
        (dict(n=0.0), r"`n`.*0.0"),
        (dict(theta=-1.0), r"`theta` has to be a float > 0.*-1.0"),
        (dict(theta=float("nan")), r"`theta` has to be a finite float"),
        (dict(t0="1"), r"`t0` has to be a finite float.*'1'"),
    ],
)
def test_edt_validates_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EDTLogitsProcessor(**kwargs)
