"""sd-scripts' noise options and timestep loss weights as pure functions, checked against their definitions."""

from __future__ import annotations

import math

import pytest
import torch

from lorakit.noise import (
    elementwise_loss,
    huber_thresholds,
    input_noise,
    pyramid_noise,
    snr_weights,
    training_noise,
)

SHAPE = (2, 4, 32, 32)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_plain_noise_is_the_generator_s_gaussian():
    latents = torch.zeros(SHAPE)
    torch.testing.assert_close(training_noise(latents, gen()), torch.randn(SHAPE, generator=gen()))


def test_offset_noise_adds_a_constant_per_sample_and_channel():
    latents = torch.zeros(SHAPE)
    g = gen()
    base, per_channel = torch.randn(SHAPE, generator=g), torch.randn((2, 4, 1, 1), generator=g)
    torch.testing.assert_close(training_noise(latents, gen(), offset=0.1), base + 0.1 * per_channel)
    # random strength: one draw of U(0, offset) between the noise and the per-channel constants
    g = gen()
    base, u, per_channel = torch.randn(SHAPE, generator=g), torch.rand((), generator=g), torch.randn((2, 4, 1, 1),
                                                                                                    generator=g)
    got = training_noise(latents, gen(), offset=0.1, offset_random_strength=True)
    torch.testing.assert_close(got, base + 0.1 * float(u) * per_channel)


def test_adaptive_noise_scale_grows_the_offset_with_each_channel_s_mean():
    latents = torch.zeros(SHAPE)
    latents[:, 1] = -2.0  # channel 1 has mean |latent| 2, the others 0
    g = gen()
    base, per_channel = torch.randn(SHAPE, generator=g), torch.randn((2, 4, 1, 1), generator=g)
    got = training_noise(latents, gen(), offset=0.1, adaptive_scale=0.05)
    scale = torch.full((2, 4, 1, 1), 0.1)
    scale[:, 1] += 0.05 * 2.0
    torch.testing.assert_close(got, base + scale * per_channel)
    negative = training_noise(latents, gen(), offset=0.1, adaptive_scale=-1.0)  # clamped at 0: no offset left
    torch.testing.assert_close(negative[:, 1], base[:, 1] + 0.0 * per_channel[:, 1])


def _block_mean_variance(x: torch.Tensor, k: int = 8) -> float:
    return float(torch.nn.functional.avg_pool2d(x, k).var())


def test_pyramid_noise_has_unit_variance_and_much_more_low_frequency_power():
    plain = torch.randn(SHAPE, generator=gen(1))
    pyramid = pyramid_noise(plain, gen(2), iterations=6, discount=0.8)
    assert float(pyramid.std()) == pytest.approx(1.0, abs=1e-5)
    # 8x8 block means of white noise have variance ~1/64; the coarse levels raise it several times (8-19x over
    # 20 seeds at discount 0.8)
    assert _block_mean_variance(pyramid) > 4 * _block_mean_variance(plain)
    assert not torch.equal(plain, pyramid) and torch.equal(plain, torch.randn(SHAPE, generator=gen(1)))  # not in place
    # discount 0: only level 0 (a second full-size draw) is added, then the sum is rescaled
    g = gen(3)
    float(torch.rand((), generator=g))
    fresh = torch.randn(SHAPE, generator=g)
    expected = (plain + fresh) / (plain + fresh).std()
    torch.testing.assert_close(pyramid_noise(plain, gen(3), iterations=4, discount=0.0), expected)
    assert pyramid_noise(plain, gen(4), iterations=100, discount=0.5).shape == SHAPE  # stops at one pixel


def test_multires_comes_after_the_offset_and_is_reproducible():
    latents = torch.zeros(SHAPE)
    a = training_noise(latents, gen(5), offset=0.1, multires_iterations=6, multires_discount=0.3)
    b = training_noise(latents, gen(5), offset=0.1, multires_iterations=6, multires_discount=0.3)
    assert torch.equal(a, b) and float(a.std()) == pytest.approx(1.0, abs=1e-5)
    g = gen(5)
    offset = torch.randn(SHAPE, generator=g) + 0.1 * torch.randn((2, 4, 1, 1), generator=g)
    torch.testing.assert_close(a, pyramid_noise(offset, g, 6, 0.3))


def test_input_perturbation_changes_the_input_noise_only():
    noise = torch.randn(SHAPE, generator=gen(6))
    assert input_noise(noise, gen(), None) is noise and input_noise(noise, gen(), 0.0) is noise
    torch.testing.assert_close(input_noise(noise, gen(7), 0.1), noise + 0.1 * torch.randn(SHAPE, generator=gen(7)))
    g = gen(8)
    u = float(torch.rand((), generator=g))
    expected = noise + 0.1 * u * torch.randn(SHAPE, generator=g)
    torch.testing.assert_close(input_noise(noise, gen(8), 0.1, random_strength=True), expected)


def test_snr_weights_follow_min_snr_and_debiased_estimation():
    snr = torch.tensor([0.01, 1.0, 25.0, math.inf])
    ones = snr_weights(snr, v_prediction=False)
    assert torch.equal(ones, torch.ones(4))
    eps = snr_weights(snr[:3], v_prediction=False, min_snr_gamma=5.0)
    torch.testing.assert_close(eps, torch.tensor([1.0, 1.0, 5 / 25]))
    v = snr_weights(snr[:3], v_prediction=True, min_snr_gamma=5.0)
    torch.testing.assert_close(v, torch.tensor([0.01 / 1.01, 1 / 2, 5 / 26]))
    deb = snr_weights(snr, v_prediction=False, debiased=True)
    torch.testing.assert_close(deb, torch.tensor([10.0, 1.0, 0.2, 1 / math.sqrt(1000)]))  # SNR capped at 1000
    deb_v = snr_weights(snr, v_prediction=True, debiased=True)
    torch.testing.assert_close(deb_v, torch.tensor([1 / 1.01, 0.5, 1 / 26, 1 / 1001]))
    both = snr_weights(snr[:3], v_prediction=False, min_snr_gamma=5.0, debiased=True)
    torch.testing.assert_close(both, eps * deb[:3])


def test_the_loss_weights_read_the_models_snr_before_a_zero_terminal_rescale():
    """`weight_snr` is the SNR of the model's betas, whether the rescale comes from `zero_terminal_snr` or from the
    model's own scheduler config: finite at the last timestep, where the rescaled SNR is 0."""
    from diffusers import DDPMScheduler

    from lorakit.noise import training_schedule, weight_snr

    model = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    a = model.alphas_cumprod
    expected = a / (1 - a)
    rescaled = DDPMScheduler.from_config(model.config, rescale_betas_zero_snr=True)
    for schedule in (model, training_schedule(model, zero_terminal_snr=True), rescaled):
        torch.testing.assert_close(weight_snr(schedule), expected)
    assert rescaled.alphas_cumprod[-1] == 0 and 0.004 < expected[-1] < 0.006
    assert torch.isfinite(snr_weights(weight_snr(rescaled), v_prediction=False, debiased=True)).all()


def test_zero_terminal_snr_schedule_ends_in_pure_noise():
    """Lin et al. 2023: the rescaled schedule has ᾱ_T = 0 (x_T is pure noise), keeps ᾱ_1 and stays decreasing; the
    model's own scheduler (sampling) is not changed; Min-SNR's ε weight at SNR 0 is its limit 1, not 0/0."""
    from diffusers import DDPMScheduler

    from lorakit.noise import training_schedule

    model = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                          prediction_type="v_prediction")
    assert training_schedule(model) is model
    zero = training_schedule(model, zero_terminal_snr=True)
    a, b = zero.alphas_cumprod, model.alphas_cumprod
    assert a[-1] == 0 and b[-1] > 0.004 and math.isclose(a[0], b[0], rel_tol=1e-6)
    assert (a[1:] < a[:-1]).all() and zero.config.prediction_type == "v_prediction"
    x0, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([999, 999])
    torch.testing.assert_close(zero.add_noise(x0, eps, t), eps)
    torch.testing.assert_close(zero.get_velocity(x0, eps, t), -x0)
    snr = a / (1 - a)
    for v in (False, True):
        w = snr_weights(snr[[0, 500, 999]], v_prediction=v, min_snr_gamma=5.0)
        assert torch.isfinite(w).all()
    assert snr_weights(snr[[999]], v_prediction=False, min_snr_gamma=5.0).item() == 1.0
    assert snr_weights(snr[[999]], v_prediction=True, min_snr_gamma=5.0).item() == 0.0


def test_v_prediction_loss_scalings_as_sd_scripts():
    """scale_v_pred_loss_like_noise_pred: × SNR/(SNR + 1); v_pred_like_loss λ: × (1 + λ(SNR + 1)/SNR); the SNR capped at
    1000; both multiply with Min-SNR's weight."""
    snr = torch.tensor([0.25, 1.0, 4.0, math.inf])
    scale = torch.tensor([0.2, 0.5, 0.8, 1000 / 1001])
    torch.testing.assert_close(snr_weights(snr, v_prediction=True, scale_v_like_noise=True), scale)
    torch.testing.assert_close(snr_weights(snr, v_prediction=False, v_pred_like=0.1), 1 + 0.1 / scale)
    both = snr_weights(snr[:3], v_prediction=True, min_snr_gamma=2.0, scale_v_like_noise=True, v_pred_like=0.1)
    min_snr = snr_weights(snr[:3], v_prediction=True, min_snr_gamma=2.0)
    torch.testing.assert_close(both, min_snr * scale[:3] * (1 + 0.1 / scale[:3]))


def test_elementwise_losses_follow_their_formulas():
    pred = torch.tensor([0.0, 0.001, 0.5, 3.0]).view(4, 1, 1, 1)
    target = torch.zeros(4, 1, 1, 1)
    delta = torch.tensor([0.1, 0.1, 0.2, 0.5])
    assert elementwise_loss(pred, target, "l2").flatten().tolist() == pytest.approx([0.0, 1e-6, 0.25, 9.0])
    assert elementwise_loss(pred, target, "l1").flatten().tolist() == pytest.approx([0.0, 0.001, 0.5, 3.0])
    huber = elementwise_loss(pred, target, "huber", delta).flatten().tolist()
    smooth = elementwise_loss(pred, target, "smooth_l1", delta).flatten().tolist()
    for d, c, h, s in zip([0.0, 0.001, 0.5, 3.0], delta.tolist(), huber, smooth):
        assert h == pytest.approx(2 * c * (math.sqrt(d * d + c * c) - c), rel=1e-5, abs=1e-8)
        assert s == pytest.approx(h / c, rel=1e-5, abs=1e-8)
    assert huber[1] == pytest.approx(1e-6, rel=1e-2)  # ≈ the squared error well inside the threshold
    assert huber[3] == pytest.approx(2 * 0.5 * 3.0, rel=0.2)  # ≈ 2δ|x − y| far outside it


def test_huber_thresholds_follow_sd_scripts_schedules():
    alphas_cumprod = torch.linspace(0.999, 0.01, 1000)
    t = torch.tensor([0, 500, 999])
    snr = huber_thresholds("snr", 0.1, 2.0, t, alphas_cumprod, 1000).tolist()  # scale unused, as in sd-scripts
    for ti, got in zip(t.tolist(), snr):
        ac = alphas_cumprod[ti].item()
        assert got == pytest.approx(0.9 / (1 + math.sqrt((1 - ac) / ac)) ** 2 + 0.1, rel=1e-5)
    assert snr[0] > snr[1] > snr[2] > 0.1
    exp = huber_thresholds("exponential", 0.1, 2.0, torch.tensor([0, 500, 1000]), alphas_cumprod, 1000).tolist()
    assert exp == pytest.approx([2.0, 2.0 * 0.1 ** 0.5, 0.2])
    assert huber_thresholds("constant", 0.1, 2.0, t, alphas_cumprod, 1000).tolist() == pytest.approx([0.2] * 3)
