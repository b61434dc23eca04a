"""The accuracy-target search against a brute-force scan of the chain, on monotone and noisy accuracies."""
from __future__ import annotations

import math

import numpy as np
import pytest

from solver.ilp import BudgetError
from solver.target import answer, budget_chain, next_round
from solver_tables import random_table


def search(accuracy: dict, chain: list, floor: float, width: int):
    results, rounds = {}, 0
    while batch := next_round(chain, results, floor, width):
        assert not set(batch) & set(results), "a config fine-tuned twice"
        results.update({c: accuracy[c] for c in batch})
        rounds += 1
    return answer(chain, results, floor), results, rounds


@pytest.mark.parametrize("width", [1, 2, 3])
@pytest.mark.parametrize("seed", range(30))
def test_monotone_accuracy_finds_the_first_config_that_meets_the_target(seed, width):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 40))
    chain = [f"c{i}" for i in range(n)]
    accuracy = dict(zip(chain, np.sort(rng.uniform(80, 99, n))))
    floor = float(rng.uniform(78, 100))
    got, results, rounds = search(accuracy, chain, floor, width)
    meeting = [c for c in chain if accuracy[c] >= floor]
    assert got.answer == (meeting[0] if meeting else None)
    if meeting and chain.index(meeting[0]) > 0:
        assert got.below == chain[chain.index(meeting[0]) - 1]        # the bracket is tight
    # a bisection: about log_{width+1}(n) rounds after the first, never a full scan for long chains
    assert rounds <= 2 + math.ceil(math.log(max(n, 1), width + 1))
    if n >= 16:
        assert len(results) < n
    assert got.tested == len(results)


@pytest.mark.parametrize("seed", range(30))
def test_noisy_accuracy_answer_is_the_cheapest_tested_that_passes(seed):
    rng = np.random.default_rng(100 + seed)
    n = int(rng.integers(2, 30))
    chain = list(range(n))
    accuracy = {c: 90 + 0.3 * c + rng.normal(0, 1.5) for c in chain}
    accuracy[int(rng.integers(0, n))] = float("nan")           # a trial that failed
    floor = float(rng.uniform(88, 98))
    got, results, _ = search(accuracy, chain, floor, int(rng.integers(1, 4)))
    passing = [c for c in results if results[c] >= floor]
    assert got.answer == (min(passing) if passing else None)
    if got.answer is None:
        assert results[n - 1] < floor or math.isnan(results[n - 1])
        finite = {c: a for c, a in results.items() if not math.isnan(a)}
        assert got.closest == (max(finite, key=finite.get) if finite else None)


def test_unreachable_target_tests_only_the_most_expensive():
    chain = ["a", "b", "c", "d"]
    got, results, rounds = search({"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0}, chain, 5.0, 1)
    assert (got.answer, got.closest, list(results), rounds) == (None, "d", ["d"], 1)


def test_chain_is_the_ilp_answers_cheapest_first():
    rng = np.random.default_rng(4)
    t = random_table(rng, 10)
    chain = budget_chain(t, "size", 0.05)
    assert chain["size_mib"].is_monotonic_increasing and len(chain) == chain["config"].nunique()
    assert 2 <= len(chain) <= 21
    ends = budget_chain(t, "size", 1.0)          # r = 0 and r = 1 only: the cheapest and the richest answers
    assert ends["size_mib"].iloc[0] == chain["size_mib"].iloc[0]
    assert ends["size_mib"].iloc[-1] == chain["size_mib"].iloc[-1]
    with pytest.raises(BudgetError, match="minimize 'speed': unknown; valid: size, bops"):
        budget_chain(t, "speed", 0.05)
    with pytest.raises(BudgetError, match="resolution 0: give a budget fraction step"):
        budget_chain(t, "size", 0)
