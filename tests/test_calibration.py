"""Calibration: the fitted temperature undoes a known over-confidence, and ECE measures it."""

from __future__ import annotations

import torch

from learner.calibration import calibration_report, expected_calibration_error, fit_temperature


def _calibrated_sample(n: int = 4000, classes: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    # Labels drawn from softmax(logits): these logits are calibrated by construction.
    generator = torch.Generator().manual_seed(7)
    logits = torch.randn(n, classes, generator=generator) * 2.5
    targets = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator).squeeze(1)
    return logits, targets


def test_temperature_recovers_a_known_overconfidence() -> None:
    logits, targets = _calibrated_sample()
    fitted = fit_temperature(logits * 3.0, targets)  # a model three times too sure of itself
    assert 2.6 < fitted < 3.4


def test_ece_is_small_when_calibrated_and_large_when_not() -> None:
    logits, targets = _calibrated_sample()
    assert expected_calibration_error(torch.softmax(logits, -1), targets) < 0.03
    assert expected_calibration_error(torch.softmax(logits * 3.0, -1), targets) > 0.1


def test_report_shows_scaling_lowers_ece_and_keeps_predictions() -> None:
    logits, targets = _calibrated_sample()
    sharp = logits * 3.0
    report = calibration_report(sharp, targets, fit_temperature(sharp, targets))
    assert report["ece"] < 0.03 < report["ece_uncalibrated"]
    assert report["n"] == len(targets)
    assert torch.equal((sharp / 3.0).argmax(-1), sharp.argmax(-1))  # scaling never changes a prediction
