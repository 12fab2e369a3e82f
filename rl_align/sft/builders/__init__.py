"""Builders of supervised warm-start manifests, one module per kind of data: ``diptych`` (MUSAR),
``coco`` (MS-CustomNet), ``synthetic`` (offline coloured shapes). Each writes its images as PNG under its
output folder and a ``manifest.jsonl`` there, whose paths are relative to that folder."""

from rl_align.sft.builders.coco import CocoBuildReport, build_coco_manifest, decode_coco_rle_string, layout_draw_order, segmentation_mask
from rl_align.sft.builders.diptych import another_caption, build_diptych_manifest, diptych_prompt, draw_diptych_pairs
from rl_align.sft.builders.synthetic import SYNTHETIC_CATEGORIES, build_synthetic_manifest

__all__ = [
    "SYNTHETIC_CATEGORIES",
    "CocoBuildReport",
    "another_caption",
    "build_coco_manifest",
    "build_diptych_manifest",
    "build_synthetic_manifest",
    "decode_coco_rle_string",
    "diptych_prompt",
    "draw_diptych_pairs",
    "layout_draw_order",
    "segmentation_mask",
]
