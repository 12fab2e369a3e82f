"""CLIP text-image score (R_text) and HPSv2 (R_aes), both open_clip models loaded from local checkpoints.

Both scores are the plain cosine of L2-normalised image and text features,
    R = <f_img / |f_img|, f_txt / |f_txt|>,
as in MultiCrafter's CLIP-T metric and HPSv2's ``img_score`` (diag of image_features @ text_features.T,
without the logit scale). They differ in weights and preprocessing: CLIP uses open_clip's own eval
transform for the model; HPSv2 (ViT-H-14 + the HPS v2/v2.1 checkpoint) uses hpsv2's eval transform,
which resizes the longest side to the model's input size and pads the rest with black
(``hps_preprocess``). The ``hpsv2`` package itself is not used: it pins protobuf < 4 and downloads at
run time.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from rewards.config import ClipConfig
from rewards.paths import require_path
from rewards.types import ScoreBatch

# OpenAI CLIP's normalisation (open_clip.constants.OPENAI_DATASET_MEAN/STD), which hpsv2 uses.
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def hps_preprocess(image: np.ndarray, size: int) -> torch.Tensor:
    """hpsv2's eval transform (ResizeMaxSize + ToTensor + Normalize): (H, W, 3) uint8 -> (3, size, size).

    The longest side is resized (bicubic) to ``size``, the other to round(side * scale); the result is
    padded with 0 to a square, left/top getting floor(pad / 2); then normalised with OpenAI's mean/std.
    """
    height, width = image.shape[:2]
    scale = size / max(height, width)
    new_h, new_w = round(height * scale), round(width * scale)
    pil = Image.fromarray(image)
    if (new_h, new_w) != (height, width):
        pil = pil.resize((new_w, new_h), Image.BICUBIC)
    canvas = Image.new("RGB", (size, size), (0, 0, 0))
    canvas.paste(pil, ((size - new_w) // 2, (size - new_h) // 2))
    pixels = torch.from_numpy(np.asarray(canvas, dtype=np.float32) / 255.0).permute(2, 0, 1)  # (3, S, S)
    mean = torch.tensor(OPENAI_MEAN).view(3, 1, 1)
    std = torch.tensor(OPENAI_STD).view(3, 1, 1)
    return (pixels - mean) / std


def image_size_of(model: torch.nn.Module) -> int:
    size = model.visual.image_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)


class OpenClipCosineScorer:
    """R[b] = cos(image_b, prompt_b) under an open_clip model; ``preprocess`` maps one uint8 image to a
    (3, S, S) tensor."""

    reads_reference_images = False

    def __init__(
        self,
        name: str,
        model: torch.nn.Module,
        tokenizer: Callable[[list[str]], torch.Tensor],
        preprocess: Callable[[np.ndarray], torch.Tensor],
        device: str = "cpu",
        batch_size: int = 16,
    ):
        self.name = name
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self.device = device
        self.batch_size = batch_size

    @torch.no_grad()
    def score(self, batch: ScoreBatch) -> np.ndarray:
        scores = []
        for start in range(0, len(batch), self.batch_size):
            images = torch.stack([self.preprocess(image) for image in batch.images[start : start + self.batch_size]])
            tokens = self.tokenizer(list(batch.prompts[start : start + self.batch_size]))
            image_features = F.normalize(self.model.encode_image(images.to(self.device)).float(), dim=-1)  # (b, E)
            text_features = F.normalize(self.model.encode_text(tokens.to(self.device)).float(), dim=-1)  # (b, E)
            scores.append((image_features * text_features).sum(-1).double().cpu().numpy())
        return np.concatenate(scores) if scores else np.zeros(0)


class ClipTextScorer(OpenClipCosineScorer):
    @classmethod
    def from_config(cls, cfg: ClipConfig, device: str) -> ClipTextScorer:
        import open_clip

        path = require_path(cfg.checkpoint, "clip.checkpoint", f"an open_clip checkpoint of {cfg.model_name}")
        model, _, transform = open_clip.create_model_and_transforms(cfg.model_name, pretrained=str(path), device=device)
        return cls(
            "text",
            model,
            open_clip.get_tokenizer(cfg.model_name),
            lambda image: transform(Image.fromarray(image)),
            device,
        )


class HpsScorer(OpenClipCosineScorer):
    @classmethod
    def from_config(cls, cfg: ClipConfig, device: str) -> HpsScorer:
        import open_clip

        path = require_path(cfg.checkpoint, "hps.checkpoint", f"an HPS v2 or v2.1 checkpoint for {cfg.model_name}")
        # The architecture alone (no weights, no download), then the HPS weights ({"state_dict": ...},
        # "module." prefixes stripped) through open_clip's checkpoint loader, strictly.
        model = open_clip.create_model(cfg.model_name, pretrained=None, load_weights=False, device="cpu")
        open_clip.load_checkpoint(model, str(path), strict=True)
        size = image_size_of(model)
        return cls(
            "aesthetic",
            model,
            open_clip.get_tokenizer(cfg.model_name),
            lambda image: hps_preprocess(image, size),
            device,
        )
