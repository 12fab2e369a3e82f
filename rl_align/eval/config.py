"""The config of ``scripts/evaluate.py`` (``rl_align.eval.evaluate.evaluate``): which policies, which
benchmark, how images are generated, and which Table 1 metrics with which local backends.

Every model loads from a local path named here, nothing downloads; a metric whose backend is missing is
an error naming its key and path. Defaults are the offline quickstart's: synthetic shape tasks held out
from training by their seed, the weight-free shape backend for objects, dlib for faces.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from rewards.config import ClipConfig, FaceConfig, ObjectConfig
from rl_align.eval.generation import GenerationConfig
from rl_align.ippo.tasks import TaskConfig

MetricName = Literal["clip_t", "face_sim", "dino_i", "clip_i", "hps", "id", "subject_count", "background", "subjects_found"]
# Column titles in Table 1's order; R_id is the training reward's id term, R_count and R_background its
# weight-free stand-ins for the text and aesthetic terms, subjects_found a count.
METRIC_TITLES: dict[str, str] = {
    "clip_t": "CLIP-T",
    "face_sim": "Face-Sim",
    "dino_i": "DINO-I",
    "clip_i": "CLIP-I",
    "hps": "HPS",
    "id": "R_id",
    "subject_count": "R_count",
    "background": "R_background",
    "subjects_found": "Subjects found",
}
# The scores whose mean is Table 1's "Overall AVG" (a count is not averaged in).
OVERALL_METRICS = ("clip_t", "face_sim", "dino_i", "clip_i", "hps", "id", "subject_count", "background")


@dataclass(frozen=True)
class MetricsConfig:
    """MultiCrafter Table 1's metrics (Sec. 5.1) and their local backends.

    - clip_t: CLIP image-text cosine (``clip``); hps: HPSv2 (``hps``, an HPS v2/v2.1 checkpoint);
    - face_sim: ArcFace (insightface) or dlib similarity of reference and detected faces, Hungarian-matched,
      a missing face 0 (``face``); only tasks with face references;
    - dino_i / clip_i: cosine of each reference and its matched located crop (faces by the face detector,
      objects by ``object.backend``: Florence-2 grounding from ``object.florence_dir``, or the weight-free
      shape locator), embedded by DINOv2 (``object.dinov2_dir``) or CLIP's image tower (``clip``);
    - id: the reward's R_id (Eq. 10) over every reference with the face and object backends;
    - subject_count, background: the weight-free reward terms of the synthetic shapes (rewards/shapes.py),
      with the shape settings of ``object.shapes``;
    - subjects_found: references with a located candidate (one-to-one), per image.
    """

    metrics: tuple[MetricName, ...] = ("clip_t", "face_sim", "dino_i", "clip_i", "hps", "subjects_found")
    device: str = "cpu"  # torch device of CLIP, HPSv2, Florence-2, SAM2 and DINOv2
    face: FaceConfig = field(default_factory=FaceConfig)
    object: ObjectConfig = field(default_factory=ObjectConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    hps: ClipConfig = field(default_factory=lambda: ClipConfig(model_name="ViT-H-14"))

    def __post_init__(self) -> None:
        if not self.metrics or len(set(self.metrics)) != len(self.metrics):
            raise ValueError(f"metrics must list each of {', '.join(METRIC_TITLES)} at most once, got {self.metrics}")


@dataclass(frozen=True)
class EvalConfig:
    output_root: str = "evals"  # eval folders are created under this directory
    name: str = ""  # folder name; empty means "eval-<YYYYmmdd-HHMMSS>"
    # Policies to compare, each "NAME=SPEC" with SPEC as in scripts/generate.py (RUN_DIR | POLICY.yaml |
    # DIFFUSERS_DIR, optionally @ADAPTERS_DIR or @CHECKPOINT.pt); --compare on the command line replaces them.
    policies: tuple[str, ...] = ()
    # The benchmark: a task manifest (the RL task format, e.g. a test.jsonl of scripts/build_benchmark.py)
    # or synthetic shape tasks drawn with task_seed (which differs from training's run.seed, so they are
    # held out by their noise key).
    tasks: TaskConfig = field(default_factory=TaskConfig)
    num_tasks: int = 16  # synthetic: tasks drawn; manifest: the first num_tasks (0: all)
    task_seed: int = 1000
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    bootstrap_samples: int = 1000  # resamples of the tasks for the intervals
    confidence: float = 0.95
    device: str = "cpu"  # the policies' device

    def __post_init__(self) -> None:
        if self.num_tasks < 0 or (self.tasks.source == "synthetic" and self.num_tasks == 0):
            raise ValueError(f"num_tasks must be >= 1 for synthetic tasks (0 means every task of a manifest), got {self.num_tasks}")
        if self.bootstrap_samples < 1:
            raise ValueError(f"bootstrap_samples must be >= 1, got {self.bootstrap_samples}")
        if not 0 < self.confidence < 1:
            raise ValueError(f"confidence must be in (0, 1), got {self.confidence}")
        names = [spec.partition("=")[0] for spec in self.policies]
        for spec, name in zip(self.policies, names):
            if "=" not in spec or not name or not spec.partition("=")[2]:
                raise ValueError(f"policies: {spec!r} is not NAME=SPEC (for example ippo=runs/gspo-x)")
        if len(set(names)) != len(names):
            raise ValueError(f"policies: names must differ, got {names}")
