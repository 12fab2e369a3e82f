"""Building the policy: the tiny preset offline, its tokenizers and latent codec, loading from a local
diffusers folder, and the errors that name what is wrong."""

from __future__ import annotations

import shutil
from pathlib import Path

import open_clip
import pytest
import torch

from policies import AttentionSwitches, FluxPolicy, PolicyConfig, TinyFluxConfig, dice_loss, load_local_components, save_components
from policies.components import PixelShuffleCodec, build_tiny_components, clip_tokenizer_from_open_clip, tiny_t5_tokenizer
from rl_align.core.config import apply_overrides, load_config
from policy_helpers import HEIGHT, WIDTH, conditioning, latents, randomize_adapters, references, tiny_policy

PRESETS = Path(__file__).resolve().parents[1] / "configs" / "policy"


def test_clip_tokenizer_has_open_clip_ids():
    ours = clip_tokenizer_from_open_clip()
    reference = open_clip.tokenizer.SimpleTokenizer()
    for text in ["A photo of a cat, wearing sunglasses!", "two dogs playing in the snow at 5pm"]:
        assert ours(text).input_ids == [49406, *reference.encode(text), 49407]


def test_t5_tokenizer_is_sentencepiece_style():
    tokenizer = tiny_t5_tokenizer(12)
    ids = tokenizer("a dog", padding="max_length", max_length=12).input_ids
    assert ids[4:] == [1] + [0] * 7  # "▁a", "▁d", "o", "g", then "</s>" and <pad>
    assert tokenizer.convert_ids_to_tokens(ids[:4]) == ["▁a", "▁d", "o", "g"]


def test_tiny_codec_is_invertible_and_its_images_follow_the_latents():
    codec = PixelShuffleCodec(scale_factor=2, seed=0)
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 8, 8, generator=generator) * 2 - 1
    torch.testing.assert_close(codec.decode_latents(codec.encode_images(images)), images, rtol=0, atol=1e-6)
    z = torch.randn(1, 12, 4, 4, generator=generator)
    bumped = z.clone()
    bumped[:, :, 1, 2] += 0.5  # one latent cell
    change = (codec.decode_latents(bumped) - codec.decode_latents(z)).abs().sum(dim=1)[0]
    assert change[2:4, 4:6].min() > 0  # its 2x2 pixels move ...
    change[2:4, 4:6] = 0
    assert change.max() == 0  # ... and nothing else
    # the orthogonal mix preserves energy: a latent change of norm r moves the pixels by norm r
    torch.testing.assert_close((codec.decode_latents(bumped) - codec.decode_latents(z)).norm(), torch.tensor(0.5 * 12**0.5))


def test_decoded_policy_images_differ_between_latents():
    policy = tiny_policy()
    a, b = policy.decode_latents(latents(policy, 1, seed=0)), policy.decode_latents(latents(policy, 1, seed=1))
    assert a.shape == (1, 3, HEIGHT, WIDTH) and 0 <= a.min() and a.max() <= 1
    assert (a - b).abs().mean() > 0.1


@pytest.mark.slow
def test_tiny_preset_builds_offline_and_trains_on_cpu():
    policy = FluxPolicy.from_config(PolicyConfig())
    cond, x = conditioning(policy), latents(policy, 2)
    out = policy(x, torch.tensor([0.3, 0.7]), cond)
    assert out.velocity.shape == x.shape and out.velocity.dtype == torch.float32 and torch.isfinite(out.velocity).all()
    out.velocity.pow(2).mean().backward()
    trainable = policy.trainable_parameters()
    assert trainable and all(p.grad is not None for p in trainable)
    assert sum(p.numel() for p in trainable) < sum(p.numel() for p in policy.transformer.parameters())


@pytest.mark.slow
def test_local_folder_round_trip_and_missing_parts(tmp_path):
    tiny = tiny_policy()
    randomize_adapters(tiny)
    folder = tmp_path / "flux"
    save_components(build_tiny_components(tiny.cfg.tiny), folder)  # same seed: the base weights of `tiny`
    loaded = tiny_policy(source="local", path=str(folder))
    randomize_adapters(loaded)
    cond, x, sigma = conditioning(tiny), latents(tiny, 2), torch.tensor([0.3, 0.7])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, sigma, conditioning(loaded)).velocity, tiny(x, sigma, cond).velocity, rtol=0, atol=0)

    shutil.rmtree(folder / "tokenizer_2")
    with pytest.raises(FileNotFoundError) as info:
        load_local_components(folder)
    assert "'tokenizer_2'" in str(info.value) and str(folder / "tokenizer_2") in str(info.value)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_local_components(tmp_path / "nowhere")


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="policy.path"):
        PolicyConfig(source="local")
    with pytest.raises(ValueError, match="axes_dims_rope"):
        TinyFluxConfig(axes_dims_rope=(4, 4, 4))
    policy = tiny_policy()
    embeds = policy.encode_prompts(["a cat"])
    with pytest.raises(ValueError, match="multiple of 4"):
        policy.condition(embeds, references(), 30, 32)
    with pytest.raises(ValueError, match="does not occur"):
        policy.encode_prompts(["a cat"], item_phrases=["a dog"])


@pytest.mark.parametrize("path", sorted(PRESETS.glob("*.yaml")), ids=lambda p: p.stem)
def test_policy_presets_load(path):
    cfg = load_config(PolicyConfig, path)
    assert cfg.source in ("tiny", "local")
    if cfg.source == "local":
        with pytest.raises(FileNotFoundError, match="does not exist"):
            FluxPolicy.from_config(apply_overrides(cfg, ["path=/nonexistent/flux"]))


def test_tiny_preset_yaml_is_the_embedded_default():
    cfg = load_config(PolicyConfig, PRESETS / "tiny.yaml")
    assert cfg == PolicyConfig() and cfg.moe_lora.enabled


def test_mismatched_batches_are_errors():
    policy = tiny_policy()
    with pytest.raises(ValueError, match="conditioning has batch 2 but the latents have batch 3"):
        policy(latents(policy, 3), torch.full((3,), 0.5), conditioning(policy))
    embeds = policy.encode_prompts(["a cat", "a dog"])
    with pytest.raises(ValueError, match="one common size"):
        policy.condition(embeds, references(batch=3), 32, 32)


@pytest.mark.slow
def test_bfloat16_policy_trains_fp32_adapters_close_to_fp32():
    full, half = tiny_policy(), tiny_policy(dtype="bfloat16")
    assert half.transformer.dtype == torch.bfloat16
    assert {p.dtype for p in half.trainable_parameters()} == {torch.float32}
    x, sigma = latents(full, 2), torch.tensor([0.3, 0.7])
    switches = AttentionSwitches(capture=True, temperature=True, static_routing=True)
    expected = full(x, sigma, conditioning(full), switches)
    out = half(x, sigma, conditioning(half), switches)
    assert out.velocity.dtype == torch.float32 and out.attention_maps.dtype == torch.float32
    torch.testing.assert_close(out.velocity, expected.velocity, rtol=0.1, atol=0.05)  # bf16 rounding
    (out.velocity.pow(2).mean() + dice_loss(out.attention_maps, torch.ones_like(out.attention_maps))).backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in half.trainable_parameters())
