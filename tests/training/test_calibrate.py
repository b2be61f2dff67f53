"""Temperature scaling recovers a known temperature from synthetic cosine scores."""

from __future__ import annotations

import numpy as np
import pytest

from training.localizer.calibrate import ScoredSet, fit_temperature, nll


@pytest.mark.parametrize("true_t", [0.02, 0.05])
def test_fit_recovers_known_temperature(true_t: float) -> None:
    rng = np.random.default_rng(0)
    sets = []
    for _ in range(3000):
        cos = rng.uniform(-0.2, 0.3, size=12)
        p = np.exp(cos / true_t - (cos / true_t).max())
        label = int(rng.choice(12, p=p / p.sum()))  # labels drawn from softmax(cos / T)
        sets.append(ScoredSet(cos, (label,)))
    fit = fit_temperature(sets)
    assert abs(fit.temperature - true_t) / true_t < 0.1
    assert fit.nll_after <= nll(sets, 0.01) + 1e-9 and fit.n == 3000


def test_multi_positive_likelihood_sums_answers() -> None:
    s = ScoredSet(np.array([0.0, 0.0, 0.0, 0.0]), (0, 1))
    assert abs(nll([s], 1.0) - (-np.log(0.5))) < 1e-12


def test_no_usable_lesions_is_an_error() -> None:
    with pytest.raises(ValueError, match="cannot fit"):
        fit_temperature([])
