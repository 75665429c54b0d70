"""A perfect denoiser under zstudio.demo.flow's convention, run through diffusers' own sampling loop, lands on x0."""

import torch
from diffusers import ZImagePipeline

from zstudio.demo.flow import model_time, noisy_latents, velocity_target


def sample_with_oracle(tiny_dir, sign: float = 1.0):
    """Run the real pipeline with a transformer that knows the clean latents; returns (final, clean, times seen)."""
    pipe = ZImagePipeline.from_pretrained(tiny_dir, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    clean = torch.randn(1, 16, 32, 32, generator=torch.Generator().manual_seed(0))  # what the image encodes to
    start = torch.randn(1, 16, 32, 32, generator=torch.Generator().manual_seed(1))
    seen_times = []

    def oracle(latents, t, captions, return_dict=False, **kwargs):
        x_t = torch.stack([x.squeeze(1) for x in latents])
        sigma = 1 - t  # invert model_time
        seen_times.append(float(t[0]))
        sigma_b = sigma.view(-1, 1, 1, 1)
        noise = (x_t - (1 - sigma_b) * clean) / sigma_b  # the noise that, under our convention, made x_t
        assert torch.allclose(noisy_latents(clean, noise, sigma), x_t, atol=1e-5)
        return ([o.unsqueeze(1) for o in sign * velocity_target(clean, noise)],)

    pipe.transformer.forward = oracle
    final = pipe(prompt="a red circle", width=256, height=256, num_inference_steps=9, guidance_scale=0.0,
                 latents=start.clone(), output_type="latent").images  # fmt: skip
    return final, clean, seen_times


def test_perfect_denoiser_reconstructs_the_clean_latents(tiny_dir):
    final, clean, seen_times = sample_with_oracle(tiny_dir)
    torch.testing.assert_close(final, clean, rtol=1e-4, atol=1e-4)
    assert seen_times[0] == float(model_time(torch.tensor(1.0)))  # starts at pure noise, t = 0
    assert seen_times == sorted(seen_times)  # t grows towards the clean end


def test_wrong_sign_would_not_reconstruct(tiny_dir):
    """The same loop with the opposite target diverges: the test above can tell conventions apart."""
    final, clean, _ = sample_with_oracle(tiny_dir, sign=-1.0)
    assert (final - clean).abs().max() > 1.0
