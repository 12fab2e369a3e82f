"""Reward settings as frozen dataclasses (stdlib only; ``rl_align.core.config.load_config`` reads them from
YAML and ``key=value`` overrides). Every model loads from a local path named here; nothing downloads.

Components and their weights (MultiCrafter Eq. 9: R = w_text R_clip + w_aes R_hps + w_id R_id):
``id`` (Hungarian multi-subject fidelity over face and object references), ``text`` (CLIP image-text
cosine), ``aesthetic`` (HPSv2), and the weight-free ``jpeg_compressibility``, ``jpeg_incompressibility``,
``colour_target``, ``subject_count`` and ``background`` (rewards/weight_free.py, rewards/shapes.py). A component is loaded only when its resolved weight is non-zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Literal

# MultiCrafter Sec. 4.4: the weights of Eq. 9 for the two tasks.
PRESETS: dict[str, dict[str, float]] = {
    "multi_human": {"id": 0.5, "text": 1.4, "aesthetic": 0.7},
    "multi_object": {"id": 1.0, "text": 1.4, "aesthetic": 0.7},
    # Offline and weight-free: a colour target, and the embedded default's multi-subject reward (with
    # id_kinds [object] and object.backend shapes): R_id by Hungarian matching of located shapes, plus
    # stand-ins for the text term (the named number of subjects) and the aesthetic term (a clean background).
    "weight_free": {"colour_target": 1.0},
    # Stand-in weights for per-component advantages (configs/rewards/synthetic_shapes.yaml says what 0.1 and
    # 0.5 did): without them a policy sprays extra blobs, which raises R_id (more candidates to match) and
    # ruins the count.
    "synthetic_shapes": {"id": 1.0, "subject_count": 0.2, "background": 0.2},
    "custom": {},
}


@dataclass(frozen=True)
class WeightsConfig:
    """Per-component weights, one field per component; ``null`` (the default) takes the preset's value,
    or 0 if the preset has none."""

    id: float | None = None
    text: float | None = None
    aesthetic: float | None = None
    jpeg_compressibility: float | None = None
    jpeg_incompressibility: float | None = None
    colour_target: float | None = None
    subject_count: float | None = None
    background: float | None = None

    def __post_init__(self) -> None:
        # nan or inf would pass every other check and turn every reward into nan or inf.
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None and not math.isfinite(value):
                raise ValueError(f"weights.{f.name} must be a finite number, got {value!r}")


@dataclass(frozen=True)
class FaceConfig:
    # dlib: the CPU default, weights from the face-recognition-models package (dlib_model_dir empty) or a
    # folder holding the same two files. insightface: a buffalo_l-style folder (SCRFD + ArcFace ONNX).
    backend: Literal["dlib", "insightface"] = "dlib"
    insightface_dir: str = ""  # folder with det_10g.onnx and w600k_r50.onnx (or any SCRFD + ArcFace pair)
    # ONNX Runtime providers in order of preference, e.g. [CUDAExecutionProvider, CPUExecutionProvider];
    # the ones the installed onnxruntime lacks are skipped with a warning, none available is an error.
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    det_size: tuple[int, ...] = (640, 640)  # SCRFD input size (w, h)
    det_thresh: float = 0.5
    dlib_model_dir: str = ""  # empty: the files shipped by face_recognition_models
    dlib_upsample: int = 1  # HOG detector upsampling: 1 finds faces down to ~40 px
    dlib_same_person_distance: float = 0.6  # dlib's L2 threshold d0; similarity 1 - d / d0

    def __post_init__(self) -> None:
        if len(self.det_size) != 2 or min(self.det_size) < 32:
            raise ValueError(f"det_size must be two sizes >= 32 (w, h), got {self.det_size}")
        if not 0 < self.det_thresh < 1:
            raise ValueError(f"det_thresh must be in (0, 1), got {self.det_thresh}")
        if self.dlib_upsample < 0:
            raise ValueError(f"dlib_upsample must be >= 0, got {self.dlib_upsample}")
        if self.dlib_same_person_distance <= 0:
            raise ValueError(f"dlib_same_person_distance must be > 0, got {self.dlib_same_person_distance}")


@dataclass(frozen=True)
class ShapesConfig:
    """The weight-free ``shapes`` object backend (rewards/shapes.py): flat-coloured shapes on a plain
    background, as in the embedded synthetic data. Colour distances of pixels are Euclidean in sRGB with
    channels in [0, 1] (so at most sqrt(3)); the similarity is colour_weight * s_colour + shape_weight *
    s_shape, in [-1, 1]."""

    median_size: int = 3  # median filter window (pixels) against pixel noise; 1 turns it off
    # The filter runs only on noisy images: when the median distance of the border pixels from the
    # background colour exceeds this (about 0.07 for Gaussian noise of std 20/255 on white, 0 for a
    # clean render, whose small shapes would lose their corners to the filter).
    noise_threshold: float = 0.02
    foreground_threshold: float = 0.2  # sRGB distance from the background above which a pixel is foreground
    colour_radius: float = 0.12  # sRGB radius of one subject colour (mean-shift kernel)
    min_area_fraction: float = 0.01  # components smaller than this fraction of the image are dropped
    shape_grid: int = 8  # side of the occupancy grid describing a shape
    colour_scale: float = 40.0  # CIE76 delta E at which s_colour = 0 (-1 at twice it)
    shape_floor: float = 0.6  # grid IoU at which s_shape = 0 (different synthetic shapes: about 0.5 to 0.8)
    # Weights of the colour and shape terms, summing to 1. Equal by default: a subject in the right colour
    # but the wrong shape earns about half, so shape fidelity, what a tiny base learns last, still pays.
    colour_weight: float = 0.5
    shape_weight: float = 0.5
    # The ``background`` component: the colour the prompt names for the background (the synthetic
    # scenes are "on a white background"), sRGB in [0, 1].
    background_rgb: tuple[float, ...] = (1.0, 1.0, 1.0)

    def __post_init__(self) -> None:
        if len(self.background_rgb) != 3 or not all(0.0 <= c <= 1.0 for c in self.background_rgb):
            raise ValueError(f"background_rgb must be three values in [0, 1], got {self.background_rgb}")
        if self.median_size < 1:
            raise ValueError(f"median_size must be >= 1, got {self.median_size}")
        if self.noise_threshold < 0:
            raise ValueError(f"noise_threshold must be >= 0, got {self.noise_threshold}")
        if not 0 < self.foreground_threshold < 3**0.5:
            raise ValueError(f"foreground_threshold must be in (0, sqrt(3)), got {self.foreground_threshold}")
        if not 0 < self.colour_radius < 3**0.5:
            raise ValueError(f"colour_radius must be in (0, sqrt(3)), got {self.colour_radius}")
        if not 0 < self.min_area_fraction < 1:
            raise ValueError(f"min_area_fraction must be in (0, 1), got {self.min_area_fraction}")
        if self.shape_grid < 2:
            raise ValueError(f"shape_grid must be >= 2, got {self.shape_grid}")
        if self.colour_scale <= 0:
            raise ValueError(f"colour_scale must be > 0, got {self.colour_scale}")
        if not 0 <= self.shape_floor < 1:
            raise ValueError(f"shape_floor must be in [0, 1), got {self.shape_floor}")
        for name in ("colour_weight", "shape_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if abs(self.colour_weight + self.shape_weight - 1.0) > 1e-6:
            raise ValueError(
                f"colour_weight + shape_weight must be 1 (keeps the similarity in [-1, 1]), "
                f"got {self.colour_weight} + {self.shape_weight}"
            )


@dataclass(frozen=True)
class ObjectConfig:
    # grounding: Florence-2 -> SAM2 -> DINOv2 (the paper's setup, the three folders below); shapes: the
    # weight-free backend for the embedded synthetic data (``shapes`` below, no model files).
    backend: Literal["grounding", "shapes"] = "grounding"
    florence_dir: str = ""  # Florence-2 (transformers Florence2ForConditionalGeneration + processor)
    sam2_dir: str = ""  # SAM2 (transformers Sam2Model + Sam2Processor)
    dinov2_dir: str = ""  # DINOv2 (transformers Dinov2Model + image processor)
    max_new_tokens: int = 64  # grounding output length (4 location tokens per box plus phrase tokens)
    dedupe_iou: float = 0.9  # boxes found for two captions that overlap this much are one candidate
    shapes: ShapesConfig = field(default_factory=ShapesConfig)

    def __post_init__(self) -> None:
        if self.backend not in ("grounding", "shapes"):
            raise ValueError(f"backend must be grounding or shapes, got {self.backend!r}")
        if self.max_new_tokens < 4:
            raise ValueError(f"max_new_tokens must be >= 4 (one box), got {self.max_new_tokens}")
        if not 0 < self.dedupe_iou <= 1:
            raise ValueError(f"dedupe_iou must be in (0, 1], got {self.dedupe_iou}")


@dataclass(frozen=True)
class ClipConfig:
    """An open_clip model and a local checkpoint file (``pretrained`` is passed to open_clip as a path)."""

    model_name: str = "ViT-L-14"
    checkpoint: str = ""


@dataclass(frozen=True)
class JpegConfig:
    quality: int = 95  # DDPO's setting

    def __post_init__(self) -> None:
        if not 1 <= self.quality <= 100:
            raise ValueError(f"quality must be in [1, 100], got {self.quality}")


@dataclass(frozen=True)
class ColourTargetConfig:
    rgb: tuple[float, ...] = (0.9, 0.4, 0.1)  # target colour, each channel in [0, 1]

    def __post_init__(self) -> None:
        if len(self.rgb) != 3 or not all(0.0 <= c <= 1.0 for c in self.rgb):
            raise ValueError(f"rgb must be three values in [0, 1], got {self.rgb}")


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"  # loopback by default; expose deliberately
    port: int = 8000
    max_images: int = 64  # per request -> 413 beyond
    max_request_bytes: int = 64 * 1024 * 1024  # -> 413 beyond
    max_references_per_image: int = 8  # -> 413 beyond
    max_image_pixels: int = 4096 * 4096  # decoded size per image (decompression bombs) -> 413 beyond
    # Pixels of one request, images and references together, as their headers declare them (checked
    # before any is decoded) -> 413 beyond. It bounds memory: the 64 x (1 + 8) images of 4096 x 4096 the
    # limits above would allow are 9.7G pixels (29 GB of RGB); 128M pixels (384 MiB of RGB) holds e.g.
    # 64 images of 1024 x 1024 with a 1024 x 1024 reference each.
    max_request_pixels: int = 128 * 1024 * 1024
    # Requests decoded or scored at once (one scored while the next decodes); the others wait holding only
    # their body. Decoding holds at most max_batches_in_flight x (3 x max_request_pixels + 11 x
    # max_image_pixels) bytes (rewards/server.py: decode_memory_bound).
    max_batches_in_flight: int = 2
    # Name of an environment variable holding the bearer token; empty: no auth. The token itself never
    # sits in a YAML file.
    token_env: str = ""
    ray_replicas: int = 1  # Ray Serve: replicas of the deployment
    ray_gpus_per_replica: float = 0.0  # 1.0 places one replica per GPU

    def __post_init__(self) -> None:
        for name in (
            "max_images",
            "max_request_bytes",
            "max_references_per_image",
            "max_image_pixels",
            "max_request_pixels",
            "max_batches_in_flight",
            "ray_replicas",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_request_pixels < self.max_image_pixels:
            raise ValueError(
                f"max_request_pixels ({self.max_request_pixels}) must be >= max_image_pixels "
                f"({self.max_image_pixels}): otherwise no request could hold one image of the allowed size"
            )
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")


@dataclass(frozen=True)
class RewardConfig:
    preset: Literal["multi_human", "multi_object", "weight_free", "synthetic_shapes", "custom"] = "custom"
    weights: WeightsConfig = field(default_factory=WeightsConfig)
    device: str = "cpu"  # torch device of the CLIP/HPSv2/Florence-2/SAM2/DINOv2 models
    # Subject kinds the ``id`` component scores: face (the face backend), object (object.backend:
    # Florence-2 -> SAM2 -> DINOv2, or the weight-free shapes). A request with a reference of another
    # kind is rejected.
    id_kinds: tuple[Literal["face", "object"], ...] = ("face",)
    face: FaceConfig = field(default_factory=FaceConfig)
    object: ObjectConfig = field(default_factory=ObjectConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    hps: ClipConfig = field(default_factory=lambda: ClipConfig(model_name="ViT-H-14"))
    jpeg: JpegConfig = field(default_factory=JpegConfig)
    colour: ColourTargetConfig = field(default_factory=ColourTargetConfig)
    server: ServerConfig = field(default_factory=ServerConfig)

    def __post_init__(self) -> None:
        if not self.id_kinds or len(set(self.id_kinds)) != len(self.id_kinds):
            raise ValueError(f"id_kinds must list face and/or object once each, got {self.id_kinds}")

    def resolved_weights(self) -> dict[str, float]:
        """Non-zero component weights: the preset's, then any weight set explicitly."""
        weights = dict(PRESETS[self.preset])
        for f in fields(WeightsConfig):
            value = getattr(self.weights, f.name)
            if value is not None:
                weights[f.name] = value
        return {name: w for name, w in weights.items() if w != 0.0}
