"""Calibrated conversion (graphnorm.calibration): a converted trained model computes what the original computes.

References are independent of the code under test: the original model in eval (running statistics), the
original in train mode on the whole data as one batch (data statistics), and outputs recomputed by hand.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn as nn
from conversion_models import EveryForm, SharedBatchNorm, conv_chain
from sklearn.datasets import load_digits

import graphnorm
from graphnorm import GraphnormError, InputStats
from graphnorm.loading import load_model

DIGITS = os.path.join(os.path.dirname(__file__), "..", "fixtures", "digits_cnn.pt")
STATS3 = InputStats([0.3, -0.2, 0.1], [1.0, 0.5, 2.0])
CALIBRATED_FORMS = [("analytic", None), ("reparam", None), ("normprop", None), ("analytic", 8), ("reparam", 8)]


def digits() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return load_model(DIGITS).model.eval(), images, torch.tensor(data.target)


def with_running_statistics(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm (and EveryForm's functional buffers) running statistics far from (0, 1), as a
    trained checkpoint has."""
    generator = torch.Generator().manual_seed(seed)
    for name, buffer in model.named_buffers():
        with torch.no_grad():
            if name.endswith(("running_mean", "f_mean")):
                buffer.copy_(torch.randn(buffer.shape, generator=generator) * 0.7)
            elif name.endswith(("running_var", "f_var")):
                buffer.copy_(0.2 + 3 * torch.rand(buffer.shape, generator=generator))
            elif name.endswith("num_batches_tracked"):
                buffer.fill_(100)
    return model.eval()


def relative_errors(result: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per-sample ``||result - reference|| / ||reference||``."""
    return (result - reference).flatten(1).norm(dim=1) / reference.flatten(1).norm(dim=1)


@pytest.mark.parametrize("spatial", [False, True])
@pytest.mark.parametrize(("mode", "noise"), CALIBRATED_FORMS)
def test_converted_digits_cnn_computes_what_the_original_computes(mode: str, noise: int | None,
                                                                  spatial: bool) -> None:
    """The README's model on the 1797 digits: top-1 agreement 100% and logits within 1e-4 relative."""
    model, images, _ = digits()
    stats = InputStats.from_data(images)
    converted = graphnorm.convert(model, stats, input_shape=(1, 1, 8, 8), mode=mode, stochastic_batch=noise,
                                  spatial=spatial, agreement_samples=0).eval()
    assert converted.graphnorm_log.calibration == "running" and converted.graphnorm_log.calibrated == 2
    with torch.no_grad():
        reference, result = model(images), converted(images)
    assert (result.argmax(1) == reference.argmax(1)).all()
    assert relative_errors(result, reference).max() < 1e-4


@pytest.mark.parametrize(("mode", "noise"), CALIBRATED_FORMS)
@pytest.mark.parametrize("factory", [conv_chain, SharedBatchNorm, EveryForm], ids=["chain", "shared", "every-form"])
def test_calibration_keeps_the_function_of_any_trained_model(factory, mode: str, noise: int | None) -> None:
    model = factory()
    if factory is EveryForm:  # its batch-statistics-only BatchNorm has no eval function to keep
        model.bn_batch_only = nn.Identity()
    model = with_running_statistics(model)
    channels = 2 if factory is EveryForm else 3
    stats = InputStats.standard(channels) if factory is EveryForm else STATS3
    converted = graphnorm.convert(model, stats, input_shape=(1, channels, 8, 8), mode=mode, stochastic_batch=noise,
                                  agreement_samples=0).eval()
    x = stats.sample((6, channels, 8, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        reference = model(x)
        result = converted(x)
    torch.testing.assert_close(result, reference, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["analytic", "reparam", "normprop", "fixed"])
def test_data_calibration_equals_batchnorm_on_the_whole_data_as_one_batch(mode: str) -> None:
    """Calibrated to data, the converted model in eval normalizes every site with the statistics of the data
    at its input: what the original computes in train mode with all the data in one batch."""
    model, images, _ = digits()
    converted = graphnorm.convert(model, InputStats.from_data(images), input_shape=(1, 1, 8, 8), mode=mode,
                                  calibrate="data", data=images, agreement_samples=0).eval()
    assert converted.graphnorm_log.calibration == "data"
    with torch.no_grad():
        reference = copy.deepcopy(model).train()(images)
        result = converted(images)
    assert relative_errors(result, reference).max() < 1e-4


def test_calibration_follows_the_weights_like_batchnorm() -> None:
    """Scaling a conv's weight and bias scales the analytic statistics with it, so a calibrated normalizer
    after it computes the same function (BatchNorm's symmetry, exact as eps -> 0: the normalizers' eps is set
    to 1e-10 here); changing the conv's direction changes it."""
    model = with_running_statistics(conv_chain())
    x = STATS3.sample((4, 3, 8, 8), generator=torch.Generator().manual_seed(4))
    for mode in ("analytic", "reparam", "normprop"):
        converted = graphnorm.convert(model, STATS3, input_shape=(1, 3, 8, 8), mode=mode, eps=1e-10,
                                      agreement_samples=0).eval()
        torch.testing.assert_close(converted(x).detach(), model(x), rtol=1e-4, atol=1e-5)
        before = converted(x).detach()
        layer = converted.get_submodule("3")
        weight = layer.parametrizations.weight.original if mode == "reparam" else (
            layer.layer.weight if mode == "normprop" else layer.weight)
        with torch.no_grad():
            weight.mul_(2.5)
            if mode == "analytic":
                layer.bias.mul_(2.5)
        torch.testing.assert_close(converted(x).detach(), before, rtol=1e-4, atol=1e-5)
        with torch.no_grad():
            weight.add_(0.3 * torch.randn_like(weight))
        assert (converted(x).detach() - before).abs().max() > 1e-2


def test_gradients_of_a_calibrated_model_reach_the_weights_through_the_statistics() -> None:
    torch.manual_seed(0)
    model = with_running_statistics(nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(),
                                                  nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2)).double())
    for mode in ("analytic", "reparam"):
        converted = graphnorm.convert(model, InputStats([0.5, -0.5], [1.0, 2.0]), input_shape=(1, 2, 5, 5),
                                      mode=mode, agreement_samples=0).train()
        assert converted.graphnorm_log.calibrated == 2
        x = torch.randn(3, 2, 5, 5, dtype=torch.float64)
        first = next(p for n, p in converted.named_parameters() if n.startswith("0.") and p.dim() == 4)
        grad = torch.autograd.grad(converted(x).square().sum(), first)[0]
        step, index = 1e-6, (1, 1, 2, 1)
        with torch.no_grad():
            original = first[index].item()
            first[index] = original + step
            up = converted(x).square().sum().item()
            first[index] = original - step
            down = converted(x).square().sum().item()
            first[index] = original
        assert grad[index].item() == pytest.approx((up - down) / (2 * step), rel=1e-5, abs=1e-8)


@pytest.mark.parametrize("spatial", [False, True])
@pytest.mark.parametrize("calibrate", ["none", "auto"])
@pytest.mark.parametrize("training", [False, True])
def test_reparam_equals_analytic_in_every_representation(spatial: bool, calibrate: str, training: bool) -> None:
    """Small images, where zero padding makes per-unit and per-channel statistics differ."""
    model, images, _ = digits()
    stats = InputStats.from_data(images)
    kwargs = {"input_shape": (1, 1, 8, 8), "spatial": spatial, "calibrate": calibrate, "agreement_samples": 0}
    analytic = graphnorm.convert(model, stats, mode="analytic", **kwargs).train(training)
    reparam = graphnorm.convert(model, stats, mode="reparam", **kwargs).train(training)
    with torch.no_grad():
        torch.testing.assert_close(reparam(images[:64]), analytic(images[:64]), rtol=1e-4, atol=1e-4)


def test_auto_calibrates_trained_sites_only() -> None:
    fresh = graphnorm.convert(conv_chain(), STATS3, input_shape=(1, 3, 8, 8), agreement_samples=0)
    assert fresh.graphnorm_log.calibration == "none" and fresh.graphnorm_log.trained_sites == 0
    partly = conv_chain()
    with torch.no_grad():
        partly[4].running_var.fill_(3.0)  # one trained BatchNorm, even without a batch count
    log = graphnorm.convert(partly, STATS3, input_shape=(1, 3, 8, 8), agreement_samples=0).graphnorm_log
    assert log.calibration == "running" and log.trained_sites == 1
    assert [r.calibration for r in log.rewritten] == ["none", "running", "none"]
    assert "1 calibrated to running statistics" in str(log)
    fixed = graphnorm.convert(with_running_statistics(conv_chain()), STATS3, input_shape=(1, 3, 8, 8), mode="fixed",
                              agreement_samples=0)
    assert fixed.graphnorm_log.calibration == "none"  # fixed mode stays the data-free recalibration


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"calibrate": "data"}, "calibrate='data' needs data"),
    ({"calibrate": "running", "mode": "fixed"}, "fixed mode with calibrate='running'"),
    ({"calibrate": "sometimes"}, "calibrate must be one of"),
    ({"calibrate": "data", "data": iter([torch.zeros(2, 3, 8, 8)])}, "not an iterator"),
    ({"agreement_samples": -1}, "agreement_samples must be >= 0"),
])
def test_calibration_errors_say_what_to_do(kwargs, message) -> None:
    with pytest.raises(GraphnormError, match=message):
        graphnorm.convert(conv_chain(), STATS3, input_shape=(1, 3, 8, 8), **kwargs)


def test_running_calibration_needs_running_statistics() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))
    with pytest.raises(GraphnormError, match="BatchNorm 1 has no running statistics"):
        graphnorm.convert(model, STATS3, input_shape=(1, 3, 8, 8), calibrate="running")


def test_agreement_report_matches_a_comparison_by_hand() -> None:
    model, images, labels = digits()
    stats = InputStats.from_data(images)
    converted = graphnorm.convert(model, stats, input_shape=(1, 1, 8, 8), calibrate="none", data=images,
                                  labels=labels)
    agreement = converted.graphnorm_log.agreement
    with torch.no_grad():
        reference, result = model(images), converted.eval()(images)
    errors = relative_errors(result.double(), reference.double())
    assert agreement.samples == 1797 and agreement.source == "data"
    assert agreement.top1 == pytest.approx((result.argmax(1) == reference.argmax(1)).double().mean().item())
    assert agreement.top1 < 0.5  # uncalibrated on real digits: the 29.9%
    assert agreement.median_relative_error == pytest.approx(errors.median().item(), rel=1e-6)
    assert agreement.max_relative_error == pytest.approx(errors.max().item(), rel=1e-6)
    assert agreement.accuracy_original == pytest.approx((reference.argmax(1) == labels).double().mean().item())
    assert agreement.accuracy_converted == pytest.approx((result.argmax(1) == labels).double().mean().item())
    assert agreement.problems(0.99, 0.01) and "agreement with the original" in str(converted.graphnorm_log)


def test_agreement_without_data_samples_the_input_statistics_and_leaves_modes_alone() -> None:
    model = with_running_statistics(conv_chain()).train()
    converted = graphnorm.convert(model, STATS3, input_shape=(1, 3, 8, 8), agreement_samples=10)
    agreement = converted.graphnorm_log.agreement
    assert agreement.samples == 10 and agreement.source == "input statistics"
    assert agreement.top1 == 1.0 and agreement.max_relative_error < 1e-5
    assert model.training and all(m.training for m in model.modules())
    assert converted.training
    skipped = graphnorm.convert(model, STATS3, input_shape=(1, 3, 8, 8), agreement_samples=0)
    assert skipped.graphnorm_log.agreement is None
    assert skipped.graphnorm_log.to_dict()["agreement"] is None


def test_data_calibration_accepts_float64_data_and_a_loader() -> None:
    model, images, _ = digits()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images.double()), batch_size=100)
    from_loader = graphnorm.convert(model, InputStats.from_data(images), input_shape=(1, 1, 8, 8), calibrate="data",
                                    data=loader, agreement_samples=0).eval()
    from_tensor = graphnorm.convert(model, InputStats.from_data(images), input_shape=(1, 1, 8, 8), calibrate="data",
                                    data=images, agreement_samples=0).eval()
    with torch.no_grad():
        torch.testing.assert_close(from_loader(images), from_tensor(images), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["analytic", "reparam", "normprop"])
def test_a_float64_model_is_calibrated_to_float64_precision(mode: str) -> None:
    model = with_running_statistics(conv_chain()).double()
    converted = graphnorm.convert(model, STATS3, input_shape=(1, 3, 8, 8), mode=mode, agreement_samples=0).eval()
    assert all(buffer.dtype == torch.float64 for name, buffer in converted.named_buffers() if "calibration" in name)
    x = STATS3.sample((4, 3, 8, 8), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), model(x), rtol=1e-10, atol=1e-10)


def test_new_input_statistics_adapt_a_converted_model_without_data() -> None:
    """Swapping the input statistics re-normalizes every site for them: uncalibrated, it is the conversion with
    those statistics; calibrated, swapping back gives the original function again."""
    model = with_running_statistics(conv_chain())
    shifted = InputStats([1.3, 0.2, -0.4], [0.5, 1.5, 1.0])
    x = shifted.sample((4, 3, 8, 8), generator=torch.Generator().manual_seed(6))
    direct = graphnorm.convert(model, shifted, input_shape=(1, 3, 8, 8), calibrate="none", agreement_samples=0)
    swapped = graphnorm.convert(model, STATS3, input_shape=(1, 3, 8, 8), calibrate="none", agreement_samples=0)
    swapped.input_stats = shifted
    assert swapped.input_stats is shifted
    torch.testing.assert_close(swapped.eval()(x), direct.eval()(x))
    calibrated = graphnorm.convert(model, STATS3, input_shape=(1, 3, 8, 8), agreement_samples=0).eval()
    calibrated.input_stats = shifted
    assert (calibrated(x) - model(x)).abs().max() > 1e-2
    calibrated.input_stats = STATS3
    torch.testing.assert_close(calibrated(x), model(x), rtol=1e-4, atol=1e-5)
    with pytest.raises(GraphnormError, match="channels"):
        calibrated.input_stats = InputStats.standard(2)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_torchvision_models_with_trained_statistics_keep_their_function(name: str) -> None:
    import torchvision

    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None).train()
    stats = InputStats([0.2] * 3, [0.5] * 3)
    with torch.no_grad():
        for _ in range(2):  # running statistics as training leaves them
            model(stats.sample((8, 3, 32, 32)))
    model.eval()
    x = stats.sample((4, 3, 32, 32), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        reference = model(x)
    for mode in ("analytic", "reparam", "normprop"):
        converted = graphnorm.convert(model, stats, input_shape=(1, 3, 32, 32), mode=mode, agreement_samples=0)
        assert converted.graphnorm_log.calibrated == len(converted.graphnorm_log.rewritten) > 0
        with torch.no_grad():
            assert relative_errors(converted.eval()(x), reference).max() < 1e-4


@pytest.mark.parametrize("mode", ["analytic", "reparam", "normprop"])
def test_calibration_travels_with_copies_and_state_dicts(mode: str) -> None:
    model = with_running_statistics(conv_chain())
    converted = graphnorm.convert(model, STATS3, input_shape=(1, 3, 8, 8), mode=mode, agreement_samples=0).eval()
    fresh = graphnorm.convert(conv_chain(), STATS3, input_shape=(1, 3, 8, 8), mode=mode, calibrate="running",
                              agreement_samples=0).eval()
    fresh.load_state_dict(converted.state_dict())
    x = STATS3.sample((3, 3, 8, 8), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        reference = model(x)
        for copied in (copy.deepcopy(converted), fresh):
            torch.testing.assert_close(copied(x), reference, rtol=1e-4, atol=1e-5)


def test_agreement_check_failures_say_how_to_skip_it() -> None:
    from graphnorm.agreement import compare_outputs

    class BatchOfOneOnly(nn.Module):
        def forward(self, x):
            if x.shape[0] != 1:
                raise RuntimeError("shape '[1, 10]' is invalid for input of size 40")
            return x.flatten(1)

    converted = graphnorm.convert(conv_chain(), STATS3, input_shape=(1, 3, 8, 8), agreement_samples=0)
    with pytest.raises(GraphnormError, match=r"could not run the original model .* agreement_samples=0"):
        compare_outputs(BatchOfOneOnly(), converted, input_shape=(1, 3, 8, 8), stats=STATS3, samples=4)
