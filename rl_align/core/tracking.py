"""What a run leaves in its folder besides checkpoints: ``metrics.jsonl`` (one JSON object per
iteration), TensorBoard events, curve plots and sample image grids."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from rl_align.core.errors import ManifestError, RunFolderError
from rl_align.core.jsonl import json_objects

log = logging.getLogger(__name__)


def due(count: int, every: int, last: int) -> bool:
    """Whether a periodic output is due: ``count`` is the number of policy updates behind what it records
    (the updates a sample grid's rollout saw, the steps a checkpoint holds) and ``last`` that count at
    the end of the run. Every cadence of both trainers goes through this one rule."""
    return count % every == 0 or count == last


class MetricsLog:
    """Appends one line per iteration to ``run_dir/metrics.jsonl`` and mirrors the scalars to
    TensorBoard under ``run_dir/tensorboard``. On resume it first drops lines of iterations at or after
    the resumed one, so the file never holds an iteration twice (and a damaged last line, see
    ``read_metrics``). A failed write (a full disk, no permission) is a RunFolderError naming the file."""

    def __init__(self, run_dir: Path, resume_from: int | None = None, tensorboard: bool = True):
        self.path = Path(run_dir) / "metrics.jsonl"
        try:
            if resume_from is not None and self.path.exists():
                kept = [record for record in read_metrics(self.path) if record["iteration"] < resume_from]
                self.path.write_text("".join(json.dumps(record) + "\n" for record in kept))
            self._file = self.path.open("a")
        except OSError as exc:
            raise RunFolderError.from_os_error("write metrics", self.path, exc) from None
        self._writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=resume_from)

    def write(self, iteration: int, scalars: Mapping[str, float]) -> None:
        """Record ``scalars`` for ``iteration``; a non-finite value is written as null and warned about."""
        record: dict[str, float | int | None] = {"iteration": iteration}
        for name, value in scalars.items():
            value = float(value)
            if not math.isfinite(value):
                log.warning("iteration %d: metric %s is %s", iteration, name, value)
                record[name] = None
                continue
            record[name] = value
            if self._writer is not None:
                self._writer.add_scalar(name, value, iteration)
        try:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        except OSError as exc:
            raise RunFolderError.from_os_error("write metrics", self.path, exc) from None

    def close(self) -> None:
        self._file.close()
        if self._writer is not None:
            self._writer.close()

    def __enter__(self) -> "MetricsLog":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_metrics(path: Path) -> list[dict]:
    """The records of a ``metrics.jsonl``, in file order. A damaged last line (a write cut short by a crash
    or a full disk) is dropped with a warning naming file:line; a damaged line before it is a RunFolderError
    naming file:line."""
    path = Path(path)
    lines = sum(1 for raw in path.read_bytes().split(b"\n") if raw.decode("utf-8", "replace").strip())  # json_objects' lines
    records = []
    try:
        for _, record in json_objects(path):
            records.append(record)
    except ManifestError as exc:
        if len(records) != lines - 1:
            raise RunFolderError(f"{exc}: the metrics log is damaged before its last line; repair or delete that line") from None
        log.warning("dropping the last line of the metrics log, cut short: %s", exc)
    return records


def plot_curves(records: Sequence[Mapping], keys: Iterable[str], path: Path, title: str = "", smooth: int = 1) -> None:
    """One panel per key against the iteration, raw values and (when ``smooth`` > 1) a running mean of
    ``smooth`` points; keys that never occur are left out. Saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in keys if any(r.get(k) is not None for r in records)]
    if not keys:
        return
    fig, axes = plt.subplots(len(keys), 1, figsize=(7, 2.4 * len(keys)), sharex=True, squeeze=False)
    for ax, key in zip(axes[:, 0], keys):
        points = [(r["iteration"], r[key]) for r in records if r.get(key) is not None]
        x, y = np.array(points, dtype=np.float64).T
        ax.plot(x, y, lw=0.8, alpha=0.5 if smooth > 1 else 1.0, label=key)
        if smooth > 1 and len(y) >= smooth:
            ax.plot(x[smooth - 1 :], np.convolve(y, np.ones(smooth) / smooth, mode="valid"), lw=1.6, label=f"{key} (mean of {smooth})")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    axes[-1, 0].set_xlabel("iteration")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_image_grid(images: np.ndarray, path: Path, columns: int, captions: Sequence[str] | None = None) -> None:
    """Tile uint8 images (N, H, W, 3) row-major into ``columns`` columns (a group per row, say) and save
    a PNG; optional captions are drawn in a strip above each image."""
    from PIL import Image, ImageDraw

    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
    if captions is not None and len(captions) != len(images):
        raise ValueError(f"{len(captions)} captions for {len(images)} images")
    n, h, w, _ = images.shape
    rows = math.ceil(n / columns)
    strip = 12 if captions else 0
    canvas = Image.new("RGB", (columns * w, rows * (h + strip)), "white")
    draw = ImageDraw.Draw(canvas)
    for i, image in enumerate(images):
        top, left = (i // columns) * (h + strip), (i % columns) * w
        canvas.paste(Image.fromarray(image), (left, top + strip))
        if captions:
            draw.text((left + 2, top), captions[i][: max(1, w // 6)], fill="black")
    canvas.save(path)
