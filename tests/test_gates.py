"""Gate bands: every boundary of DESIGN.md section 6 lands on the right side."""

import math

import pytest

from gt_pipeline import gates
from gt_pipeline.gates import Verdict

P, W, F = Verdict.PASS, Verdict.WARN, Verdict.FAIL


@pytest.mark.parametrize(
    "band, value, expected",
    [
        (gates.G2_ENTROPY_RATIO, 0.95, P), (gates.G2_ENTROPY_RATIO, 0.90, P), (gates.G2_ENTROPY_RATIO, 0.8999, W),
        (gates.G2_ENTROPY_RATIO, 0.75, W), (gates.G2_ENTROPY_RATIO, 0.7499, F),
        (gates.G3_GRAD_NORM, 0.5, P), (gates.G3_GRAD_NORM, 1.5, P), (gates.G3_GRAD_NORM, 0.49, W),
        (gates.G3_GRAD_NORM, 1.51, W), (gates.G3_GRAD_NORM, 5.0, W), (gates.G3_GRAD_NORM, 5.01, F),
        (gates.G35_STATE_COSINE, 0.9499, P), (gates.G35_STATE_COSINE, 0.95, W), (gates.G35_STATE_COSINE, 0.99, W),
        (gates.G35_STATE_COSINE, 0.9901, F),
        (gates.G35_EFFECTIVE_RANK, 0.51, P), (gates.G35_EFFECTIVE_RANK, 0.5, W), (gates.G35_EFFECTIVE_RANK, 0.2, W),
        (gates.G35_EFFECTIVE_RANK, 0.19, F),
        (gates.G35_SATURATION, 0.29, P), (gates.G35_SATURATION, 0.30, W), (gates.G35_SATURATION, 0.50, W),
        (gates.G35_SATURATION, 0.51, F),
        (gates.G4_GRAD_RATIO, 0.3, P), (gates.G4_GRAD_RATIO, 3.0, P), (gates.G4_GRAD_RATIO, 0.29, W),
        (gates.G4_GRAD_RATIO, 0.1, W), (gates.G4_GRAD_RATIO, 0.099, F), (gates.G4_GRAD_RATIO, 3.01, W),
        (gates.G4_GRAD_RATIO, 10.0, W), (gates.G4_GRAD_RATIO, 10.01, F),
    ],
    ids=lambda x: getattr(x, "name", str(x)),
)
def test_band_boundaries(band, value, expected):
    assert band.classify(value) is expected


@pytest.mark.parametrize("band", list(gates.BANDS.values()), ids=lambda b: b.name)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, None])
def test_non_finite_values_fail(band, bad):
    assert band.classify(bad) is F


def test_g3_needs_loss_going_down_whatever_the_norm():
    assert gates.g3_verdict(5.0, 4.0, 1.0)[0] is P
    assert gates.g3_verdict(5.0, 4.0, 3.0)[0] is W
    assert gates.g3_verdict(5.0, 4.0, 6.0)[0] is F
    assert gates.g3_verdict(5.0, 5.0, 1.0)[0] is F  # flat loss
    assert gates.g3_verdict(5.0, math.nan, 1.0)[0] is F


def test_worst_verdict_ignores_not_applicable():
    assert Verdict.worst([P, W, Verdict.NOT_APPLICABLE]) is W
    assert Verdict.worst([P, F, W]) is F
    assert Verdict.worst([Verdict.NOT_APPLICABLE]) is Verdict.NOT_APPLICABLE
