"""Subject fidelity on located crops: MultiCrafter's CLIP-I and DINO-I (Sec. 5.1, Table 1).

"In order to accurately calculate CLIP-I and DINO-I, we first use a face detector or Florence-2 to
accurately locate the position of subjects in the generated image, and then calculate them." So for each
image and each subject kind:
- a locator finds candidate boxes (faces: the face detector; objects: Florence-2 grounding with the
  references' captions, or the weight-free shape locator), and each box is cropped;
- each reference is cropped the same way (a face reference to its main face, an object reference whole);
- an image embedder (CLIP's or DINOv2's image tower) embeds the crops, C[i, j] = cosine(reference i,
  crop j), and the Hungarian rule of Eq. 10 (``rewards.matching``) matches them one to one;
- score = (sum over kinds of the matched similarity) / N_ref: a subject that is not found counts 0.
Locating is done once per image and shared by every metric (``locate_batch``).
"""

from __future__ import annotations

from typing import NamedTuple, Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from rewards.matching import cosine_similarity_matrix, matched_similarity_sum
from rewards.objects import crop_box, dedupe_boxes
from rewards.types import InputError, ReferenceSubject, ScoreBatch


class SubjectLocator(Protocol):
    """Finds the subjects of one kind."""

    kind: str

    def locate(self, image: np.ndarray, captions: Sequence[str]) -> np.ndarray:
        """(K, 4) boxes x0 y0 x1 y1 in pixels of the candidate subjects in a generated image (K may be 0)."""
        ...

    def reference_crop(self, subject: ReferenceSubject, where: str) -> np.ndarray:
        """The part of a reference image that is its subject; InputError naming ``where`` if none is found."""
        ...


class ImageEmbedder(Protocol):
    def embed(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """(N,) uint8 images -> (N, D) embeddings."""
        ...


class LocatedImage(NamedTuple):
    """One generated image's subjects, per kind: the reference crops (in reference order) and the crops
    of the candidates the locator found."""

    references: dict[str, list[np.ndarray]]
    candidates: dict[str, list[np.ndarray]]

    @property
    def reference_count(self) -> int:
        return sum(len(crops) for crops in self.references.values())

    def subjects_found(self) -> int:
        """References that have a located candidate to be matched with: sum over kinds of
        min(references, candidates), the most a one-to-one matching can pair."""
        return sum(min(len(crops), len(self.candidates[kind])) for kind, crops in self.references.items())


def locate_batch(batch: ScoreBatch, locators: Sequence[SubjectLocator]) -> list[LocatedImage]:
    """Every image's reference and candidate crops; a reference kind without a locator is an InputError.
    A reference shared by several images (the K images of a task) is located once and its crop shared."""
    by_kind = {locator.kind: locator for locator in locators}
    reference_crops: dict[tuple[str, str], np.ndarray] = {}
    located = []
    for i, (image, subjects) in enumerate(zip(batch.images, batch.references)):
        references: dict[str, list[np.ndarray]] = {}
        for j, subject in enumerate(subjects):
            if subject.kind not in by_kind:
                raise InputError(f"references[{i}][{j}].kind", f"{subject.kind!r} subjects cannot be located here (locators: {', '.join(by_kind)})")
            key = subject.content_key()
            if key not in reference_crops:
                reference_crops[key] = by_kind[subject.kind].reference_crop(subject, f"references[{i}][{j}]")
            references.setdefault(subject.kind, []).append(reference_crops[key])
        candidates = {}
        for kind in references:
            captions = [s.caption for s in subjects if s.kind == kind]
            candidates[kind] = [crop_box(image, box) for box in by_kind[kind].locate(image, captions)]
        located.append(LocatedImage(references, candidates))
    return located


def crop_similarity(located: Sequence[LocatedImage], embedder: ImageEmbedder) -> np.ndarray:
    """(B,) CLIP-I or DINO-I: per image, sum over kinds of the Hungarian-matched cosine of reference and
    candidate crops, divided by the number of references; an image without references scores NaN (the
    metric does not apply). Reference crops shared by several images (``locate_batch``) are embedded once."""
    embedded: dict[int, np.ndarray] = {}  # id of a shared reference crop -> (D,)

    def embed_references(crops: list[np.ndarray]) -> np.ndarray:
        missing = [crop for crop in crops if id(crop) not in embedded]
        if missing:
            embedded.update(zip(map(id, missing), embedder.embed(missing)))
        return np.stack([embedded[id(crop)] for crop in crops])

    scores = np.full(len(located), np.nan)
    for b, image in enumerate(located):
        if not image.reference_count:
            continue
        matched = 0.0
        for kind, reference_crops in image.references.items():
            candidate_crops = image.candidates[kind]
            if not candidate_crops:
                continue
            refs = embed_references(reference_crops)  # (N_kind, D)
            gens = embedder.embed(candidate_crops)  # (M, D)
            matched += matched_similarity_sum(cosine_similarity_matrix(refs, gens))
        scores[b] = matched / image.reference_count
    return scores


class ClipImageEmbedder:
    """An open_clip model's image tower with its eval transform: the CLIP-I embedder."""

    def __init__(self, model: torch.nn.Module, preprocess, device: str = "cpu"):
        self.model = model.to(device).eval()
        self.preprocess = preprocess
        self.device = device

    @classmethod
    def from_checkpoint(cls, model_name: str, checkpoint: str, device: str, key: str = "clip.checkpoint") -> ClipImageEmbedder:
        import open_clip

        from rewards.paths import require_path

        path = require_path(checkpoint, key, f"an open_clip checkpoint of {model_name}")
        model, _, transform = open_clip.create_model_and_transforms(model_name, pretrained=str(path), device=device)
        return cls(model, transform, device)

    @torch.no_grad()
    def embed(self, images: Sequence[np.ndarray]) -> np.ndarray:
        pixels = torch.stack([self.preprocess(Image.fromarray(np.ascontiguousarray(image))) for image in images])
        return F.normalize(self.model.encode_image(pixels.to(self.device)).float(), dim=-1).double().cpu().numpy()


class FaceLocator:
    """Faces located by a face backend's detector (``rewards.faces``); a reference's subject is its main face."""

    kind = "face"

    def __init__(self, faces):
        self.faces = faces  # a rewards.faces embedder: detect_and_embed(image) -> DetectedFaces

    def locate(self, image: np.ndarray, captions: Sequence[str]) -> np.ndarray:
        return self.faces.detect_and_embed(image).boxes

    def reference_crop(self, subject: ReferenceSubject, where: str) -> np.ndarray:
        from rewards.faces import main_face

        detected = self.faces.detect_and_embed(subject.image)
        if len(detected.boxes) == 0:
            raise InputError(f"{where}.image", "no face detected in the reference image")
        return crop_box(subject.image, detected.boxes[main_face(detected)])


class GroundingLocator:
    """Objects located by phrase grounding of the references' captions (Florence-2), near-identical boxes
    merged as in the object reward; an object reference is its whole image."""

    kind = "object"

    def __init__(self, grounder, dedupe_iou: float = 0.9):
        self.grounder, self.dedupe_iou = grounder, dedupe_iou

    def locate(self, image: np.ndarray, captions: Sequence[str]) -> np.ndarray:
        boxes = self.grounder.ground(image, captions)
        return boxes[dedupe_boxes(boxes, self.dedupe_iou)] if len(boxes) else boxes.reshape(0, 4)

    def reference_crop(self, subject: ReferenceSubject, where: str) -> np.ndarray:
        return subject.image


class ShapeLocator:
    """Objects located by the weight-free shape backend (``rewards.shapes``); an object reference is its
    whole image."""

    kind = "object"

    def __init__(self, shapes):
        self.shapes = shapes  # a rewards.shapes.ShapeSubjectEmbedder

    def locate(self, image: np.ndarray, captions: Sequence[str]) -> np.ndarray:
        return self.shapes.locate(image)

    def reference_crop(self, subject: ReferenceSubject, where: str) -> np.ndarray:
        return subject.image
