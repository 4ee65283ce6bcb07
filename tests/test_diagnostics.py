"""Teacher-forced diagnostics: MeanShift values and the inverse-temperature gain decomposition."""

import json
import math

import pytest
import torch

from autodeco import AutoDecoModelForCausalLM
from autodeco.data import load_examples
from autodeco.evaluation import diagnostics
from autodeco.evaluation.diagnostics import (
    decompose,
    decomposition_summary,
    meanshift_from_calibration,
    teacher_forced_predictions,
    token_terms,
)
from autodeco.testing import build_char_tokenizer, build_tiny_model


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    # Completions of different lengths, so a batch of 4 is right-padded and the last batch is partial.
    rows = [{"prompt": f"Q{i}: what?", "completion": "The answer is " + "xyz"[: 1 + i % 3] * (i + 1)} for i in range(6)]
    path = tmp_path_factory.mktemp("diag") / "completions.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n", encoding="utf-8")
    return path


@pytest.fixture()
def model():
    base = build_tiny_model("llama", seed=0)
    with torch.no_grad():
        base.lm_head.weight.mul_(25.0)  # peaked, varied next-token distributions: g and v far from 0
    return AutoDecoModelForCausalLM.from_base(base)


def vary_temperature_head(model, std: float, seed: int = 0) -> None:
    """Give the temperature head a hidden-state-dependent output whose spread grows with `std`."""
    with torch.no_grad():
        torch.manual_seed(seed)
        model.temperature_head.mlp[2].weight.normal_(0, std)
        model.top_p_head.mlp[2].weight.normal_(0, 0.01)


def test_constant_heads_have_zero_gain_and_zero_alignment(model, tokenizer, data_file):
    with torch.no_grad():
        model.temperature_head.mlp[2].bias.fill_(math.log(0.35 / 0.65))  # T = 2 * 0.35 = 0.7 everywhere
        t32 = float(model(input_ids=torch.tensor([[5, 6]])).temperature[0, 0])
    report = decompose(model, tokenizer, data_file, batch_size=4)
    assert report["n_tokens"] > 50
    assert report["beta_bar"] == 1.0 / t32  # all beta equal: the mean is exactly their value
    assert report["rms_delta"] == 0.0
    assert report["total_gain_exact"] == 0.0 and report["total_gain_approx"] == 0.0
    assert report["alignment_efficiency"] == 0.0  # defined as 0 without temperature variation, not 0/0
    assert report["curvature_share"] == 0.0
    assert report["meanshift_temperature"] == pytest.approx(0.7, rel=1e-6)
    assert report["meanshift_top_p"] == pytest.approx(0.95, rel=1e-6)
    assert "Alignment efficiency 0.000" in report["summary"]


def test_second_order_approximation_matches_exact_gain_for_small_delta(model, tokenizer, data_file):
    relative_error = {}
    for std in (1e-3, 1e-2, 1e-1):
        vary_temperature_head(model, std)
        report = decompose(model, tokenizer, data_file, batch_size=4)
        exact, approx = report["total_gain_exact"], report["total_gain_approx"]
        assert exact != 0.0 and math.isfinite(exact)
        relative_error[std] = abs(approx - exact) / abs(exact)
        assert approx == pytest.approx(report["first_order_gain"] - report["curvature_cost"], rel=1e-12)
        assert -1.0 <= report["alignment_efficiency"] <= 1.0 and report["alignment_efficiency"] != 0.0
        assert report["mean_gain_per_token"] == pytest.approx(exact / report["n_tokens"])
    # rms(delta)/beta_bar is ~0.3% at std 1e-3: the Taylor remainder is third order, far below the gain.
    assert relative_error[1e-3] < 1e-5
    # ... and it grows like delta^2 relative to the gain: the comparison is sensitive, not vacuous.
    assert relative_error[1e-2] > 10 * relative_error[1e-3]
    assert relative_error[1e-1] > 1e-3


def test_chunking_does_not_change_the_result(model, tokenizer, data_file, monkeypatch):
    vary_temperature_head(model, 0.01)
    whole = decompose(model, tokenizer, data_file, batch_size=4)
    monkeypatch.setattr(diagnostics, "CHUNK_ELEMENTS", 3 * model.config.base_config.vocab_size)  # 3 rows a chunk
    chunked = decompose(model, tokenizer, data_file, batch_size=3)
    for key, value in whole.items():
        if key != "summary":
            assert chunked[key] == pytest.approx(value, rel=1e-5, abs=1e-9), key


def test_token_terms_and_summary_on_a_two_token_toy():
    # Vocabulary of two tokens: p0 = sigmoid(beta_bar * d) with d = z0 - z1, so for label 0
    # g = (1 - p0) d, v = p0 (1 - p0) d^2, exact gain = log sigmoid(beta d) - log sigmoid(beta_bar d).
    logits = torch.tensor([[2.0, -1.0], [0.5, 1.5]])
    labels = torch.tensor([0, 0])
    beta = torch.tensor([2.0, 0.5], dtype=torch.float64)
    beta_bar = 1.25
    terms = token_terms(logits, labels, beta, beta_bar)

    def sigmoid(x):
        return 1.0 / (1.0 + math.exp(-x))

    g_hand, v_hand, exact_hand, delta_hand = [], [], [], []
    for (z0, z1), b in zip(logits.tolist(), beta.tolist()):
        d = z0 - z1
        p0 = sigmoid(beta_bar * d)
        g_hand.append((1 - p0) * d)
        v_hand.append(p0 * (1 - p0) * d * d)
        exact_hand.append(math.log(sigmoid(b * d)) - math.log(sigmoid(beta_bar * d)))
        delta_hand.append(b - beta_bar)
    torch.testing.assert_close(terms["g"], torch.tensor(g_hand), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(terms["v"], torch.tensor(v_hand), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(terms["delta"], torch.tensor(delta_hand, dtype=torch.float64))
    torch.testing.assert_close(terms["exact_gain"], torch.tensor(exact_hand, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    approx_hand = [g * d - v * d * d / 2 for g, v, d in zip(g_hand, v_hand, delta_hand)]
    torch.testing.assert_close(terms["approx_gain"], torch.tensor(approx_hand, dtype=torch.float64), rtol=1e-6, atol=1e-7)

    # g and v are the first and (minus the) second derivative of log softmax(beta z)[y] in beta at beta_bar.
    def log_prob(b, row):
        return torch.log_softmax(logits[row].double() * b, dim=-1)[0]

    for row in range(2):
        at = torch.tensor(beta_bar, dtype=torch.float64)
        first = torch.autograd.functional.jacobian(lambda b: log_prob(b, row), at)
        second = torch.autograd.functional.hessian(lambda b: log_prob(b, row), at)
        assert float(first) == pytest.approx(g_hand[row], rel=1e-9)
        assert -float(second) == pytest.approx(v_hand[row], rel=1e-9)

    report = decomposition_summary(
        {**terms, "beta_bar": beta_bar, "temperature": 1.0 / beta.float(), "top_p": torch.tensor([0.9, 0.7])}
    )
    e_gd = sum(g * d for g, d in zip(g_hand, delta_hand)) / 2
    e_g2 = sum(g * g for g in g_hand) / 2
    e_d2 = sum(d * d for d in delta_hand) / 2
    assert report["n_tokens"] == 2
    assert report["alignment_efficiency"] == pytest.approx(e_gd / math.sqrt(e_g2 * e_d2), rel=1e-6)
    assert report["total_gain_exact"] == pytest.approx(sum(exact_hand), rel=1e-12)
    assert report["total_gain_approx"] == pytest.approx(sum(approx_hand), rel=1e-6)
    curvature_wins = sum(v * d * d / 2 > abs(g * d) for g, v, d in zip(g_hand, v_hand, delta_hand))
    assert report["curvature_share"] == curvature_wins / 2
    assert report["mean_temperature"] == pytest.approx((0.5 + 2.0) / 2)  # arithmetic mean T: what MeanShift uses
    assert report["temperature_of_mean_beta"] == pytest.approx(1 / 1.25)
    assert report["mean_top_p"] == pytest.approx(0.8)


def test_meanshift_equals_mean_of_forward_predictions(model, tokenizer, data_file):
    vary_temperature_head(model, 0.02)
    examples, _ = load_examples([data_file], tokenizer, max_length=4096)
    temperatures, top_ps, labels, logits = [], [], [], []
    with torch.no_grad():
        for example in examples:  # one unpadded sequence at a time: the direct computation
            ids = torch.tensor([example["input_ids"]])
            target = torch.tensor(example["labels"][1:])
            out = model(input_ids=ids)
            keep = target != -100  # position t predicts token t + 1
            temperatures.append(out.temperature[0, :-1][keep])
            top_ps.append(out.top_p[0, :-1][keep])
            labels.append(target[keep])
            logits.append(out.logits[0, :-1][keep])
    expected_t = torch.cat(temperatures).double().mean().item()
    expected_p = torch.cat(top_ps).double().mean().item()
    assert torch.cat(temperatures).std() > 1e-3  # the heads do vary: a mean over the wrong tokens would differ

    t, p = meanshift_from_calibration(model, tokenizer, data_file, batch_size=4)
    assert t == pytest.approx(expected_t, rel=1e-5) and p == pytest.approx(expected_p, rel=1e-5)

    pred = teacher_forced_predictions(model, tokenizer, [data_file], batch_size=4, return_logits=True)
    assert pred["n_tokens"] == sum(len(x) for x in labels) and pred["n_examples"] == len(examples)
    assert torch.equal(pred["labels"], torch.cat(labels))
    torch.testing.assert_close(pred["temperature"], torch.cat(temperatures), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pred["logits"], torch.cat(logits), rtol=1e-4, atol=1e-4)


def test_rounding_noise_in_delta_counts_as_no_variation():
    # A float64 mean of equal betas can be off by an ulp; the cosine of that noise would be a meaningless +-1.
    beta_bar = 1 / 0.7
    delta = torch.tensor([1e-16, -3e-16, 2e-16], dtype=torch.float64)
    pred = {
        "beta_bar": beta_bar, "delta": delta, "g": torch.tensor([1.0, -2.0, 0.5]), "v": torch.ones(3),
        "exact_gain": torch.zeros(3, dtype=torch.float64), "approx_gain": torch.zeros(3, dtype=torch.float64),
        "temperature": torch.full((3,), 0.7), "top_p": torch.full((3,), 0.9),
    }
    assert decomposition_summary(pred)["alignment_efficiency"] == 0.0
    pred["delta"] = delta * 1e6  # a real (if small) variation: relative 1e-10 of beta_bar
    g, d = pred["g"].double(), pred["delta"]
    expected = float((g * d).mean() / ((g * g).mean() * (d * d).mean()).sqrt())
    assert decomposition_summary(pred)["alignment_efficiency"] == pytest.approx(expected, rel=1e-9)


def test_bad_arguments_are_named(model, tokenizer, data_file):
    with pytest.raises(TypeError, match="AutoDecoModelForCausalLM"):
        decompose(build_tiny_model("llama"), tokenizer, data_file)
    with pytest.raises(ValueError, match="batch_size"):
        meanshift_from_calibration(model, tokenizer, data_file, batch_size=0)
    with pytest.raises(ValueError, match="beta_bar"):
        teacher_forced_predictions(model, tokenizer, data_file, beta_bar=-1.0)
    with pytest.raises(TypeError, match="unexpected keyword"):
        decompose(model, tokenizer, data_file, batchsize=2)
    with pytest.raises(ValueError, match="needs teacher_forced_predictions"):
        decomposition_summary({"temperature": torch.ones(2)})
