"""A tiny random-init open_clip model registered in-process, for the CLIP, HPSv2 and CLIP-I tests."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import torch

TINY = "rl-align-tiny-clip"
TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def register_tiny_clip(folder: Path) -> None:
    """Make the model name TINY known to open_clip (its config written into ``folder``)."""
    (folder / f"{TINY}.json").write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(folder / f"{TINY}.json")


def tiny_clip(seed: int) -> torch.nn.Module:
    """A TINY model with weights drawn under ``seed`` (register_tiny_clip first), in eval mode."""
    torch.manual_seed(seed)
    return open_clip.create_model(TINY, pretrained=None, load_weights=False).eval()
