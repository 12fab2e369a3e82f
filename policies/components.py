"""The FLUX parts a policy is made of: transformer, latent codec (VAE) and the two text encoders with
their tokenizers. Built either random-init from the tiny preset (offline, CPU) or from a local diffusers
folder in the FLUX.1-dev / FLUX.1-Kontext-dev layout. Never from a hub id."""

from __future__ import annotations

import gzip
import json
import string
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from transformers import (
    AutoTokenizer,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    PreTrainedTokenizerBase,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

from policies.config import TinyFluxConfig

# Sub-folders of a FLUX.1-dev / FLUX.1-Kontext-dev diffusers folder that the policy needs.
REQUIRED_PARTS = ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")


class PixelShuffleCodec(ModelMixin, ConfigMixin):
    """The tiny preset's latent codec: an exact, invertible map between images and latents.

    encode: x (B, 3, H, W) in [-1, 1] -> pixel_unshuffle by f -> (B, 3 f^2, H/f, W/f) -> mix channels
    with a fixed orthogonal matrix Q: z = Q u. decode inverts it (u = Q^T z, pixel_shuffle). Every pixel
    depends on the latents, so image-space rewards see what the policy changes (a random-init
    AutoencoderKL decoder normalizes its latents away). Same interface as the AutoencoderKL adapter:
    ``encode_images`` / ``decode_latents``, ``scale_factor``, ``latent_channels``.
    """

    @register_to_config
    def __init__(self, scale_factor: int = 2, seed: int = 0):
        super().__init__()
        channels = 3 * scale_factor * scale_factor
        generator = torch.Generator().manual_seed(seed)
        q, r = torch.linalg.qr(torch.randn(channels, channels, generator=generator, dtype=torch.float64))
        q = q * torch.sign(torch.diagonal(r))  # unique QR: a fixed orthogonal matrix for the seed
        self.register_buffer("mixing", q.float())

    @property
    def scale_factor(self) -> int:
        return self.config.scale_factor

    @property
    def latent_channels(self) -> int:
        return self.mixing.shape[0]

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        # images (B, 3, H, W) in [-1, 1] -> latents (B, C, H/f, W/f)
        unshuffled = F.pixel_unshuffle(images.to(self.mixing.dtype), self.scale_factor)
        return torch.einsum("oc,bchw->bohw", self.mixing, unshuffled)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        # latents (B, C, h, w) -> images (B, 3, h f, w f), unclamped
        unmixed = torch.einsum("co,bchw->bohw", self.mixing, latents.to(self.mixing.dtype))
        return F.pixel_shuffle(unmixed, self.scale_factor)


class AutoencoderKLCodec(torch.nn.Module):
    """FLUX's AutoencoderKL behind the codec interface: z = (mode(E(x)) - shift) * scale (the posterior
    mode, so encoding is deterministic) and x = D(z / scale + shift)."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae

    @property
    def scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return self.vae.config.latent_channels

    def _shift(self) -> float:
        return self.vae.config.shift_factor or 0.0

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        posterior = self.vae.encode(images.to(self.vae.dtype)).latent_dist
        return (posterior.mode() - self._shift()) * self.vae.config.scaling_factor

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        latents = latents.to(self.vae.dtype) / self.vae.config.scaling_factor + self._shift()
        return self.vae.decode(latents).sample

    def save_pretrained(self, folder: str | Path) -> None:
        self.vae.save_pretrained(folder)


LatentCodec = PixelShuffleCodec | AutoencoderKLCodec


@dataclass
class FluxComponents:
    transformer: FluxTransformer2DModel
    codec: LatentCodec
    text_encoder: CLIPTextModel  # pooled prompt embedding
    tokenizer: PreTrainedTokenizerBase
    text_encoder_2: T5EncoderModel  # per-token prompt embeddings
    tokenizer_2: PreTrainedTokenizerBase
    t5_max_length: int


# ---- offline tokenizers ---------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable-unicode table (as in open_clip.tokenizer)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def clip_tokenizer_from_open_clip(max_length: int = 77) -> CLIPTokenizer:
    """A transformers CLIPTokenizer seeded from open_clip's bundled BPE vocab (same ids as open_clip's
    SimpleTokenizer and as openai/clip-vit-large-patch14): 256 byte symbols, their '</w>' forms, the
    48894 merges, then <|startoftext|> (49406) and <|endoftext|> (49407)."""
    import open_clip.tokenizer

    with gzip.open(open_clip.tokenizer.default_bpe()) as handle:
        lines = handle.read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    symbols = list(_bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(vocab_list)}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def tiny_t5_tokenizer(max_length: int) -> T5Tokenizer:
    """A T5-style (SentencePiece Unigram) tokenizer built in memory: <pad>=0, </s>=1, <unk>=2, then word
    pieces for lowercase letters, digits and punctuation, with and without the '▁' word-start marker.
    Words are spelled letter by letter, which is all a random-init tiny encoder needs."""
    specials = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    characters = string.ascii_letters + string.digits + string.punctuation
    pieces = [("▁" + c, -3.0) for c in characters] + [(c, -4.0) for c in characters]
    return T5Tokenizer(vocab=specials + pieces, extra_ids=0, model_max_length=max_length)


# ---- building ---------------------------------------------------------------------------------------------


def build_tiny_components(cfg: TinyFluxConfig) -> FluxComponents:
    """Random-init FLUX-shaped parts under ``cfg.seed`` (offline, CPU, fp32). The global RNG is left
    as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return _build_tiny_components(cfg)


def _build_tiny_components(cfg: TinyFluxConfig) -> FluxComponents:
    codec = PixelShuffleCodec(scale_factor=cfg.vae_scale_factor, seed=cfg.seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * codec.latent_channels,  # 2x2 packed latents
        num_layers=cfg.num_layers,
        num_single_layers=cfg.num_single_layers,
        attention_head_dim=cfg.attention_head_dim,
        num_attention_heads=cfg.num_attention_heads,
        joint_attention_dim=cfg.joint_attention_dim,
        pooled_projection_dim=cfg.pooled_projection_dim,
        guidance_embeds=cfg.guidance_embeds,
        axes_dims_rope=tuple(cfg.axes_dims_rope),
    )
    tokenizer = clip_tokenizer_from_open_clip(cfg.clip_max_length)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=cfg.pooled_projection_dim,
            intermediate_size=2 * cfg.pooled_projection_dim,
            num_hidden_layers=cfg.text_layers,
            num_attention_heads=2,
            max_position_embeddings=cfg.clip_max_length,
            projection_dim=cfg.pooled_projection_dim,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    tokenizer_2 = tiny_t5_tokenizer(cfg.t5_max_length)
    text_encoder_2 = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer_2),
            d_model=cfg.joint_attention_dim,
            d_kv=cfg.joint_attention_dim // 2,
            d_ff=2 * cfg.joint_attention_dim,
            num_layers=cfg.text_layers,
            num_heads=2,
            pad_token_id=tokenizer_2.pad_token_id,
            eos_token_id=tokenizer_2.eos_token_id,
            decoder_start_token_id=tokenizer_2.pad_token_id,
        )
    )
    return FluxComponents(
        transformer=transformer.eval(),
        codec=codec.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2.eval(),
        tokenizer_2=tokenizer_2,
        t5_max_length=cfg.t5_max_length,
    )


def _require_part(folder: Path, part: str) -> Path:
    path = folder / part
    if not path.is_dir():
        present = sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
        raise FileNotFoundError(
            f"local FLUX folder {folder} has no '{part}' part (expected the folder {path}); a FLUX.1-dev or "
            f"FLUX.1-Kontext-dev diffusers folder holds {', '.join(REQUIRED_PARTS)}; found: {present or 'nothing'}"
        )
    return path


def load_local_components(folder: str | Path, t5_max_length: int = 512, dtype: torch.dtype = torch.float32) -> FluxComponents:
    """Load the parts from a local diffusers folder (no network) in ``dtype``. A missing part is an
    error naming it and its path."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"local FLUX folder {folder} does not exist (policy.path)")
    paths = {part: _require_part(folder, part) for part in REQUIRED_PARTS}
    vae_config_file = paths["vae"] / "config.json"
    if not vae_config_file.is_file():
        raise FileNotFoundError(f"local FLUX folder {folder}: the vae part has no config.json ({vae_config_file})")
    vae_class = json.loads(vae_config_file.read_text()).get("_class_name")
    if vae_class == PixelShuffleCodec.__name__:
        codec: LatentCodec = PixelShuffleCodec.from_pretrained(paths["vae"], local_files_only=True)  # exact map: fp32
    elif vae_class == "AutoencoderKL":
        codec = AutoencoderKLCodec(AutoencoderKL.from_pretrained(paths["vae"], local_files_only=True, torch_dtype=dtype))
    else:
        raise ValueError(f"{vae_config_file}: unsupported vae class {vae_class!r} (AutoencoderKL expected)")
    tokenizer_2 = AutoTokenizer.from_pretrained(paths["tokenizer_2"], local_files_only=True)
    return FluxComponents(
        transformer=FluxTransformer2DModel.from_pretrained(paths["transformer"], local_files_only=True, torch_dtype=dtype).eval(),
        codec=codec.eval(),
        text_encoder=CLIPTextModel.from_pretrained(paths["text_encoder"], local_files_only=True, dtype=dtype).eval(),
        tokenizer=AutoTokenizer.from_pretrained(paths["tokenizer"], local_files_only=True),
        text_encoder_2=T5EncoderModel.from_pretrained(paths["text_encoder_2"], local_files_only=True, dtype=dtype).eval(),
        tokenizer_2=tokenizer_2,
        t5_max_length=min(t5_max_length, tokenizer_2.model_max_length),
    )


def save_components(components: FluxComponents, folder: str | Path) -> None:
    """Write the parts in the FLUX.1-dev diffusers layout (plus the scheduler, so diffusers can read it)."""
    folder = Path(folder)
    components.transformer.save_pretrained(folder / "transformer")
    components.codec.save_pretrained(folder / "vae")
    components.text_encoder.save_pretrained(folder / "text_encoder")
    components.tokenizer.save_pretrained(folder / "tokenizer")
    components.text_encoder_2.save_pretrained(folder / "text_encoder_2")
    components.tokenizer_2.save_pretrained(folder / "tokenizer_2")
    FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True).save_pretrained(folder / "scheduler")
