"""Tests for autodeco.losses: the chunked closed-form losses against the float64 autograd references.

Run: .venv/bin/pytest tests/test_losses.py -q   (a few seconds on 2 CPU cores; small vocabularies only)
"""

from __future__ import annotations

import pytest
import torch

from autodeco.config import IGNORE_INDEX
from autodeco.losses import soft_top_p_loss, temperature_loss
from autodeco.losses.likelihood import _SoftTopPNLL, _TemperatureNLL
from autodeco.losses.reference import _soft_top_p_loss_reference, _temperature_loss_reference

VOCAB = 1000
LOSS_RTOL = 1e-4
GRAD_RTOL = 5e-3


def make_batch(shape, vocab=VOCAB, seed=0, easy_share=0.5, ignore_share=0.2, scale=3.0, dtype=torch.float32):
    """Random logits [*shape, V], T in [0.05, 2], P in (0.001, 1], labels with some -100 and some easy tokens."""
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*shape, vocab, generator=gen) * scale).to(dtype)
    labels = torch.randint(0, vocab, shape, generator=gen)
    easy = torch.rand(shape, generator=gen) < easy_share
    labels = torch.where(easy, logits.argmax(dim=-1), labels)
    labels[torch.rand(shape, generator=gen) < ignore_share] = IGNORE_INDEX
    temperature = 0.05 + 1.95 * torch.rand(shape, generator=gen)
    top_p = 1e-3 + (1 - 1e-3) * torch.rand(shape, generator=gen)
    top_p.reshape(-1)[0] = 1.0  # the closed end of (0.001, 1]
    return logits, temperature, top_p, labels


def top_p_with_grads(fn, logits, temperature, top_p, labels, dtype=None, **kwargs):
    t = temperature.detach().to(dtype or temperature.dtype).requires_grad_()
    p = top_p.detach().to(dtype or top_p.dtype).requires_grad_()
    z = logits if dtype is None else logits.to(dtype)
    loss = fn(z, t, p, labels, **kwargs)
    loss.backward()
    return loss.detach(), t.grad, p.grad


def temperature_with_grad(fn, logits, temperature, labels, dtype=None, **kwargs):
    t = temperature.detach().to(dtype or temperature.dtype).requires_grad_()
    z = logits if dtype is None else logits.to(dtype)
    loss = fn(z, t, labels, **kwargs)
    loss.backward()
    return loss.detach(), t.grad


def assert_loss_close(actual, expected, rtol=LOSS_RTOL):
    assert torch.isfinite(actual), actual
    err = abs(float(actual) - float(expected)) / max(abs(float(expected)), 1e-12)
    assert err <= rtol, f"loss {float(actual)!r} vs reference {float(expected)!r}: relative error {err:.2e} > {rtol}"


def assert_grad_close(actual, expected, name, rtol=GRAD_RTOL):
    assert actual is not None, f"no gradient reached {name}"
    assert torch.isfinite(actual).all(), f"{name} grad not finite"
    expected = expected.to(actual.dtype)
    scale = float(expected.abs().max())
    assert scale > 0, f"reference {name} grad is all zero; the test would not test anything"
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale, msg=lambda m: f"{name} grad: {m}")


def assert_matches_top_p_reference(result, logits, temperature, top_p, labels, **kwargs):
    """(loss, dT, dP) of the fast path against the naive formula evaluated in float64 on the same inputs."""
    loss, g_t, g_p = result
    ref, r_t, r_p = top_p_with_grads(
        _soft_top_p_loss_reference, logits, temperature, top_p, labels, dtype=torch.float64, **kwargs
    )
    assert_loss_close(loss, ref)
    assert_grad_close(g_t, r_t, "temperature")
    assert_grad_close(g_p, r_p, "top_p")


# --- soft top-p ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 9), (23,), (2, 3, 5)], ids=["BxL", "N", "AxBxL"])
@pytest.mark.parametrize("dft", [True, False], ids=["dft", "no-dft"])
def test_soft_top_p_matches_float64_reference(shape, dft):
    logits, temperature, top_p, labels = make_batch(shape, seed=len(shape))
    loss, g_t, g_p = top_p_with_grads(soft_top_p_loss, logits, temperature, top_p, labels, dft=dft, chunk_size=7)
    assert loss.dtype == torch.float32
    assert_matches_top_p_reference((loss, g_t, g_p), logits, temperature, top_p, labels, dft=dft)
    assert (g_t[labels == IGNORE_INDEX] == 0).all() and (g_p[labels == IGNORE_INDEX] == 0).all()


@pytest.mark.parametrize("alpha", [1.0, 30.0, 1e4])
def test_soft_top_p_alpha(alpha):
    # 1e4 makes every tail mask underflow to 0, so sum(p m) rests on the nucleus and SOFT_TOP_P_EPS.
    logits, temperature, top_p, labels = make_batch((17,), seed=5)
    loss, g_t, g_p = top_p_with_grads(soft_top_p_loss, logits, temperature, top_p, labels, alpha=alpha)
    assert_matches_top_p_reference((loss, g_t, g_p), logits, temperature, top_p, labels, alpha=alpha)


def test_soft_top_p_float64_path_matches_reference_tightly():
    logits, temperature, top_p, labels = make_batch((2, 6), seed=11)
    args = (logits, temperature, top_p, labels)
    loss, g_t, g_p = top_p_with_grads(soft_top_p_loss, *args, dtype=torch.float64, chunk_size=5)
    ref, r_t, r_p = top_p_with_grads(_soft_top_p_loss_reference, *args, dtype=torch.float64)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=0)
    torch.testing.assert_close(g_t, r_t, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(g_p, r_p, rtol=1e-8, atol=1e-10)


def test_soft_top_p_gradcheck():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 12, generator=gen, dtype=torch.float64) * 2
    rows = torch.tensor([0, 2, 3])
    labels = torch.tensor([0, 5, int(logits[3].argmax())])
    temperature = torch.tensor([0.4, 1.0, 1.7], dtype=torch.float64, requires_grad=True)
    # P values chosen away from every cumulative probability of these rows, where relu has its kink.
    top_p = torch.tensor([0.3, 0.55, 0.8], dtype=torch.float64, requires_grad=True)

    def nll(t, p):
        return _SoftTopPNLL.apply(logits, rows, labels, t, p, 30.0, 2)[0]

    assert torch.autograd.gradcheck(nll, (temperature, top_p), eps=1e-7, atol=1e-6, rtol=1e-5)
    # The public function end to end (mean, dft weights, clamp) as well.
    assert torch.autograd.gradcheck(
        lambda t, p: soft_top_p_loss(logits[rows], t, p, labels, chunk_size=2),
        (temperature, top_p),
        eps=1e-7,
        atol=1e-6,
    )


def test_soft_top_p_bf16_logits_with_ties():
    # Logits on a coarse grid: many exact ties, so the label's rank among equal logits (ties broken by
    # vocabulary index) matters. bf16 input must give what fp32 gives on the same values.
    logits, temperature, top_p, labels = make_batch((4, 8), seed=7)
    logits = (logits * 2).round() / 2
    logits_bf16 = logits.to(torch.bfloat16)
    assert logits_bf16.float().unique().numel() < 60  # ~20 tokens share each value, the label included
    loss_bf16, gt_bf16, gp_bf16 = top_p_with_grads(soft_top_p_loss, logits_bf16, temperature, top_p, labels)
    loss_fp32, gt_fp32, gp_fp32 = top_p_with_grads(soft_top_p_loss, logits_bf16.float(), temperature, top_p, labels)
    assert loss_bf16.dtype == torch.float32
    torch.testing.assert_close(loss_bf16, loss_fp32, rtol=1e-6, atol=0)
    torch.testing.assert_close(gt_bf16, gt_fp32, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gp_bf16, gp_fp32, rtol=1e-5, atol=1e-7)
    # The reference sorts p with a stable sort, i.e. ties in vocabulary order too.
    assert_matches_top_p_reference((loss_bf16, gt_bf16, gp_bf16), logits_bf16, temperature, top_p, labels)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_signed_zero_logits_tie_with_positive_zero(dtype):
    # -0.0 == +0.0: the label's rank among them goes by vocabulary index, as for any other tie.
    logits = torch.tensor([[0.0, -0.0, 0.0, -0.0, 1.0, -2.0], [-0.0, 0.0, -0.0, 0.5, 0.0, -1.0]], dtype=dtype)
    labels = torch.tensor([3, 2])
    temperature = torch.tensor([0.7, 1.3])
    top_p = torch.tensor([0.35, 0.5])  # cuts through the tied zeros
    loss, g_t, g_p = top_p_with_grads(soft_top_p_loss, logits, temperature, top_p, labels, dft=False)
    assert_matches_top_p_reference((loss, g_t, g_p), logits, temperature, top_p, labels, dft=False)


def test_fp16_logits_match_fp32_of_same_values():
    logits, temperature, top_p, labels = make_batch((13,), seed=8)
    half = logits.to(torch.float16)
    a = top_p_with_grads(soft_top_p_loss, half, temperature, top_p, labels)
    b = top_p_with_grads(soft_top_p_loss, half.float(), temperature, top_p, labels)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-8)


# --- temperature --------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 9), (23,)], ids=["BxL", "N"])
@pytest.mark.parametrize("dft", [True, False], ids=["dft", "no-dft"])
def test_temperature_loss_matches_float64_reference(shape, dft):
    logits, temperature, _, labels = make_batch(shape, seed=20 + len(shape))
    loss, g_t = temperature_with_grad(
        temperature_loss, logits, temperature, labels, dft=dft, easy_token_mask_ratio=0.0, chunk_size=7
    )
    ref, r_t = temperature_with_grad(
        _temperature_loss_reference,
        logits,
        temperature,
        labels,
        dtype=torch.float64,
        dft=dft,
        easy_token_mask_ratio=0.0,
    )
    assert_loss_close(loss, ref)
    assert_grad_close(g_t, r_t, "temperature")


def test_temperature_loss_easy_token_mask_is_seeded():
    logits, temperature, _, labels = make_batch((8, 25), seed=30, easy_share=0.8, ignore_share=0.1)
    easy = (labels == logits.argmax(-1)) & (labels != IGNORE_INDEX)
    assert easy.sum() > 100

    def run(fn, seed, dtype=None, **kwargs):
        gen = torch.Generator().manual_seed(seed)
        return temperature_with_grad(fn, logits, temperature, labels, dtype=dtype, generator=gen, **kwargs)

    loss_a, g_a = run(temperature_loss, 1, chunk_size=7)
    loss_b, g_b = run(temperature_loss, 1, chunk_size=10000)  # same seed, other chunking: same mask
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-6, atol=0)
    torch.testing.assert_close(g_a, g_b, rtol=1e-6, atol=1e-9)
    # Dropped easy tokens get exactly zero gradient; with ratio 0.6 and >100 easy tokens some are dropped.
    dropped = easy & (g_a == 0)
    assert 0 < dropped.sum() < easy.sum()

    loss_c, g_c = run(temperature_loss, 2)
    assert not torch.equal((g_a == 0) & easy, (g_c == 0) & easy), "different seeds gave the same easy-token mask"
    assert float(loss_a) != float(loss_c)

    ref, r_t = run(_temperature_loss_reference, 1, dtype=torch.float64)  # the reference draws the same way
    assert_loss_close(loss_a, ref)
    assert_grad_close(g_a, r_t, "temperature")


def test_temperature_loss_ratio_one_drops_every_easy_token():
    logits, temperature, _, labels = make_batch((40,), seed=31, easy_share=0.5, ignore_share=0.1)
    easy = (labels == logits.argmax(-1)) & (labels != IGNORE_INDEX)
    assert 0 < easy.sum() < (labels != IGNORE_INDEX).sum()
    loss, g_t = temperature_with_grad(temperature_loss, logits, temperature, labels, easy_token_mask_ratio=1.0)
    hard_only = labels.masked_fill(easy, IGNORE_INDEX)
    expected, e_t = temperature_with_grad(temperature_loss, logits, temperature, hard_only, easy_token_mask_ratio=0.0)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(g_t, e_t, rtol=1e-6, atol=1e-9)
    assert (g_t[easy] == 0).all()
    # Only easy tokens: everything is dropped -> 0 with zero gradient.
    only_easy = labels.masked_fill(~easy, IGNORE_INDEX)
    loss, g_t = temperature_with_grad(temperature_loss, logits, temperature, only_easy, easy_token_mask_ratio=1.0)
    assert float(loss) == 0.0 and g_t is not None and (g_t == 0).all()


def test_temperature_gradcheck():
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 9, generator=gen, dtype=torch.float64)
    rows = torch.tensor([0, 1, 2])
    labels = torch.tensor([1, 4, 8])
    temperature = torch.tensor([0.3, 1.0, 2.5], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda t: _TemperatureNLL.apply(logits, rows, labels, t, 2)[0], (temperature,), eps=1e-7, atol=1e-6
    )


# --- shared behaviour ---------------------------------------------------------------------------------


def test_chunking_does_not_change_anything():
    logits, temperature, top_p, labels = make_batch((5, 7), seed=40)
    results = [
        top_p_with_grads(soft_top_p_loss, logits, temperature, top_p, labels, chunk_size=c) for c in (1, 7, 10000)
    ]
    for other in results[1:]:
        for x, y in zip(results[0], other):
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-9)
    results = [
        temperature_with_grad(
            temperature_loss, logits, temperature, labels, chunk_size=c, generator=torch.Generator().manual_seed(0)
        )
        for c in (1, 7, 10000)
    ]
    for other in results[1:]:
        for x, y in zip(results[0], other):
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-9)


def test_no_supervised_token_gives_zero_loss_and_zero_grads():
    logits, temperature, top_p, _ = make_batch((2, 5), seed=50)
    labels = torch.full((2, 5), IGNORE_INDEX)
    loss, g_t, g_p = top_p_with_grads(soft_top_p_loss, logits, temperature, top_p, labels)
    assert float(loss) == 0.0 and not torch.isnan(loss)
    assert g_t is not None and g_p is not None and (g_t == 0).all() and (g_p == 0).all()
    loss, g_t = temperature_with_grad(temperature_loss, logits, temperature, labels)
    assert float(loss) == 0.0 and g_t is not None and (g_t == 0).all()
    # Empty batch too.
    empty = torch.zeros(0, VOCAB)
    loss, g_t, g_p = top_p_with_grads(
        soft_top_p_loss, empty, torch.ones(0), torch.ones(0), torch.zeros(0, dtype=torch.long)
    )
    assert float(loss) == 0.0 and g_t.shape == (0,)


def test_extreme_temperature_and_top_p_stay_finite():
    logits, _, _, labels = make_batch((2, 10), seed=60, scale=5.0)
    temperature = torch.full((2, 10), 1e-2)
    top_p = torch.full((2, 10), 1e-3)
    loss, g_t, g_p = top_p_with_grads(soft_top_p_loss, logits, temperature, top_p, labels)
    assert torch.isfinite(loss) and torch.isfinite(g_t).all() and torch.isfinite(g_p).all()
    assert_matches_top_p_reference((loss, g_t, g_p), logits, temperature, top_p, labels)
    loss, g_t = temperature_with_grad(temperature_loss, logits, temperature, labels, easy_token_mask_ratio=0.0)
    assert torch.isfinite(loss) and torch.isfinite(g_t).all()


def test_nothing_vocabulary_sized_is_saved_for_backward():
    # The point of the module: backward keeps [N] vectors, never a [N, V] tensor.
    logits, temperature, top_p, labels = make_batch((4, 6), seed=70)
    saved = []

    def pack(tensor):
        saved.append(tuple(tensor.shape))
        return tensor

    t = temperature.clone().requires_grad_()
    p = top_p.clone().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = soft_top_p_loss(logits, t, p, labels) + temperature_loss(logits, t, labels)
    assert saved, "the hook saw nothing; the test would not test anything"
    assert all(VOCAB not in shape for shape in saved), saved
    loss.backward()


def test_logits_get_no_gradient_and_are_not_modified():
    logits, temperature, top_p, labels = make_batch((3, 4), seed=80)
    logits = logits.requires_grad_()
    before = logits.detach().clone()
    t = temperature.clone().requires_grad_()
    (soft_top_p_loss(logits, t, top_p, labels) + temperature_loss(logits, t, labels)).backward()
    assert logits.grad is None
    assert torch.equal(logits.detach(), before)


@pytest.mark.parametrize(
    "call, words",
    [
        (lambda z, t, p, y: soft_top_p_loss(z, t[:, :-1], p, y), ["temperature", "(2, 4)", "(2, 5)"]),
        (lambda z, t, p, y: soft_top_p_loss(z, t, p[..., None], y), ["top_p", "squeeze"]),
        (lambda z, t, p, y: soft_top_p_loss(z, t, p, y[0]), ["labels", "(5,)"]),
        (lambda z, t, p, y: temperature_loss(z, t.reshape(-1), y), ["temperature", "(10,)"]),
        (lambda z, t, p, y: soft_top_p_loss(z, t, p, y, alpha=0), ["alpha", "0"]),
        (lambda z, t, p, y: soft_top_p_loss(z, t, p, y, alpha=-3.0), ["alpha", "-3.0"]),
        (lambda z, t, p, y: temperature_loss(z, t, y, easy_token_mask_ratio=1.5), ["easy_token_mask_ratio", "1.5"]),
        (lambda z, t, p, y: temperature_loss(z, t, y, easy_token_mask_ratio=-0.1), ["easy_token_mask_ratio", "-0.1"]),
        (lambda z, t, p, y: soft_top_p_loss(z, t, p, y.float()), ["labels", "long"]),
        (lambda z, t, p, y: soft_top_p_loss(z, t, p, y.fill_(VOCAB)), ["labels", str(VOCAB)]),
        (lambda z, t, p, y: soft_top_p_loss(z, t, p, y, chunk_size=0), ["chunk_size"]),
    ],
)
def test_bad_inputs_raise_clear_value_errors(call, words):
    logits, temperature, top_p, labels = make_batch((2, 5), seed=90)
    with pytest.raises(ValueError) as info:
        call(logits, temperature, top_p, labels)
    for word in words:
        assert word in str(info.value), f"{word!r} missing from: {info.value}"


def test_sliced_logits_are_read_in_place_and_match_a_contiguous_copy():
    # The model passes logits[:, :-1] (a non-contiguous view): the losses must read its rows where they
    # are, without a reshape that would copy all [B, L, V] logits.
    from autodeco.losses.likelihood import _supervised

    logits, temperature, top_p, labels = make_batch((3, 10), seed=110)
    view, t_view, p_view, y_view = logits[:, :-1], temperature[:, :-1], top_p[:, :-1], labels[:, 1:]
    assert not view.is_contiguous()
    base, _, _ = _supervised(view, y_view)
    assert base.data_ptr() == view.data_ptr() and base.stride() == view.stride()
    for chunk in (1, 4, 100):
        a = top_p_with_grads(soft_top_p_loss, view, t_view, p_view, y_view, chunk_size=chunk)
        b = top_p_with_grads(soft_top_p_loss, view.contiguous(), t_view, p_view, y_view, chunk_size=chunk)
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=0, atol=0)
        a = temperature_with_grad(
            temperature_loss, view, t_view, y_view, chunk_size=chunk, generator=torch.Generator().manual_seed(1)
        )
        b = temperature_with_grad(
            temperature_loss,
            view.contiguous(),
            t_view,
            y_view,
            chunk_size=chunk,
            generator=torch.Generator().manual_seed(1),
        )
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=0, atol=0)
    # And a 3-d batch against the reference, with rows split across batch boundaries by the chunks.
    ref = top_p_with_grads(_soft_top_p_loss_reference, view, t_view, p_view, y_view, dtype=torch.float64)
    got = top_p_with_grads(soft_top_p_loss, view, t_view, p_view, y_view, chunk_size=4)
    assert_loss_close(got[0], ref[0])
    assert_grad_close(got[1], ref[1], "temperature")
    assert_grad_close(got[2], ref[2], "top_p")


def test_torch_sort_fallback_matches_numpy_sort(monkeypatch):
    # Without numpy the CPU sort falls back to torch.sort; same values, same label ranks, same loss.
    import autodeco.features as features

    logits, temperature, top_p, labels = make_batch((2, 7), seed=120)
    ties = (logits * 2).round().to(torch.bfloat16)  # and with plenty of ties
    for z in (logits, ties):
        with_numpy = top_p_with_grads(soft_top_p_loss, z, temperature, top_p, labels, chunk_size=5)
        monkeypatch.setattr(features, "_np", None)
        without = top_p_with_grads(soft_top_p_loss, z, temperature, top_p, labels, chunk_size=5)
        monkeypatch.undo()
        for x, y in zip(with_numpy, without):
            torch.testing.assert_close(x, y, rtol=0, atol=0)
