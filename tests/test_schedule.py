"""Schedules equal diffusers' FlowMatchEulerDiscreteScheduler for the same settings."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift as diffusers_calculate_shift

from samplers import SamplerConfig, calculate_shift, compress_schedule, flux_sigmas


@pytest.mark.parametrize("image_seq_len", [64, 256, 1024, 4096, 6000])
def test_calculate_shift_matches_diffusers(image_seq_len):
    assert calculate_shift(image_seq_len) == pytest.approx(diffusers_calculate_shift(image_seq_len), abs=1e-12)


@pytest.mark.parametrize("num_steps", [1, 4, 16, 28, 50])
@pytest.mark.parametrize("image_seq_len", [16, 256, 1024, 4096])
def test_dynamic_shift_sigmas_match_diffusers(num_steps, image_seq_len):
    # The scheduler config FLUX.1-dev ships with.
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096
    )
    grid = np.linspace(1.0, 1 / num_steps, num_steps)  # what FluxPipeline passes
    scheduler.set_timesteps(sigmas=grid, mu=diffusers_calculate_shift(image_seq_len))
    ours = flux_sigmas(num_steps, image_seq_len)
    assert ours.dtype == torch.float32 and ours.shape == (num_steps + 1,)
    torch.testing.assert_close(ours, scheduler.sigmas, rtol=0, atol=1e-7)
    assert ours[0] == 1.0 and ours[-1] == 0.0 and torch.all(ours[1:] < ours[:-1])


@pytest.mark.parametrize("shift", [1.0, 3.0, 0.5])
@pytest.mark.parametrize("num_steps", [8, 16])
def test_static_shift_sigmas_match_diffusers(shift, num_steps):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps))
    torch.testing.assert_close(flux_sigmas(num_steps, shift=shift), scheduler.sigmas, rtol=0, atol=1e-7)


def test_larger_images_get_noisier_schedules():
    small, large = flux_sigmas(16, 256), flux_sigmas(16, 4096)
    assert torch.all(large[1:-1] > small[1:-1])


def test_sampler_config_chooses_the_schedule():
    assert torch.equal(SamplerConfig().sigmas(1024), flux_sigmas(16, 1024))
    assert torch.equal(SamplerConfig(time_shift="static", static_shift=2.0).sigmas(1024), flux_sigmas(16, shift=2.0))
    assert torch.equal(SamplerConfig(time_shift="none", num_steps=4).sigmas(1024), flux_sigmas(4))


def test_compress_schedule_keeps_ends_and_fraction():
    sigmas = flux_sigmas(16, 1024)
    tail = sigmas[6:]  # 10 steps
    half = compress_schedule(tail, 0.5)
    assert half.numel() - 1 == 5
    assert half[0] == tail[0] and half[-1] == 0.0 and torch.all(half[1:] < half[:-1])
    assert torch.equal(compress_schedule(tail, 1.0), tail)
    assert compress_schedule(tail, 0.01).numel() == 2  # never fewer than one step
    with pytest.raises(ValueError, match="keep_fraction"):
        compress_schedule(tail, 0.0)


def test_bad_schedule_arguments():
    with pytest.raises(ValueError, match="num_steps"):
        flux_sigmas(0)
    with pytest.raises(ValueError, match="not both"):
        flux_sigmas(4, 256, shift=3.0)
