"""graphopt.outliers: the per-layer outlier report (max over median channel, kurtosis, LLM.int8() channels)."""

import torch
from quant_models import block, tokens

import graphopt


def test_the_outlier_channel_tops_the_report():
    report = graphopt.outliers.outlier_report(block(outlier=80.0), (tokens(),), calibration=[(tokens(seed=1),)])
    worst = report.layers[0]
    assert worst.layer == "fc1" and worst.outlier_channels == [7] and worst.max_over_median > 20 and worst.kurtosis > 20
    assert worst.tokens == 2 * 4 * 32
    assert {layer.layer for layer in report.layers} == {"fc1", "fc2", "head"}
    text = str(report)
    assert "max/median channel" in text and "fc1" in text.splitlines()[2]
    assert report.to_dict()["layers"][0]["outlier_channels"] == [7]


def test_a_gaussian_input_has_no_outliers():
    report = graphopt.outliers.outlier_report(torch.nn.Linear(64, 8).eval(), (torch.randn(512, 64),), threshold=6.0)
    (layer,) = report.layers
    assert layer.outlier_channels == [] and 2.0 < layer.kurtosis < 4.0 and layer.max_over_median < 2.0
