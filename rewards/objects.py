"""Object subjects of the ``id`` component (MultiCrafter Sec. 4.4): each reference's caption is grounded
in the generated image by Florence-2 (<CAPTION_TO_PHRASE_GROUNDING>) -> boxes; SAM2 turns each box into
a mask; DINOv2 embeds the masked crop; the cosine against the reference's DINOv2 embedding fills C, and
the Hungarian rule of ``rewards.matching`` scores it.

The boxes found for all of an image's captions form one candidate pool, so an object grounded by two
captions can still match only one reference; near-identical boxes (IoU >= ``dedupe_iou``) are merged so
that one object does not enter the pool twice. All three models load with transformers from local
folders (``save_pretrained`` layout).
"""

from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np
import torch
from PIL import Image

from rewards.config import ObjectConfig
from rewards.matching import cosine_similarity_matrix
from rewards.paths import require_path
from rewards.types import ReferenceSubject

GROUNDING_TASK = "<CAPTION_TO_PHRASE_GROUNDING>"


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU[i, j] of (x0, y0, x1, y1) boxes a (N, 4) and b (M, 4) -> (N, M); empty boxes give 0."""
    x0 = np.maximum(a[:, None, 0], b[None, :, 0])
    y0 = np.maximum(a[:, None, 1], b[None, :, 1])
    x1 = np.minimum(a[:, None, 2], b[None, :, 2])
    y1 = np.minimum(a[:, None, 3], b[None, :, 3])
    intersection = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)  # (N, M)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - intersection
    return np.where(union > 0, intersection / np.where(union > 0, union, 1.0), 0.0)


def dedupe_boxes(boxes: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Indices of the boxes kept, in order: a box is dropped if its IoU with an earlier kept box is
    >= ``iou_threshold``. boxes: (K, 4)."""
    kept: list[int] = []
    for k in range(len(boxes)):
        if not kept or box_iou(boxes[k : k + 1], boxes[kept]).max() < iou_threshold:
            kept.append(k)
    return np.asarray(kept, dtype=np.int64)


def crop_box(image: np.ndarray, box: np.ndarray) -> np.ndarray:
    """The pixels of ``image`` (H, W, ...) inside box (x0, y0, x1, y1), x1 and y1 exclusive, the box rounded
    outwards to whole pixels and clipped to the image; at least 1 x 1. A view, not a copy."""
    height, width = image.shape[:2]
    x0 = int(np.clip(np.floor(box[0]), 0, width - 1))
    y0 = int(np.clip(np.floor(box[1]), 0, height - 1))
    x1 = int(np.clip(np.ceil(box[2]), x0 + 1, width))
    y1 = int(np.clip(np.ceil(box[3]), y0 + 1, height))
    return image[y0:y1, x0:x1]


def masked_crop(image: np.ndarray, box: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The box's region of ``image`` with every pixel outside ``mask`` set to black, so DINOv2 sees the
    segmented object, not its surroundings. image (H, W, 3) uint8, box (4,) x0 y0 x1 y1, mask (H, W)
    bool -> (h, w, 3) uint8 with h, w >= 1."""
    crop = crop_box(image, box).copy()
    crop[~crop_box(mask, box)] = 0
    return crop


class Grounder(Protocol):
    def ground(self, image: np.ndarray, captions: Sequence[str]) -> np.ndarray:
        """All boxes (K, 4), x0 y0 x1 y1 in pixels, found for the captions in the image."""
        ...


class FlorenceGrounder:
    def __init__(self, model: torch.nn.Module, processor, device: str = "cpu", max_new_tokens: int = 64):
        self.model = model.to(device).eval()
        self.processor = processor
        self.device = device
        self.max_new_tokens = max_new_tokens

    @classmethod
    def from_dir(cls, folder: str, device: str, max_new_tokens: int) -> FlorenceGrounder:
        from transformers import Florence2ForConditionalGeneration, Florence2Processor

        path = require_path(
            folder,
            "object.florence_dir",
            "a Florence-2 model and processor (transformers save_pretrained layout)",
            is_dir=True,
        )
        model = Florence2ForConditionalGeneration.from_pretrained(path, local_files_only=True)
        processor = Florence2Processor.from_pretrained(path, local_files_only=True)
        return cls(model, processor, device, max_new_tokens)

    def boxes_from_text(self, text: str, width: int, height: int) -> np.ndarray:
        """Florence-2's generated text (``phrase<loc_x0><loc_y0><loc_x1><loc_y1>...``) -> (K, 4) pixel boxes."""
        parsed = self.processor.post_process_generation(text=text, task=GROUNDING_TASK, image_size=(width, height))
        boxes = np.asarray(parsed[GROUNDING_TASK]["bboxes"], dtype=np.float64).reshape(-1, 4)
        return np.clip(boxes, 0, [width, height, width, height])

    @torch.no_grad()
    def ground(self, image: np.ndarray, captions: Sequence[str]) -> np.ndarray:
        if not captions:
            return np.zeros((0, 4))
        pil = Image.fromarray(image)
        inputs = self.processor(
            text=[GROUNDING_TASK + caption for caption in captions],
            images=[pil] * len(captions),
            return_tensors="pt",
            padding=True,
        ).to(self.device)
        generated = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False, num_beams=1)
        texts = self.processor.batch_decode(generated, skip_special_tokens=False)
        height, width = image.shape[:2]
        return np.concatenate([self.boxes_from_text(text, width, height) for text in texts])


class Sam2BoxSegmenter:
    def __init__(self, model: torch.nn.Module, processor, device: str = "cpu"):
        self.model = model.to(device).eval()
        self.processor = processor
        self.device = device

    @classmethod
    def from_dir(cls, folder: str, device: str) -> Sam2BoxSegmenter:
        from transformers import Sam2Model, Sam2Processor

        path = require_path(
            folder, "object.sam2_dir", "a SAM2 model and processor (transformers save_pretrained layout)", is_dir=True
        )
        return cls(
            Sam2Model.from_pretrained(path, local_files_only=True),
            Sam2Processor.from_pretrained(path, local_files_only=True),
            device,
        )

    @torch.no_grad()
    def masks(self, image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """One mask per box prompt: boxes (K, 4) -> (K, H, W) bool."""
        if len(boxes) == 0:
            return np.zeros((0, *image.shape[:2]), dtype=bool)
        inputs = self.processor(images=Image.fromarray(image), input_boxes=[boxes.tolist()], return_tensors="pt").to(
            self.device
        )
        outputs = self.model(**inputs, multimask_output=False)
        masks = self.processor.post_process_masks(outputs.pred_masks.cpu(), inputs["original_sizes"].cpu())[
            0
        ]  # (K, 1, H, W)
        return masks[:, 0].numpy().astype(bool)


class Dinov2Embedder:
    def __init__(self, model: torch.nn.Module, image_processor, device: str = "cpu"):
        self.model = model.to(device).eval()
        self.image_processor = image_processor
        self.device = device

    @classmethod
    def from_dir(cls, folder: str, device: str) -> Dinov2Embedder:
        from transformers import AutoImageProcessor, Dinov2Model

        path = require_path(
            folder,
            "object.dinov2_dir",
            "a DINOv2 model and image processor (transformers save_pretrained layout)",
            is_dir=True,
        )
        return cls(
            Dinov2Model.from_pretrained(path, local_files_only=True),
            AutoImageProcessor.from_pretrained(path, local_files_only=True),
            device,
        )

    @torch.no_grad()
    def embed(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """(N,) uint8 images -> (N, D) DINOv2 global embeddings (the layer-normed CLS token)."""
        pixels = self.image_processor(images=[Image.fromarray(im) for im in images], return_tensors="pt")[
            "pixel_values"
        ]
        return self.model(pixel_values=pixels.to(self.device)).pooler_output.double().cpu().numpy()


class ObjectEmbedder:
    kind = "object"

    def __init__(
        self, grounder: Grounder, segmenter: Sam2BoxSegmenter, embedder: Dinov2Embedder, dedupe_iou: float = 0.9
    ):
        self.grounder = grounder
        self.segmenter = segmenter
        self.embedder = embedder
        self.dedupe_iou = dedupe_iou

    @classmethod
    def from_config(cls, cfg: ObjectConfig, device: str) -> ObjectEmbedder:
        return cls(
            FlorenceGrounder.from_dir(cfg.florence_dir, device, cfg.max_new_tokens),
            Sam2BoxSegmenter.from_dir(cfg.sam2_dir, device),
            Dinov2Embedder.from_dir(cfg.dinov2_dir, device),
            cfg.dedupe_iou,
        )

    def embed_reference(self, subject: ReferenceSubject, where: str) -> np.ndarray:
        return self.embedder.embed([subject.image])[0]

    def embed_candidates(self, image: np.ndarray, captions: Sequence[str]) -> np.ndarray:
        boxes = self.grounder.ground(image, captions)
        boxes = boxes[dedupe_boxes(boxes, self.dedupe_iou)] if len(boxes) else boxes
        if len(boxes) == 0:
            return np.zeros((0, 1))
        masks = self.segmenter.masks(image, boxes)  # (K, H, W)
        return self.embedder.embed([masked_crop(image, box, mask) for box, mask in zip(boxes, masks)])

    def similarity(self, refs: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        return cosine_similarity_matrix(refs, candidates)
