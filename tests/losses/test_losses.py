"""The losses against the formulas of issue 4, evaluated independently in float64 here."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from aicoss_cli.base.errors import UserError
from aicoss_cli.losses.registry import LOSSES, build_loss, loss_param_defaults, resolve_loss_name

LN2, LN3 = math.log(2.0), math.log(3.0)


# ---------------------------------------------------------------------------------------------
# Independent float64 references: plain loops over entries, straight from the formulas.


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _lse(values: list[float]) -> float:
    """log sum exp; -inf for an empty list."""
    if not values:
        return -math.inf
    m = max(values)
    return m + math.log(sum(math.exp(v - m) for v in values))


def _softplus(z: float) -> float:
    return 0.0 if z == -math.inf else max(z, 0.0) + math.log1p(math.exp(-abs(z)))


def ref_zlpr(s: np.ndarray, y: np.ndarray) -> float:
    total = 0.0
    for i in range(s.shape[0]):
        neg = sum(math.exp(s[i, j]) for j in range(s.shape[1]) if y[i, j] == 0)
        pos = sum(math.exp(-s[i, j]) for j in range(s.shape[1]) if y[i, j] == 1)
        total += math.log(1.0 + neg) + math.log(1.0 + pos)
    return total / s.shape[0]


def ref_two_way(s: np.ndarray, y: np.ndarray, tp: float = 4.0, tn: float = 1.0) -> float:
    def term(entries: list[tuple[float, float]]) -> float:
        neg = [v / tn for v, t in entries if t == 0]
        pos = [-v / tp for v, t in entries if t == 1]
        return _softplus(tn * _lse(neg) + tp * _lse(pos))

    n, k = s.shape
    columns = [[(s[i, j], y[i, j]) for i in range(n)] for j in range(k)]
    rows = [[(s[i, j], y[i, j]) for j in range(k)] for i in range(n)]
    result = 0.0
    for groups in (columns, rows):
        with_pos = [g for g in groups if any(t == 1 for _, t in g)]
        if with_pos:
            result += sum(term(g) for g in with_pos) / len(with_pos)
    return result


def ref_selected_unannotated(s, y, topk, prior=None, threshold=0.05) -> np.ndarray:
    """1 where an unannotated entry keeps its weight in selective mode."""
    keep = (y == -1).astype(float)
    if prior is not None:
        for j in range(s.shape[1]):
            if prior[j] > threshold:
                keep[:, j] = 0.0
    unann = [(i, j) for i in range(s.shape[0]) for j in range(s.shape[1]) if y[i, j] == -1]
    # most likely positive first; the tests use distinct logits, so no tie matters
    unann.sort(key=lambda ij: -_sigmoid(s[ij]))
    for i, j in unann[: topk * s.shape[0]]:
        keep[i, j] = 0.0
    return keep


def ref_focal(s, y, *, gp, gn, gu=0.0, ap=1.0, an=1.0, au=1.0, clip=0.0,
              mode="ignore", prior=None, threshold=0.05, topk=5) -> float:
    """-sum of the asymmetric focusing terms; mode as P-ASL's partial_mode."""
    keep = ref_selected_unannotated(s, y, topk, prior, threshold) if mode == "selective" else None
    total = 0.0
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            p = _sigmoid(s[i, j])
            one_minus_pc = min(1.0, 1.0 - p + clip)
            pc = max(0.0, p - clip)
            t = y[i, j]
            if t == 1:
                total += ap * (1.0 - p) ** gp * math.log(p)
            elif t == 0:
                total += an * pc**gn * math.log(one_minus_pc)
            elif mode == "selective":
                total += au * keep[i, j] * pc**gu * math.log(one_minus_pc)
            elif mode == "negative":  # an unannotated entry is a negative with its own gamma/alpha
                total += au * pc**gu * math.log(one_minus_pc)
    return -total


def ref_bce(s: np.ndarray, y: np.ndarray) -> float:
    terms = []
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            if y[i, j] == -1:
                continue
            p = _sigmoid(s[i, j])
            terms.append(-math.log(p) if y[i, j] == 1 else -math.log(1.0 - p))
    return sum(terms) / len(terms) if terms else 0.0


# ---------------------------------------------------------------------------------------------
# Inputs


def random_batch(n: int, k: int, seed: int, scale: float = 3.0):
    """Distinct random logits and targets in {1, 0, -1}, with a class and a sample that have no
    positive, and (when there is room) a sample that is all -1."""
    gen = np.random.default_rng(seed)
    s = gen.permutation(np.linspace(-scale, scale, n * k)).reshape(n, k)
    y = gen.choice([1, 0, -1], size=(n, k), p=[0.3, 0.45, 0.25]).astype(np.int64)
    y[:, 0] = np.where(y[:, 0] == 1, 0, y[:, 0])
    y[0, :] = np.where(y[0, :] == 1, -1, y[0, :])
    if n > 2:
        y[1, :] = -1
    return s, y


SHAPES = [(1, 1), (1, 6), (2, 3), (7, 5), (16, 20), (5, 60)]


def as_torch(s: np.ndarray, y: np.ndarray, dtype=torch.float32):
    return torch.tensor(s, dtype=dtype), torch.tensor(y)


def assert_close(value: torch.Tensor, expected: float, rel: float = 2e-5) -> None:
    assert value.dim() == 0
    assert abs(value.item() - expected) <= rel * max(1.0, abs(expected)), (value.item(), expected)


# ---------------------------------------------------------------------------------------------
# Each loss equals its formula on random inputs


@pytest.mark.parametrize("shape", SHAPES)
def test_zlpr_matches_formula(shape):
    s, y = random_batch(*shape, seed=1)
    assert_close(build_loss("zlpr")(*as_torch(s, y)), ref_zlpr(s, y))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("tp, tn", [(4.0, 1.0), (1.0, 2.5)])
def test_two_way_matches_formula(shape, tp, tn):
    s, y = random_batch(*shape, seed=2)
    assert_close(build_loss("two_way", tp=tp, tn=tn)(*as_torch(s, y)), ref_two_way(s, y, tp, tn))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(
    "params",
    [
        {},
        {"partial_mode": "negative"},
        {"partial_mode": "ignore", "clip": 0.05},
        {"gamma_pos": 0.0, "gamma_neg": 4.0, "gamma_unann": 3.0, "alpha_pos": 2.0,
         "alpha_neg": 0.5, "alpha_unann": 0.7, "clip": 0.1, "likelihood_topk": 1},
        # gammas 0 and a wide clip: many entries have p < clip, where 1 - p_c is capped at 1
        {"gamma_neg": 0.0, "gamma_unann": 0.0, "clip": 0.2, "likelihood_topk": 0},
    ],
)
def test_partial_selective_matches_formula(shape, params):
    s, y = random_batch(*shape, seed=3)
    p = loss_param_defaults("partial_selective") | params
    expected = ref_focal(
        s, y, gp=p["gamma_pos"], gn=p["gamma_neg"], gu=p["gamma_unann"], ap=p["alpha_pos"],
        an=p["alpha_neg"], au=p["alpha_unann"], clip=p["clip"], mode=p["partial_mode"],
        topk=p["likelihood_topk"],
    )
    assert_close(build_loss("partial_selective", **params)(*as_torch(s, y)), expected)


@pytest.mark.parametrize("shape", SHAPES)
def test_partial_selective_with_prior_matches_formula(shape):
    s, y = random_batch(*shape, seed=4)
    prior = np.random.default_rng(5).uniform(0.0, 0.1, size=shape[1])
    loss = build_loss("pasl", likelihood_topk=1, prior=prior.tolist())
    expected = ref_focal(s, y, gp=1.0, gn=1.0, gu=2.0, mode="selective", prior=prior, topk=1)
    assert_close(loss(*as_torch(s, y)), expected)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("params", [{}, {"gamma_pos": 0.0, "gamma_neg": 2.0, "clip": 0.0}])
def test_asl_matches_formula(shape, params):
    s, y = random_batch(*shape, seed=6)
    p = loss_param_defaults("asl") | params
    expected = ref_focal(s, y, gp=p["gamma_pos"], gn=p["gamma_neg"], clip=p["clip"])
    assert_close(build_loss("asl", **params)(*as_torch(s, y)), expected)


@pytest.mark.parametrize("shape", SHAPES)
def test_bce_matches_formula(shape):
    s, y = random_batch(*shape, seed=7)
    assert_close(build_loss("bce")(*as_torch(s, y)), ref_bce(s, y))


def test_losses_accept_float_and_int_targets():
    s, y = random_batch(6, 7, seed=8)
    for name in LOSSES:
        loss = build_loss(name)
        as_int = loss(torch.tensor(s, dtype=torch.float32), torch.tensor(y, dtype=torch.int8))
        as_float = loss(torch.tensor(s, dtype=torch.float32), torch.tensor(y, dtype=torch.float32))
        assert as_int.dtype == torch.float32
        assert as_int.item() == as_float.item()


# ---------------------------------------------------------------------------------------------
# Hand-computed 2 x 3 cases


def test_zlpr_tiny_case_by_hand():
    # sample 0: negatives {ln2} -> log(1 + 2); positives {0} -> log(1 + 1)      = log 6
    # sample 1: negatives {ln2, 0} -> log(1 + 2 + 1); positives {0} -> log 2    = log 8
    # mean = (log 6 + log 8) / 2
    s = torch.tensor([[0.0, LN2, -LN3], [LN2, 0.0, 0.0]])
    y = torch.tensor([[1, 0, -1], [0, 0, 1]])
    assert_close(build_loss("zlpr")(s, y), (math.log(6) + math.log(8)) / 2)


def test_two_way_tiny_case_by_hand():
    # tp = 4, tn = 1.
    # class 0: positives s = 0, -4 ln2 -> 4 * LSE(0, ln2) = 4 ln3; no negative -> softplus(-inf) = 0
    # class 1: positive s = 0 -> 0; negative s = ln2 -> ln2; softplus(ln2) = ln3
    # class 2: no positive -> left out.        class mean = (0 + ln3) / 2
    # sample 0: positive s = 0 -> 0; negative ln2 -> softplus(ln2) = ln3
    # sample 1: positives -4ln2, 0 -> 4 LSE(ln2, 0) = 4 ln3; negative ln2:
    #           softplus(ln2 + 4 ln3) = log(1 + 2 * 81) = ln 163.   sample mean = (ln3 + ln163) / 2
    s = torch.tensor([[0.0, LN2, 7.0], [-4 * LN2, 0.0, LN2]])
    y = torch.tensor([[1, 0, -1], [1, 1, 0]])
    assert_close(build_loss("two_way")(s, y), LN3 / 2 + (LN3 + math.log(163)) / 2)


def test_partial_selective_tiny_cases_by_hand():
    # all logits 0: p = 1/2; a positive costs (1/2)^1 ln2, a negative (1/2)^1 ln2,
    # an unannotated entry (1/2)^2 ln2 (gamma_unann = 2).
    s = torch.zeros(2, 3)
    y = torch.tensor([[1, 0, -1], [0, -1, -1]])
    # ignore: 1 positive + 2 negatives
    assert_close(build_loss("pasl", partial_mode="ignore")(s, y), 1.5 * LN2)
    # negative: 1 positive + 2 negatives (gamma_neg = 1) + 3 unannotated as negatives (gamma_unann = 2)
    assert_close(build_loss("pasl", partial_mode="negative")(s, y), 1.5 * LN2 + 3 * 0.25 * LN2)
    # selective, no top-k, prior 0.5 > 0.05 on class 1: the unannotated (1, 1) is dropped,
    # (0, 2) and (1, 2) stay: 0.5 ln2 + 2 * 0.5 ln2 + 2 * 0.25 ln2
    loss = build_loss("pasl", likelihood_topk=0, prior=[0.01, 0.5, 0.01])
    assert_close(loss(s, y), 2.0 * LN2)


def test_asl_tiny_case_by_hand():
    # logits 0: p = 1/2, p_c = 0.45, 1 - p_c = 0.55; gamma_pos = 1, gamma_neg = 4, clip = 0.05.
    # 2 positives: 2 * 0.5 * ln2;  3 negatives: -3 * 0.45^4 * ln 0.55;  the -1 entry is ignored
    s = torch.zeros(2, 3)
    y = torch.tensor([[1, 0, -1], [0, 1, 0]])
    assert_close(build_loss("asl")(s, y), 2 * 0.5 * LN2 - 3 * 0.45**4 * math.log(0.55))


def test_bce_tiny_case_by_hand():
    # (0,0) y=1 s=0: ln2; (0,1) y=0 s=ln3 (p=3/4): ln4; (0,2) not annotated;
    # (1,0) y=1 s=-ln3 (p=1/4): ln4; (1,1) y=1 s=0: ln2; (1,2) y=0 s=0: ln2 -> 7 ln2 / 5
    s = torch.tensor([[0.0, LN3, 5.0], [-LN3, 0.0, 0.0]])
    y = torch.tensor([[1, 0, -1], [1, 1, 0]])
    assert_close(build_loss("bce")(s, y), 7 * LN2 / 5)


def test_reductions_are_declared():
    expected = {"zlpr": "mean", "two_way": "mean", "bce": "mean",
                "partial_selective": "sum", "asl": "sum"}
    assert {name: build_loss(name).reduction for name in LOSSES} == expected


@pytest.mark.parametrize("name", ["partial_selective", "asl"])
def test_summed_losses_double_with_a_duplicated_batch(name):
    s, y = as_torch(*random_batch(4, 6, seed=9))
    loss = build_loss(name, **({"partial_mode": "ignore"} if name == "partial_selective" else {}))
    assert_close(loss(torch.cat([s, s]), torch.cat([y, y])), 2 * loss(s, y).item())


# ---------------------------------------------------------------------------------------------
# Edge cases: empty sets never give NaN


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("fill", [-1, 0, 1])
def test_loss_of_a_uniform_batch_is_finite_with_finite_gradient(name, fill):
    s = torch.randn(3, 4, requires_grad=True)
    loss = build_loss(name)(s, torch.full((3, 4), fill))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


def test_two_way_without_positives_is_zero():
    s = torch.randn(3, 4, requires_grad=True)
    loss = build_loss("two_way")(s, torch.tensor([[0, -1, 0, 0]] * 3))
    loss.backward()
    assert loss.item() == 0.0 and (s.grad == 0).all()


def test_zlpr_all_unannotated_sample_contributes_zero():
    s = torch.tensor([[3.0, -2.0], [0.0, 0.0]])
    y = torch.tensor([[-1, -1], [1, 0]])
    # sample 0 gives log(1) + log(1) = 0; sample 1 gives 2 ln2; mean = ln2
    assert_close(build_loss("zlpr")(s, y), LN2)


# ---------------------------------------------------------------------------------------------
# Gradients


def _gradcheck(name: str, params: dict, s: np.ndarray, y: np.ndarray) -> None:
    loss = build_loss(name, **params)
    logits = torch.tensor(s, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor(y)
    assert torch.autograd.gradcheck(lambda x: loss(x, targets), (logits,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("name, params", [
    ("zlpr", {}),
    ("two_way", {}),
    ("two_way", {"tp": 1.5, "tn": 0.5}),
    ("bce", {}),
    # gammas 0: no detached focusing factor, so finite differences see the same function
    ("partial_selective", {"gamma_pos": 0.0, "gamma_neg": 0.0, "gamma_unann": 0.0}),
    ("partial_selective", {"gamma_pos": 0.0, "gamma_neg": 0.0, "gamma_unann": 0.0,
                           "clip": 0.05, "alpha_neg": 0.5, "partial_mode": "negative"}),
    ("asl", {"gamma_pos": 0.0, "gamma_neg": 0.0}),
])
def test_gradcheck_in_float64(name, params):
    s, y = random_batch(5, 6, seed=10)
    _gradcheck(name, params, s, y)


def ref_focal_gradient(s, y, *, gp, gn, clip, unann_weight) -> np.ndarray:
    """d loss / d s with the focusing weights held constant (they carry no gradient):
    positives: -w (1 - p); negatives: w * d/ds[-log(1 - p_c)], which is p for clip = 0 and
    p (1 - p) / (1 - p + clip) for clip > 0 where 1 - p + clip < 1, else 0."""
    grad = np.zeros_like(s)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            p = _sigmoid(s[i, j])
            if y[i, j] == 1:
                grad[i, j] = -((1.0 - p) ** gp) * (1.0 - p)
                continue
            w = max(0.0, p - clip) ** gn * (1.0 if y[i, j] == 0 else unann_weight[i, j])
            if clip == 0:
                grad[i, j] = w * p
            elif 1.0 - p + clip < 1.0:
                grad[i, j] = w * p * (1.0 - p) / (1.0 - p + clip)
    return grad


@pytest.mark.parametrize("clip", [0.0, 0.05])
def test_asl_gradient_holds_focusing_weights_constant(clip):
    s, y = random_batch(6, 7, seed=11)
    logits = torch.tensor(s, requires_grad=True)
    build_loss("asl", gamma_pos=1.0, gamma_neg=4.0, clip=clip)(logits, torch.tensor(y)).backward()
    expected = ref_focal_gradient(s, y, gp=1.0, gn=4.0, clip=clip, unann_weight=np.zeros_like(s))
    np.testing.assert_allclose(logits.grad.numpy(), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("clip", [0.0, 0.05])
def test_partial_selective_gradient_holds_focusing_weights_constant(clip):
    # gamma_unann = gamma_neg so one reference weight serves both kinds of negative
    s, y = random_batch(6, 7, seed=12)
    logits = torch.tensor(s, requires_grad=True)
    loss = build_loss("pasl", gamma_neg=2.0, gamma_unann=2.0, clip=clip, likelihood_topk=1)
    loss(logits, torch.tensor(y)).backward()
    keep = ref_selected_unannotated(s, y, topk=1)
    expected = ref_focal_gradient(s, y, gp=1.0, gn=2.0, clip=clip, unann_weight=keep)
    np.testing.assert_allclose(logits.grad.numpy(), expected, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# Selective mode picks exactly the right unannotated entries


def _unannotated_entries_with_gradient(loss, s: np.ndarray, y: np.ndarray) -> set:
    logits = torch.tensor(s, dtype=torch.float32, requires_grad=True)
    loss(logits, torch.tensor(y)).backward()
    return {(i, j) for i, j in zip(*np.nonzero(y == -1)) if logits.grad[i, j] != 0}


def test_selective_mode_drops_exactly_the_top_k_most_likely_positive_unannotated():
    s, y = random_batch(8, 10, seed=13)
    n_unann = int((y == -1).sum())
    topk = 2
    assert n_unann > topk * 8  # some must stay
    ranked = sorted(zip(*np.nonzero(y == -1)), key=lambda ij: -s[ij])
    expected_kept = set(ranked[topk * 8:])
    kept = _unannotated_entries_with_gradient(
        build_loss("pasl", gamma_unann=0.0, likelihood_topk=topk), s, y
    )
    assert kept == expected_kept


def test_selective_mode_drops_the_unannotated_entries_of_high_prior_classes():
    s, y = random_batch(8, 10, seed=14)
    prior = [0.2 if j in (2, 5) else 0.01 for j in range(10)]
    kept = _unannotated_entries_with_gradient(
        build_loss("pasl", gamma_unann=0.0, likelihood_topk=0, prior=prior), s, y
    )
    assert kept == {(i, j) for i, j in zip(*np.nonzero(y == -1)) if j not in (2, 5)}
    assert kept  # the test means something only if some remain


def test_selective_mode_with_more_top_k_than_unannotated_drops_them_all():
    s, y = random_batch(3, 4, seed=15)
    kept = _unannotated_entries_with_gradient(build_loss("pasl", likelihood_topk=100), s, y)
    assert kept == set()


def test_selective_mode_breaks_ties_deterministically():
    s = np.zeros((2, 4))
    y = np.full((2, 4), -1)
    loss = build_loss("pasl", gamma_unann=0.0, likelihood_topk=1)
    first = _unannotated_entries_with_gradient(loss, s, y)
    assert len(first) == 6
    assert all(_unannotated_entries_with_gradient(loss, s, y) == first for _ in range(3))


def test_set_prior_changes_the_selection_and_none_clears_it():
    s, y = random_batch(6, 5, seed=16)
    loss = build_loss("pasl", likelihood_topk=0)
    without = loss(*as_torch(s, y)).item()
    loss.set_prior([1.0, 0.0, 0.0, 0.0, 0.0])
    with_prior = loss(*as_torch(s, y)).item()
    expected = ref_focal(s, y, gp=1.0, gn=1.0, gu=2.0, mode="selective", topk=0,
                         prior=[1.0, 0.0, 0.0, 0.0, 0.0])
    assert with_prior != without
    assert abs(with_prior - expected) < 2e-5 * max(1.0, expected)
    loss.set_prior(None)
    assert loss(*as_torch(s, y)).item() == without


def test_prior_of_the_wrong_length_is_a_user_error():
    loss = build_loss("pasl", prior=[0.1, 0.2])
    with pytest.raises(UserError, match="prior has 2 values but the model has 3 classes"):
        loss(torch.zeros(2, 3), torch.full((2, 3), -1))


# ---------------------------------------------------------------------------------------------
# Half precision


def _autocast_dtypes():
    dtypes = [torch.bfloat16]
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            torch.ones(2, 2) @ torch.ones(2, 2)
        dtypes.append(torch.float16)
    except (RuntimeError, AssertionError):  # no CPU fp16 autocast: .half() logits emulate it
        dtypes.append("half-logits")
    return dtypes


def _extreme_batch():
    gen = torch.Generator().manual_seed(17)
    s = torch.randn(8, 12, generator=gen) * 20
    s[0, :6], s[1, :6] = 100.0, -100.0
    s[2, :] = torch.tensor([100.0, -100.0] * 6)
    y = torch.randint(-1, 2, (8, 12), generator=gen)
    y[0, :3], y[1, :3], y[0, 3:6], y[1, 3:6] = 1, 1, 0, 0  # confidently right and wrong, at +-100
    return s, y


@pytest.mark.parametrize("dtype", _autocast_dtypes(), ids=str)
@pytest.mark.parametrize("name", list(LOSSES))
def test_half_precision_autocast_matches_fp32_and_stays_finite_at_100(name, dtype):
    s, y = _extreme_batch()
    half = torch.float16 if dtype == "half-logits" else dtype
    s = s.to(half).float()  # the same logits in every precision
    loss = build_loss(name)
    reference = loss(s, y)

    # logits produced in half precision by an autocast layer, as in training
    layer = torch.nn.Linear(12, 12, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(12))
    inputs = s.clone().requires_grad_(True)
    if dtype == "half-logits":
        value = loss(layer(inputs).half(), y)
    else:
        with torch.autocast("cpu", dtype=dtype):
            logits = layer(inputs)
            assert logits.dtype == dtype
            value = loss(logits, y)
    value.backward()

    assert value.dtype == torch.float32
    assert torch.isfinite(value) and torch.isfinite(inputs.grad).all()
    assert torch.isfinite(layer.weight.grad).all()
    assert abs(value.item() - reference.item()) <= 1e-3 * abs(reference.item())


@pytest.mark.parametrize("name", list(LOSSES))
def test_fp32_logits_under_autocast_keep_full_precision(name):
    s, y = _extreme_batch()
    loss = build_loss(name)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = loss(s, y)
    assert inside.dtype == torch.float32 and inside.item() == loss(s, y).item()


# ---------------------------------------------------------------------------------------------
# Names and parameters


@pytest.mark.parametrize("spelling, canonical", [
    ("zlpr", "zlpr"), ("ZLPR", "zlpr"),
    ("multilabel_categorical_crossentropy", "zlpr"),
    ("Multilabel_Categorical_CrossEntropy", "zlpr"),
    ("two_way", "two_way"), ("TwoWayLoss", "two_way"), ("twowayloss", "two_way"),
    ("partial_selective", "partial_selective"), ("PartialSelectiveLoss", "partial_selective"),
    ("pasl", "partial_selective"), ("P-ASL", "partial_selective"),
    ("asl", "asl"), ("AsymmetricLoss", "asl"),
    ("bce", "bce"), ("BCELogitLoss", "bce"), ("BCE", "bce"),
])
def test_loss_names_and_seed_aliases_resolve_case_insensitively(spelling, canonical):
    assert resolve_loss_name(spelling) == canonical
    assert type(build_loss(spelling)) is type(build_loss(canonical))


def test_unknown_loss_name_suggests_close_names():
    with pytest.raises(UserError, match="zlrp") as err:
        build_loss("zlrp")
    assert "did you mean 'zlpr'" in str(err.value)
    with pytest.raises(UserError, match="TwoWayLoss"):
        resolve_loss_name("TwoWayLos")
    with pytest.raises(UserError, match="known losses: zlpr, two_way"):
        resolve_loss_name("focal")


def test_a_parameter_the_loss_does_not_accept_is_a_user_error():
    with pytest.raises(UserError) as err:
        build_loss("bce", gamma_unann=2)
    assert str(err.value) == "[loss] gamma_unann does not apply to loss 'bce' (it accepts: none)"
    with pytest.raises(UserError, match=r"gama_pos does not apply to loss 'asl'.*gamma_pos"):
        build_loss("AsymmetricLoss", gama_pos=1)


def test_parameters_set_to_none_take_the_default():
    loss = build_loss("pasl", gamma_pos=None, clip=None, prior=None, partial_mode=None)
    assert (loss.gamma_pos, loss.clip, loss.partial_mode) == (1.0, 0.0, "selective")
    assert type(build_loss("bce", gamma_unann=None)).__name__ == "BCELogitLoss"


@pytest.mark.parametrize("name, params, fragment", [
    ("asl", {"gamma_neg": -1}, "gamma_neg must be a number >= 0"),
    ("pasl", {"gamma_unann": -0.5}, "gamma_unann"),
    ("pasl", {"alpha_pos": -1}, "alpha_pos"),
    ("asl", {"clip": 1.0}, "clip must be a number >= 0 and < 1"),
    ("pasl", {"clip": -0.1}, "clip"),
    ("pasl", {"clip": "0.05"}, "clip"),
    ("pasl", {"gamma_pos": True}, "gamma_pos"),
    ("pasl", {"gamma_pos": float("nan")}, "gamma_pos"),
    ("pasl", {"partial_mode": "negatives"}, "partial_mode must be one of negative, ignore"),
    ("pasl", {"likelihood_topk": -1}, "likelihood_topk"),
    ("pasl", {"likelihood_topk": 2.5}, "likelihood_topk"),
    ("pasl", {"prior_threshold": 2}, "prior_threshold"),
    ("pasl", {"prior": [0.1, 1.5]}, "prior values must lie in"),
    ("pasl", {"prior": "labels"}, "prior"),
    ("pasl", {"prior": [[0.1]]}, "one value per class"),
    ("two_way", {"tp": 0}, "tp must be a number > 0"),
])
def test_invalid_parameter_values_are_user_errors(name, params, fragment):
    with pytest.raises(UserError, match=fragment):
        build_loss(name, **params)


def test_parameter_defaults_are_the_seeds():
    assert loss_param_defaults("zlpr") == {}
    assert loss_param_defaults("bce") == {}
    assert loss_param_defaults("TwoWayLoss") == {"tp": 4.0, "tn": 1.0}
    assert loss_param_defaults("asl") == {"gamma_pos": 1.0, "gamma_neg": 4.0, "clip": 0.05}
    assert loss_param_defaults("pasl") == {
        "gamma_pos": 1.0, "gamma_neg": 1.0, "gamma_unann": 2.0,
        "alpha_pos": 1.0, "alpha_neg": 1.0, "alpha_unann": 1.0, "clip": 0.0,
        "partial_mode": "selective", "prior_threshold": 0.05, "likelihood_topk": 5,
        "prior": None,
    }


def test_every_loss_has_a_one_line_description():
    assert set(LOSSES) == {"zlpr", "two_way", "partial_selective", "asl", "bce"}
    assert all(desc and "\n" not in desc for desc in LOSSES.values())
