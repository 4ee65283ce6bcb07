"""dynamic_logits against transformers' TemperatureLogitsWarper + TopPLogitsWarper, row by row."""

import math

import pytest
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

from autodeco.features import distribution_stats
from autodeco.sampling import dynamic_logits, nucleus_filter

# Rows whose nucleus boundary sits this close to P may legitimately differ by float32 summation order.
BOUNDARY_TOLERANCE = 1e-5


def reference_row(logits_row: torch.Tensor, t: float, p: float) -> torch.Tensor:
    scores = TemperatureLogitsWarper(t)(None, logits_row[None].float())
    if p < 1.0:  # generate() skips the warper at p = 1; at p = 1 it only drops zero-probability tokens anyway
        scores = TopPLogitsWarper(p, min_tokens_to_keep=1)(None, scores)
    return scores[0]


def assert_rows_match(ours: torch.Tensor, logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor):
    for i in range(logits.shape[0]):
        t, p = float(temperature[i]), float(top_p[i])
        ref = reference_row(logits[i], t, p)
        ours_kept, ref_kept = torch.isfinite(ours[i]), torch.isfinite(ref)
        # Where both keep a token the values are the same division, bit for bit.
        both = ours_kept & ref_kept
        assert torch.equal(ours[i][both], ref[both]), f"row {i}: scaled values differ"
        if torch.equal(ours_kept, ref_kept):
            continue
        # Otherwise the disagreement must be a boundary token whose preceding mass is within rounding of P.
        probs = torch.softmax(logits[i].double() / t, dim=-1)
        order = torch.argsort(probs, descending=True, stable=True)
        mass_before = torch.cumsum(probs[order], 0) - probs[order]
        position = torch.empty_like(order)
        position[order] = torch.arange(order.numel())
        for token in (ours_kept ^ ref_kept).nonzero().flatten():
            gap = abs(float(mass_before[position[token]]) - p)
            assert gap < BOUNDARY_TOLERANCE, f"row {i}, token {int(token)}: kept sets differ {gap:.2e} from P={p}"


@pytest.mark.parametrize("n_rows,vocab", [(1, 7), (5, 100), (17, 1000), (4, 5000)])
def test_matches_transformers_warpers_random(n_rows, vocab):
    g = torch.Generator().manual_seed(n_rows * 1000 + vocab)
    logits = torch.randn(n_rows, vocab, generator=g) * 4
    temperature = 0.05 + 1.95 * torch.rand(n_rows, generator=g)
    top_p = torch.rand(n_rows, generator=g).clamp_min(1e-3)
    top_p[0] = 1.0
    assert_rows_match(dynamic_logits(logits, temperature, top_p), logits, temperature, top_p)


def test_matches_with_ties_and_neg_inf():
    g = torch.Generator().manual_seed(0)
    vocab = 300
    # Few distinct values, so large tie groups straddle the nucleus boundary.
    logits = torch.randint(0, 4, (12, vocab), generator=g).float()
    logits[:, ::7] = float("-inf")
    logits[3] = 0.0  # a completely flat row
    temperature = 0.05 + 1.95 * torch.rand(12, generator=g)
    top_p = torch.linspace(0.05, 0.95, 12)
    ours = dynamic_logits(logits, temperature, top_p)
    partial_tie_rows = 0
    for i in range(12):
        ref = reference_row(logits[i], float(temperature[i]), float(top_p[i]))
        ours_kept, ref_kept = torch.isfinite(ours[i]), torch.isfinite(ref)
        # transformers picks among exact ties by its unstable sort order; the distribution over values is what
        # must agree: same count, same kept values, and every token above the boundary kept by both.
        assert int(ours_kept.sum()) == int(ref_kept.sum()), f"row {i}: nucleus sizes differ"
        assert torch.equal(ours[i][ours_kept].sort().values, ref[ref_kept].sort().values)
        boundary = ours[i][ours_kept].min()
        assert bool(ref_kept[ours[i] > boundary].all())
        tied = (ours[i] == boundary) | ((logits[i] / float(temperature[i])) == boundary)
        kept_ties = (ours_kept & tied).nonzero().flatten()
        all_ties = tied.nonzero().flatten()
        if kept_ties.numel() < all_ties.numel():
            partial_tie_rows += 1
            assert torch.equal(kept_ties, all_ties[: kept_ties.numel()]), "ties must keep the lowest token ids"
    assert partial_tie_rows >= 3  # the case under test really happened


def test_window_fallback_rows_are_exact():
    # Flat-ish rows with P near 1 need far more than the top-k window: the full-sort fallback must be exact.
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 3000, generator=g) * 0.1
    logits[:3] *= 50  # peaked rows, decided inside the window
    temperature = torch.full((6,), 1.3)
    top_p = torch.tensor([0.5, 0.9, 0.99, 0.5, 0.9, 0.99])
    ours = nucleus_filter(logits / temperature[:, None], top_p, window=8)
    assert_rows_match(ours, logits, temperature, top_p)
    assert int(torch.isfinite(ours[5]).sum()) > 8  # the fallback row kept more than the window


def test_keeps_at_least_one_token_and_greedy_limit():
    logits = torch.tensor([[1.0, 5.0, 2.0], [0.0, 0.0, 0.0]])
    out = dynamic_logits(logits, torch.tensor([1e-3, 1.0]), torch.tensor([1e-6, 1e-6]))
    assert torch.isfinite(out[0]).tolist() == [False, True, False]
    assert int(torch.isfinite(out[1]).sum()) == 1


def test_scalar_temperature_and_top_p_broadcast():
    logits = torch.randn(3, 50)
    assert torch.equal(dynamic_logits(logits, 0.7, 0.9), dynamic_logits(logits, torch.full((3,), 0.7), torch.full((3,), 0.9)))


def test_bf16_logits_computed_in_float32():
    logits = (torch.randn(4, 200) * 3).bfloat16()
    out = dynamic_logits(logits, torch.full((4,), 0.3), torch.full((4,), 0.8))
    assert out.dtype == torch.float32
    assert_rows_match(out, logits.float(), torch.full((4,), 0.3), torch.full((4,), 0.8))


@pytest.mark.parametrize(
    "temperature,top_p,match",
    [(0.0, 0.5, "temperature"), (-1.0, 0.5, "temperature"), (float("nan"), 0.5, "temperature"),
     (1.0, 0.0, "top_p"), (1.0, 1.5, "top_p"), (1.0, float("nan"), "top_p")],
)
def test_rejects_bad_values_naming_them(temperature, top_p, match):
    with pytest.raises(ValueError, match=match):
        dynamic_logits(torch.randn(2, 10), torch.tensor([1.0, temperature]), torch.tensor([0.5, top_p]))


def test_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\[N, V\]"):
        dynamic_logits(torch.randn(2, 3, 10), 1.0, 1.0)
    with pytest.raises(ValueError, match="one value per row"):
        dynamic_logits(torch.randn(2, 10), torch.ones(3), 1.0)


def test_distribution_stats_definition():
    logits = torch.randn(3, 40) * 2
    logits[1, :5] = float("-inf")
    stats = distribution_stats(logits)
    p = torch.softmax(logits.double(), -1)
    entropy = -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum(-1)
    expected = torch.stack([p.max(-1).values, entropy, p.var(-1), p.topk(5, -1).values.sum(-1)], -1)
    torch.testing.assert_close(stats.double(), expected, rtol=1e-4, atol=1e-7)
    assert math.isclose(float(stats[0, 0]), float(p[0].max()), rel_tol=1e-5)


def _branch_free_cases():
    """Random batches: peaked and flat logits, T near the clamp, P near 0 and 1 (and exactly 1), ties, -inf."""
    gen = torch.Generator().manual_seed(11)
    for case in range(60):
        n_rows = int(torch.randint(1, 9, (), generator=gen))
        vocab = int(torch.randint(2, 400, (), generator=gen)) if case % 3 else int(torch.randint(2, 70, (), generator=gen))
        scale = [0.01, 0.3, 3.0, 30.0][case % 4]  # flat ... peaked
        logits = torch.randn(n_rows, vocab, generator=gen) * scale
        if case % 5 == 0:  # plenty of exact ties
            logits = logits.round()
        if case % 7 == 0:  # masked tokens
            logits[torch.rand(n_rows, vocab, generator=gen) < 0.3] = float("-inf")
            logits[:, 0] = 0.0
        if case % 11 == 0:  # a whole tie row
            logits[0] = 1.0
        kind = case % 4
        if kind == 0:
            temperature = torch.rand(n_rows, generator=gen) * 2 + 0.05
        elif kind == 1:  # at and below the sampling clamp
            temperature = torch.tensor([1e-6, 1e-4, 2e-4, 1e-3] * 3)[:n_rows]
        else:
            temperature = torch.rand(n_rows, generator=gen) * 4 + 1e-3
        choices = torch.tensor([1e-6, 1e-3, 0.05, 0.5, 0.9, 0.999, 0.999999, 1.0])
        top_p = choices[torch.randint(0, len(choices), (n_rows,), generator=gen)]
        if case % 2:
            top_p = torch.rand(n_rows, generator=gen).clamp_min(1e-7)
        yield logits, temperature, top_p


def test_branch_free_form_equals_the_branching_path():
    # The CUDA form (no .any()/nonzero host synchronisation) forced on CPU: bit-identical to the CPU path.
    checked = 0
    for logits, temperature, top_p in _branch_free_cases():
        for window in (1, 4, 64):
            for t in (temperature, torch.ones_like(temperature)):
                scaled = (logits / t.clamp_min(1e-4).unsqueeze(-1)).float()
                branching = nucleus_filter(scaled, top_p, window, branch_free=False)
                free = nucleus_filter(scaled, top_p, window, branch_free=True)
                assert torch.equal(branching, free), (window, logits.shape, top_p)
                checked += 1
        stats, log_z, top_values = distribution_stats(dynamic_logits(logits, 1.0, 1.0), window=64)
        assert torch.equal(
            nucleus_filter(logits.float(), top_p, log_z=log_z, top_values=top_values, branch_free=True),
            nucleus_filter(logits.float(), top_p, log_z=log_z, top_values=top_values, branch_free=False),
        )
        assert torch.equal(
            dynamic_logits(logits, temperature, top_p, branch_free=True),
            dynamic_logits(logits, temperature, top_p),
        )
    assert checked == 60 * 3 * 2


def test_branch_free_form_is_chosen_off_cpu_only(monkeypatch):
    import autodeco.sampling as sampling

    calls = []
    monkeypatch.setattr(sampling, "_nucleus_filter_branch_free", lambda *a, **k: calls.append(1) or a[0])
    logits = torch.randn(2, 10)
    dynamic_logits(logits, 1.0, 0.5)
    assert calls == []
    dynamic_logits(logits, 1.0, 0.5, branch_free=True)
    assert calls == [1]


def test_entropy_ignores_masked_tokens_and_matches_the_definition():
    from autodeco.features import entropy

    logits = torch.tensor([[0.0, 1.0, float("-inf"), 2.0], [5.0, float("-inf"), float("-inf"), float("-inf")]])
    h = entropy(logits)
    p = torch.softmax(logits[0, [0, 1, 3]].double(), -1)
    assert not torch.isnan(h).any()
    assert math.isclose(float(h[0]), float(-(p * p.log()).sum()), rel_tol=1e-6)
    assert float(h[1]) == 0.0
    assert entropy(logits.to(torch.bfloat16)).dtype == torch.float32
    # The statistics' entropy column is the same function.
    assert torch.equal(distribution_stats(logits)[:, 1], h)
