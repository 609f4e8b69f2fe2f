"""pass@k: the probability that at least one of k programs drawn for a problem passes its tests.

Chen et al. 2021 ("Evaluating Large Language Models Trained on Code", eq. 1): draw n >= k samples
for a problem, count the c that pass, and estimate

    pass@k = 1 - C(n - c, k) / C(n, k)

which is unbiased (the naive 1 - (1 - c/n)^k is not). The binomial coefficients overflow quickly, so
the ratio is computed as the product

    C(n - c, k) / C(n, k) = prod_{i = n - c + 1}^{n} (1 - k / i)

(it is 0, i.e. pass@k = 1, when n - c < k: every draw of k samples holds a passing one). The
benchmark's pass@k is the mean over problems.
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with ``n`` samples of which ``c`` pass (Chen et al. 2021):
    ``1 - C(n - c, k) / C(n, k)``, computed stably as ``1 - prod_{i=n-c+1}^{n} (1 - k/i)``."""
    n, c, k = int(n), int(c), int(k)
    if k < 1:
        raise ValueError(f"pass@k needs k >= 1, got k = {k}")
    if not 0 <= c <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n, got c = {c}, n = {n}")
    if n < k:
        raise ValueError(f"pass@{k} needs at least {k} samples of a problem, got n = {n}")
    if n - c < k:
        return 1.0
    ratio = math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))
    return 1.0 - ratio


def mean_pass_at_k(counts: Iterable[Sequence[int]], k: int) -> float:
    """The benchmark's pass@k: the mean of ``pass_at_k(n, c, k)`` over problems, ``counts`` holding
    one ``(n, c)`` pair per problem (``math.fsum``: the same value whatever the platform)."""
    values = [pass_at_k(n, c, k) for n, c in counts]
    if not values:
        raise ValueError("pass@k of an empty set of problems")
    return math.fsum(values) / len(values)


def pass_at_ks(counts: Sequence[Sequence[int]], ks: Iterable[int]) -> Dict[str, float]:
    """``{'pass@k': value}`` for each ``k`` in ``ks`` that every problem has enough samples for
    (``n >= k``, as HF ``code_eval`` does); the other values of k are left out."""
    out: Dict[str, float] = {}
    for k in sorted({int(k) for k in ks}):
        if counts and all(n >= k for n, _ in counts):
            out[f"pass@{k}"] = mean_pass_at_k(counts, k)
    return out
