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
