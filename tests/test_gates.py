"""Gate bands: every boundary of DESIGN.md section 6 lands on the right side."""

import math

import pytest

from gt_pipeline import gates
from gt_pipeline.gates import Verdict

P, W, F = Verdict.PASS, Verdict.WARN, Verdict.FAIL


@pytest.mark.parametrize(
    "band, value, expected",
    [
        (gates.G2_INIT_LOSS, 0.0, P), (gates.G2_INIT_LOSS, 0.02, P), (gates.G2_INIT_LOSS, 0.0201, W),
        (gates.G2_INIT_LOSS, 0.05, W), (gates.G2_INIT_LOSS, 0.0501, F),
        (gates.S1_STATE_RMS, 0.005, P), (gates.S1_STATE_RMS, 0.8, P), (gates.S1_STATE_RMS, 1e-6, F),
        (gates.S1_STATE_RMS, 1e3, F),
        (gates.S4_STATE_BALANCE, 1.0, P), (gates.S4_STATE_BALANCE, 3.0, P), (gates.S4_STATE_BALANCE, 3.01, W),
        (gates.S4_STATE_BALANCE, 9.99, W), (gates.S4_STATE_BALANCE, 10.0, F),
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


@pytest.mark.parametrize("band", [*gates.BANDS.values(), gates.S1_STATE_RMS, gates.S4_STATE_BALANCE], ids=lambda b: b.name)
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


@pytest.fixture(scope="module")
def val_batch(demo_shards):
    import data
    from gt_pipeline.engine.evaluate import spread_windows

    return spread_windows(data.TokenShards(demo_shards).split("validation"), 4, 64)


@pytest.mark.parametrize("name", ["GF-MH", "GPT", "MAMBA2"])
def test_g2_passes_a_correct_init_and_fails_a_broken_one(val_batch, name):
    """G2 on real tokens: a fresh model's loss is ~ln(V) (pass); the same model with its tied embedding/head
    scaled 100x (huge logits, confidently wrong) is far above ln(V) (fail)."""
    import torch

    import models
    from gt_pipeline import checks

    x, y = val_batch
    torch.manual_seed(0)
    model = models.get_model(name, 512, size="demo")
    ok = checks.g2(model, x, y, 512)
    assert ok.verdict is P, ok
    assert abs(ok.detail["init_loss"] - math.log(512)) < 0.02 * math.log(512)
    with torch.no_grad():
        model.tok_emb.weight.mul_(8.0)  # a head ~8x too large: no longer passes
    assert checks.g2(model, x, y, 512).verdict is not P
    with torch.no_grad():
        model.tok_emb.weight.mul_(100.0 / 8.0)
    broken = checks.g2(model, x, y, 512)
    assert broken.verdict is F and broken.value > 0.15, broken
    assert broken.detail["init_loss"] > 2 * math.log(512)


def test_initial_model_is_the_model_training_starts_from():
    """checks.initial_model rebuilds training's init (seeded, on the CPU) without touching the global RNG."""
    import torch

    import models
    from gt_pipeline import checks

    cfg = {"model": "GF-MH", "vocab_size": 512, "size": "demo", "seed": 3, "model_overrides": {}}
    torch.manual_seed(3)
    want = models.get_model("GF-MH", 512, size="demo")
    before = torch.get_rng_state()
    got = checks.initial_model(cfg)
    assert torch.equal(torch.get_rng_state(), before)
    for (n, a), (_, b) in zip(want.state_dict().items(), got.state_dict().items()):
        assert torch.equal(a, b), n
