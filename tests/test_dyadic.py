"""Dyadic requantization against independent integer arithmetic and the paper's O(1) example."""
import numpy as np
import pytest
import torch

from hawq_ray.program.dyadic import dyadic, requantize


def python_int_requantize(z, b, c):
    """(z*b + 2^(c-1)) >> c with Python's unbounded integers (an independent exact computation)."""
    return [(int(zi) * int(bi) + (1 << (int(ci) - 1))) >> int(ci) for zi, bi, ci in zip(z, b, c)]


def test_requantize_matches_python_integers_on_random_and_extreme_inputs():
    rng = np.random.default_rng(0)
    n = 20000
    z = rng.integers(-(2**31), 2**31, size=n, dtype=np.int64)
    z[:6] = [2**31 - 1, -(2**31), 0, 1, -1, 2**30]
    m = np.exp(rng.uniform(np.log(1e-12), np.log(1e6), size=n))
    m[:6] = [1e-12, 1e6, 0.5, 1.0, 2**-20, 0.999999999]
    b, c = dyadic(m)
    got = requantize(torch.from_numpy(z), torch.from_numpy(b), torch.from_numpy(c)).numpy()
    assert got.tolist() == python_int_requantize(z, b, c)
    # and it is round-half-up of z * b / 2^c: floor(z*b/2^c + 1/2)
    from fractions import Fraction
    for i in range(0, n, 997):
        exact = Fraction(int(z[i]) * int(b[i]), 2 ** int(c[i])) + Fraction(1, 2)
        assert got[i] == exact.__floor__()


def test_dyadic_approximation_error_is_bounded():
    rng = np.random.default_rng(1)
    m = np.exp(rng.uniform(np.log(1e-9), np.log(1e8), size=50000))
    b, c = dyadic(m)
    assert b.max() < 2**31 and b.min() >= 2**30 - 1 and c.min() >= 1
    approx = b.astype(np.float64) * np.exp2(-c.astype(np.float64))
    rel = np.abs(approx - m) / m
    assert rel.max() <= 2.0**-31 * (1 + 1e-9)


def test_requantize_error_against_real_product_is_half_plus_dyadic_error():
    rng = np.random.default_rng(2)
    z = rng.integers(-(2**31), 2**31, size=5000, dtype=np.int64)
    m = np.exp(rng.uniform(np.log(1e-6), np.log(10), size=5000))
    b, c = dyadic(m)
    got = requantize(torch.from_numpy(z), torch.from_numpy(b), torch.from_numpy(c)).numpy().astype(np.float64)
    real = z.astype(np.float64) * m
    bound = 0.5 + np.abs(real) * 2.0**-31 + 1e-6 * np.abs(real) * 2**-20
    assert np.all(np.abs(got - real) <= bound + 1e-9)


def test_requantize_is_round_half_up_and_clamps():
    b, c = dyadic(np.array([0.5, 0.5, 0.5, 0.5]))
    z = torch.tensor([1, 3, -1, -3])          # 0.5, 1.5, -0.5, -1.5 -> half up: 1, 2, 0, -1
    assert requantize(z, torch.from_numpy(b), torch.from_numpy(c)).tolist() == [1, 2, 0, -1]
    z = torch.tensor([1000, -1000])
    b, c = dyadic(np.array([1.0, 1.0]))
    assert requantize(z, torch.from_numpy(b), torch.from_numpy(c), 0, 15).tolist() == [15, 0]


def test_requantize_rejects_float_tensors_and_bad_multipliers():
    with pytest.raises(TypeError, match="integer"):
        requantize(torch.tensor([1.0]), torch.tensor([1]), torch.tensor([1]))
    with pytest.raises(ValueError, match="positive"):
        dyadic(np.array([0.0]))


def test_paper_o1_example_true_vs_fake_quantization():
    """Appendix G: S_a = 1, r = 2.4, m = 4.4: true quantization gives 6, fake quantization 7 (eq. 22-23)."""
    # r and m arrive as INT32 accumulators at scale 0.1 (q_r = 24, q_m = 44), output scale S_a = 1.
    s_branch, s_out = 0.1, 1.0
    b, c = (torch.from_numpy(a) for a in dyadic(np.array(s_branch / s_out)))
    q_r, q_m = torch.tensor(24), torch.tensor(44)
    true_q = requantize(q_r, b, c) + requantize(q_m, b, c)             # eq. 18/23: DN each branch, then add
    fake_q = np.floor((s_branch * 24 + s_branch * 44) / s_out + 0.5)  # eq. 20/22: add in float, then Int
    assert int(true_q) == 6 and int(fake_q) == 7


def closest_31_bit_dyadic_error(m):
    """The smallest |b / 2^c - m| over every b in [1, 2^31) and c in [1, 62], exactly (Fractions): for each c
    the best b is round(m 2^c), or 2^31 - 1 where that rounds to 2^31 or more. An oracle for dyadic()."""
    from fractions import Fraction
    m = Fraction(m)
    best = None
    for c in range(1, 63):
        b = min((m * 2 ** c + Fraction(1, 2)).__floor__(), 2 ** 31 - 1)
        if b >= 1:
            err = abs(Fraction(b, 2 ** c) - m)
            best = err if best is None else min(best, err)
    return best


# Multipliers just below a power of two round f 2^31 up to 2^31 (the guard must halve b and the shift); the
# exactly representable ones must come back exact.
JUST_BELOW = [1 - 2.0 ** -33, 1 - 2.0 ** -32, 1 - 2.0 ** -40, 0.5 * (1 - 2.0 ** -33), 2.0 ** 20 * (1 - 2.0 ** -34),
              2.0 ** 29 * (1 - 2.0 ** -33), 2.0 ** -31 * (1 - 2.0 ** -33), 2.0 ** -20 * (1 - 2.0 ** -35)]
EXACT = {1 - 2.0 ** -31: (2 ** 31 - 1, 31), 1.0: (2 ** 30, 30), 0.75: (3 * 2 ** 29, 31),
         2.0 ** 30 - 1: (2 ** 31 - 2, 1), 2.0 ** -31: (2 ** 30, 61), (2 ** 31 - 1) * 2.0 ** -62: (2 ** 31 - 1, 62)}


@pytest.mark.parametrize("m", JUST_BELOW + list(EXACT))
def test_dyadic_at_the_31_bit_edge_is_in_range_and_closest(m):
    """b < 2^31 (a signed INT32), 2^30 <= b, 1 <= c <= 62, and b / 2^c as close to m as any 31-bit dyadic number
    (Fractions). Hand bound: m = f 2^e with f in [1/2, 1) and b rounded at shift 31 - e, so the error is at most
    2^-(32 - e) = 2^-31 2^(e - 1) <= 2^-31 m, halving b included (2^30 / 2^(c-1) is the same number as 2^31 / 2^c).
    Guards the `>=` of the overflow guard: with `>`, 1 - 2^-33 gives b = 2^31."""
    from fractions import Fraction
    b, c = (int(v) for v in dyadic(np.array(m)))
    assert b < 2 ** 31 and b >= 2 ** 30 and 1 <= c <= 62, (b, c)
    err = abs(Fraction(b, 2 ** c) - Fraction(m))
    assert err <= Fraction(m) / 2 ** 31
    assert err == closest_31_bit_dyadic_error(m)
    if m in EXACT:
        assert (b, c) == EXACT[m] and err == 0


def test_dyadic_just_below_a_power_of_two_halves_to_the_power():
    """Hand-worked: f 2^31 = 2^31 - 1/4 for m = 1 - 2^-33 rounds to 2^31, which is 2^30 at one shift less."""
    b, c = dyadic(np.array([1 - 2.0 ** -33, 0.25 * (1 - 2.0 ** -33), 1 - 2.0 ** -32]))
    assert b.tolist() == [2 ** 30] * 3 and c.tolist() == [30, 32, 30]


def test_dyadic_refuses_a_multiplier_that_rounds_to_2_to_the_30():
    """2^30 - 1/8 < 2^30 rounds to 2^30, which needs shift 0 (< 1): refused like any multiplier >= 2^30, never
    returned with c = 0 (requantize's 2^(c-1) would be 2^-1)."""
    with pytest.raises(ValueError, match="too large"):
        dyadic(np.array([2.0 ** 30 * (1 - 2.0 ** -33)]))
    with pytest.raises(ValueError, match="too large"):
        dyadic(np.array([2.0 ** 30]))
