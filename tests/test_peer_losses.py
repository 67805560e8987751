"""The peer losses against an independent evaluation of their papers' formulas: plain-Python loops in
float64 for the values, central finite differences of those loops for the gradients, closed forms
where the paper gives one (balanced L1's gradient, Eq. 8; GHM-C's constant weights)."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch

from harmonic.peer_losses import (
    balanced_l1_loss,
    carl_weights,
    ciou_loss,
    diou_loss,
    ghm_c_loss,
    ghm_c_weights,
    giou_loss,
    quality_focal_loss,
    sigmoid_focal_loss,
    varifocal_loss,
)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _fd_grad(f: Callable[[np.ndarray], float], x: np.ndarray, h: float = 1e-6) -> np.ndarray:
    """Central finite differences of the scalar ``f`` at every element of ``x``."""
    grad = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        up, down = x.copy(), x.copy()
        up[idx] += h
        down[idx] -= h
        grad[idx] = (f(up) - f(down)) / (2 * h)
    return grad


def _autograd(fn: Callable[[torch.Tensor], torch.Tensor], x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Value and gradient of ``fn(x).sum()`` through the implementation, in float64."""
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    out = fn(xt)
    (grad,) = torch.autograd.grad(out.sum(), xt)
    return out.detach().numpy(), grad.numpy()


def _random_logits(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.0, 2.0, shape)


def _soft_targets(shape: tuple[int, ...], seed: int = 1) -> np.ndarray:
    """IoU-like targets: most elements 0, some in (0, 1)."""
    rng = np.random.default_rng(seed)
    y = rng.uniform(0.05, 0.95, shape)
    return np.where(rng.uniform(size=shape) < 0.6, 0.0, y)


# ---------------------------------------------------------------- classification


def _focal_ref(x: np.ndarray, y: np.ndarray, alpha: float = 0.25, gamma: float = 2.0) -> np.ndarray:
    out = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        p = _sigmoid(x[i])
        p_t = p if y[i] == 1 else 1.0 - p
        a_t = alpha if y[i] == 1 else 1.0 - alpha
        out[i] = -a_t * (1.0 - p_t) ** gamma * math.log(p_t)
    return out


def test_sigmoid_focal_loss_is_eq5_of_the_focal_loss_paper() -> None:
    x = _random_logits((5, 3))
    y = (np.random.default_rng(2).uniform(size=x.shape) < 0.3).astype(float)
    value, grad = _autograd(lambda t: sigmoid_focal_loss(t, torch.tensor(y)), x)
    assert np.allclose(value, _focal_ref(x, y), rtol=1e-10, atol=1e-12)
    assert np.allclose(grad, _fd_grad(lambda v: _focal_ref(v, y).sum(), x), rtol=1e-5, atol=1e-7)


def _qfl_ref(x: np.ndarray, y: np.ndarray, beta: float = 2.0) -> np.ndarray:
    out = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        s = _sigmoid(x[i])
        out[i] = -(abs(y[i] - s) ** beta) * ((1 - y[i]) * math.log(1 - s) + y[i] * math.log(s))
    return out


@pytest.mark.parametrize("beta", [2.0, 1.0])
def test_quality_focal_loss_is_eq5_of_gfl(beta: float) -> None:
    x, y = _random_logits((6, 4)), _soft_targets((6, 4))
    value, grad = _autograd(lambda t: quality_focal_loss(t, torch.tensor(y), beta=beta), x)
    assert np.allclose(value, _qfl_ref(x, y, beta), rtol=1e-10, atol=1e-12)
    assert np.allclose(grad, _fd_grad(lambda v: _qfl_ref(v, y, beta).sum(), x), rtol=1e-5, atol=1e-7)


def test_quality_focal_loss_is_zero_at_its_target_and_focal_like_on_negatives() -> None:
    y = torch.tensor([0.3, 0.8], dtype=torch.float64)
    assert torch.allclose(quality_focal_loss(torch.logit(y), y), torch.zeros(2, dtype=torch.float64))
    x = torch.tensor([-1.0, 2.0], dtype=torch.float64)
    s = torch.sigmoid(x)
    assert torch.allclose(
        quality_focal_loss(x, torch.zeros(2, dtype=torch.float64)), -(s**2) * torch.log(1 - s)
    )


def _vfl_ref(x: np.ndarray, q: np.ndarray, alpha: float = 0.75, gamma: float = 2.0) -> np.ndarray:
    out = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        p = _sigmoid(x[i])
        if q[i] > 0:
            out[i] = -q[i] * (q[i] * math.log(p) + (1 - q[i]) * math.log(1 - p))
        else:
            out[i] = -alpha * p**gamma * math.log(1 - p)
    return out


def test_varifocal_loss_is_eq2_of_varifocalnet() -> None:
    x, q = _random_logits((6, 4), seed=3), _soft_targets((6, 4), seed=4)
    value, grad = _autograd(lambda t: varifocal_loss(t, torch.tensor(q)), x)
    assert np.allclose(value, _vfl_ref(x, q), rtol=1e-10, atol=1e-12)
    assert np.allclose(grad, _fd_grad(lambda v: _vfl_ref(v, q).sum(), x), rtol=1e-5, atol=1e-7)


def _ghm_ref(x: np.ndarray, y: np.ndarray, bins: int, valid: np.ndarray) -> tuple[float, np.ndarray]:
    """The loss and its gradient w.r.t. the logits (the weights are constants: w_i (sigma_i - y_i))."""
    flat = [(i, _sigmoid(x[i])) for i in np.ndindex(x.shape) if valid[i]]
    members: dict[int, int] = {}
    for i, s in flat:
        b = min(int(abs(s - y[i]) * bins), bins - 1)
        members[b] = members.get(b, 0) + 1
    loss, grad = 0.0, np.zeros_like(x)
    for i, s in flat:
        density = members[min(int(abs(s - y[i]) * bins), bins - 1)] * bins  # GD(g) = R(g) M
        ce = -(y[i] * math.log(s) + (1 - y[i]) * math.log(1 - s))
        loss += ce / density
        grad[i] = (s - y[i]) / density
    return loss, grad


@pytest.mark.parametrize("bins", [10, 3])
def test_ghm_c_is_the_gradient_density_weighted_ce(bins: int) -> None:
    x = _random_logits((8, 3), seed=5)
    y = (np.random.default_rng(6).uniform(size=x.shape) < 0.25).astype(float)
    valid = np.random.default_rng(7).uniform(size=(8, 1)) < 0.8
    valid_t = torch.tensor(valid)
    value, grad = _autograd(lambda t: ghm_c_loss(t, torch.tensor(y), bins, valid_t, reduction="sum"), x)
    loss, expected_grad = _ghm_ref(x, y, bins, np.broadcast_to(valid, x.shape))
    assert value == pytest.approx(loss, rel=1e-10)
    assert np.allclose(grad, expected_grad, rtol=1e-10, atol=1e-12)
    assert (grad[~np.broadcast_to(valid, x.shape)] == 0).all()


def test_ghm_c_weights_of_one_bin_average_the_ce() -> None:
    """Every element in one bin: GD = N M, so the loss is the mean CE divided by M."""
    x = torch.zeros(4, 2, dtype=torch.float64)  # sigma = 0.5: g = 0.5 for every target
    y = torch.tensor([[1.0, 0.0]] * 4, dtype=torch.float64)
    w = ghm_c_weights(x, y, bins=10)
    assert torch.allclose(w, torch.full_like(w, 1 / (8 * 10)))
    assert not w.requires_grad
    assert ghm_c_loss(x, y, 10, reduction="sum").item() == pytest.approx(math.log(2) / 10)


# ---------------------------------------------------------------- balanced L1


def _balanced_l1_grad(x: float, alpha: float = 0.5, gamma: float = 1.5) -> float:
    """Eq. 8 of Libra R-CNN: the gradient the loss is built from."""
    b = math.exp(gamma / alpha) - 1
    return math.copysign(alpha * math.log(b * abs(x) + 1) if abs(x) < 1 else gamma, x)


def _balanced_l1_by_integral(x: float, alpha: float = 0.5, gamma: float = 1.5) -> float:
    """L_b(x) = integral of Eq. 8 from 0 to |x| (Simpson's rule on each side of the kink at 1)."""

    def simpson(lo: float, hi: float, n: int = 2000) -> float:
        if hi <= lo:
            return 0.0
        ts = np.linspace(lo, hi, n + 1)
        f = np.array([_balanced_l1_grad(t, alpha, gamma) for t in ts])
        return float((hi - lo) / (3 * n) * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum()))

    a = abs(x)
    return simpson(0.0, min(a, 1.0)) + simpson(1.0, max(a, 1.0))


def test_balanced_l1_is_the_integral_of_its_gradient_eq8_to_10() -> None:
    x = np.random.default_rng(8).normal(0.0, 1.2, (5, 4))
    value, grad = _autograd(lambda t: balanced_l1_loss(t, torch.zeros(5, 4, dtype=torch.float64)), x)
    expected = np.vectorize(_balanced_l1_by_integral)(x)
    assert np.allclose(value, expected, rtol=1e-7, atol=1e-9)
    assert np.allclose(grad, np.vectorize(_balanced_l1_grad)(x), rtol=1e-10, atol=1e-12)


def test_balanced_l1_is_continuous_and_zero_at_zero() -> None:
    below, above = (
        torch.tensor([1 - 1e-9], dtype=torch.float64),
        torch.tensor([1 + 1e-9], dtype=torch.float64),
    )
    zero = torch.zeros(1, dtype=torch.float64)
    assert balanced_l1_loss(below, zero).item() == pytest.approx(
        balanced_l1_loss(above, zero).item(), abs=1e-7
    )
    assert balanced_l1_loss(zero, zero).item() == 0.0
    with pytest.raises(ValueError, match="alpha"):
        balanced_l1_loss(zero, zero, alpha=0.0)


# ---------------------------------------------------------------- PISA's CARL


def _carl_ref(s: np.ndarray, loc: np.ndarray, k: float, bias: float) -> float:
    v = [((1 - bias) * si + bias) ** k for si in s]
    mean_v = sum(v) / len(v)
    return sum(vi / mean_v * li for vi, li in zip(v, loc))


@pytest.mark.parametrize(("k", "bias"), [(1.0, 0.2), (2.0, 0.0)])
def test_carl_weights_are_eq6_7_of_pisa_with_gradient_to_the_scores(k: float, bias: float) -> None:
    rng = np.random.default_rng(9)
    s, loc = rng.uniform(0.05, 0.95, 7), rng.uniform(0.1, 3.0, 7)
    value, grad = _autograd(lambda t: carl_weights(t, k, bias) * torch.tensor(loc), s)
    assert value.sum() == pytest.approx(_carl_ref(s, loc, k, bias), rel=1e-12)
    assert np.allclose(grad, _fd_grad(lambda v: _carl_ref(v, loc, k, bias), s), rtol=1e-6, atol=1e-8)
    assert carl_weights(torch.tensor(s), k, bias).mean().item() == pytest.approx(1.0)


def test_carl_weights_of_no_positive_are_empty_and_bad_options_refused() -> None:
    assert carl_weights(torch.zeros(0)).numel() == 0
    with pytest.raises(ValueError, match="bias"):
        carl_weights(torch.ones(2), bias=1.5)


# ---------------------------------------------------------------- GIoU / DIoU / CIoU


def _box_terms(p: np.ndarray, g: np.ndarray) -> tuple[float, float, float, float, float]:
    """Intersection, union, enclosing area, centre distance^2 and enclosing diagonal^2 of two
    (x1, y1, x2, y2) boxes."""
    iw = max(0.0, min(p[2], g[2]) - max(p[0], g[0]))
    ih = max(0.0, min(p[3], g[3]) - max(p[1], g[1]))
    inter = iw * ih
    union = (p[2] - p[0]) * (p[3] - p[1]) + (g[2] - g[0]) * (g[3] - g[1]) - inter
    cw, ch = max(p[2], g[2]) - min(p[0], g[0]), max(p[3], g[3]) - min(p[1], g[1])
    rho2 = ((p[0] + p[2]) / 2 - (g[0] + g[2]) / 2) ** 2 + ((p[1] + p[3]) / 2 - (g[1] + g[3]) / 2) ** 2
    return inter, union, cw * ch, rho2, cw**2 + ch**2


def _aspect_term(p: np.ndarray, g: np.ndarray) -> float:
    """v of CIoU: the squared difference of the boxes' aspect angles, scaled by 4 / pi^2."""
    angle_g = math.atan((g[2] - g[0]) / (g[3] - g[1]))
    angle_p = math.atan((p[2] - p[0]) / (p[3] - p[1]))
    return 4 / math.pi**2 * (angle_g - angle_p) ** 2


def _giou_ref(p: np.ndarray, g: np.ndarray) -> np.ndarray:
    out = []
    for pi, gi in zip(p, g):
        inter, union, c_area, _, _ = _box_terms(pi, gi)
        out.append(1 - inter / union + (c_area - union) / c_area)
    return np.array(out)


def _diou_ref(p: np.ndarray, g: np.ndarray) -> np.ndarray:
    out = []
    for pi, gi in zip(p, g):
        inter, union, _, rho2, c2 = _box_terms(pi, gi)
        out.append(1 - inter / union + rho2 / c2)
    return np.array(out)


def _ciou_alpha(p: np.ndarray, g: np.ndarray) -> float:
    inter, union, _, _, _ = _box_terms(p, g)
    v = _aspect_term(p, g)
    return v / ((1 - inter / union) + v)


def _ciou_ref(p: np.ndarray, g: np.ndarray, alpha: np.ndarray | None = None) -> np.ndarray:
    """CIoU; ``alpha`` given: held at those values (torchvision computes it without gradient)."""
    diou = _diou_ref(p, g)
    out = []
    for n, (pi, gi) in enumerate(zip(p, g)):
        a = _ciou_alpha(pi, gi) if alpha is None else alpha[n]
        out.append(diou[n] + a * _aspect_term(pi, gi))
    return np.array(out)


def _random_boxes(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 20, (n, 2))
    return np.concatenate([xy, xy + rng.uniform(2, 15, (n, 2))], axis=1)


@pytest.mark.parametrize(
    ("loss", "ref"), [(giou_loss, _giou_ref), (diou_loss, _diou_ref)], ids=["giou", "diou"]
)
def test_iou_family_losses_match_their_papers(loss, ref) -> None:
    pred, gt = _random_boxes(6, 10), _random_boxes(6, 11)
    pred[0] = gt[0]  # identical boxes: loss 0
    value, grad = _autograd(lambda t: loss(t, torch.tensor(gt)), pred)
    assert np.allclose(value, ref(pred, gt), rtol=1e-7, atol=1e-7)  # torchvision adds eps = 1e-7
    assert value[0] == pytest.approx(0.0, abs=1e-7)
    assert np.allclose(grad[1:], _fd_grad(lambda b: ref(b, gt).sum(), pred)[1:], rtol=1e-5, atol=1e-7)


def test_ciou_loss_matches_the_paper_with_alpha_held_constant() -> None:
    pred, gt = _random_boxes(6, 12), _random_boxes(6, 13)
    value, grad = _autograd(lambda t: ciou_loss(t, torch.tensor(gt)), pred)
    assert np.allclose(value, _ciou_ref(pred, gt), rtol=1e-6, atol=1e-8)
    alpha = np.array([_ciou_alpha(p, g) for p, g in zip(pred, gt)])
    assert np.allclose(grad, _fd_grad(lambda b: _ciou_ref(b, gt, alpha).sum(), pred), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("fn", [giou_loss, diou_loss, ciou_loss, quality_focal_loss, varifocal_loss])
def test_half_precision_inputs_give_float32_losses(fn) -> None:
    a = torch.tensor([[0.0, 0.0, 4.0, 4.0]], dtype=torch.float16)
    b = torch.tensor([[1.0, 1.0, 5.0, 6.0]], dtype=torch.float16)
    if fn in (quality_focal_loss, varifocal_loss):
        b = torch.tensor([[0.0, 0.5, 0.0, 0.0]], dtype=torch.float16)
    out = fn(a, b)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_ciou_of_an_empty_predicted_box_has_finite_gradients() -> None:
    pred = torch.tensor([[2.0, 2.0, 2.0, 2.0], [1.0, 1.0, 6.0, 1.0]], requires_grad=True)
    gt = torch.tensor([[0.0, 0.0, 4.0, 4.0], [0.0, 0.0, 4.0, 8.0]])
    loss = ciou_loss(pred, gt)
    (grad,) = torch.autograd.grad(loss.sum(), pred)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert (loss > 0.999).all()  # an empty box overlaps nothing: 1 - IoU alone is 1
