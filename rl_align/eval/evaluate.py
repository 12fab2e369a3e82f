"""The evaluation recipe behind ``scripts/evaluate.py``: every policy generates K images per benchmark task
from the same seeds, the Table 1 metrics score them, and the eval folder gets

    config.yaml          the resolved EvalConfig
    metrics.json         per policy: the aggregate (mean, interval, tasks) and every task's per-image scores
    table.md, table.csv  Table 1's layout: a row per policy, mean [95% bootstrap interval] per metric; table.md
                         and metrics.json also hold every other policy's paired difference from the first
    images/<policy>/task-NNNN-KK.png   the generated images
    grids/task-NNNN.png  per task, a row per policy: the references, then the K images
    log.txt
"""

from __future__ import annotations

import gc
import json
import logging
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from rewards.types import ScoreBatch
from rl_align.core.errors import SetupError
from rl_align.core.runs import RunConfig, create_run_dir, setup_logging
from rl_align.core.tracking import save_image_grid
from rl_align.eval.config import EvalConfig
from rl_align.eval.generation import PolicySource, generate, generation_settings, load_policy, resolve_policy, save_png
from rl_align.eval.metrics import MetricBackends, Summary, nanmean, paired_differences, summarize, table_csv, table_markdown
from rl_align.ippo.tasks import ManifestTasks, SyntheticShapeTasks, Task

log = logging.getLogger(__name__)


class PolicyScores(NamedTuple):
    per_image: dict[str, np.ndarray]  # metric -> (T, K)
    per_task: dict[str, np.ndarray]  # metric -> (T,) mean over the task's images (NaN: does not apply)


class EvalResult(NamedTuple):
    eval_dir: Path
    rows: dict[str, dict[str, Summary]]  # policy -> metric -> Summary (with "overall")
    differences: dict[str, dict[str, Summary]]  # every policy but the first -> metric -> its paired difference from the first


# ---- phases ---------------------------------------------------------------------------------------------


def open_eval(cfg: EvalConfig) -> Path:
    """A new eval folder with config.yaml and log.txt; refuses an existing one."""
    eval_dir = create_run_dir(RunConfig(cfg.output_root, cfg.name), cfg, prefix="eval")  # RunFolderError (a SetupError) when taken
    setup_logging(eval_dir)
    log.info("eval folder %s", eval_dir.resolve())
    return eval_dir


# Synthetic draws tried per task asked for before the benchmark is refused for lack of distinct tasks.
DRAWS_PER_TASK = 50


def benchmark_tasks(cfg: EvalConfig) -> list[Task]:
    """The benchmark: the manifest's tasks (the first num_tasks, 0 = all) or num_tasks distinct synthetic
    tasks drawn with task_seed. A repeated synthetic draw is skipped: every task's images start from the
    same seeds, so a repeat would be a copy of another task's scores, counted twice (the singles have only
    32 distinct tasks: 8 colours x 4 shapes)."""
    if cfg.tasks.source == "manifest":
        tasks = ManifestTasks(cfg.tasks.manifest, seed=cfg.task_seed).tasks
        return tasks[: cfg.num_tasks] if cfg.num_tasks else tasks
    source = SyntheticShapeTasks(cfg.tasks, cfg.task_seed)
    tasks: dict[str, Task] = {}
    for draw in range(DRAWS_PER_TASK * cfg.num_tasks):
        task = source.task(0, draw)
        tasks.setdefault(task.prompt, task)  # the prompt names every subject, and a subject's reference is rendered from its name
        if len(tasks) == cfg.num_tasks:
            return list(tasks.values())
    raise SetupError(f"num_tasks={cfg.num_tasks}: {DRAWS_PER_TASK * cfg.num_tasks} draws of synthetic tasks with "
                     f"{cfg.tasks.min_subjects}-{cfg.tasks.max_subjects} subjects gave only {len(tasks)} distinct ones")


def policy_sources(cfg: EvalConfig) -> dict[str, PolicySource]:
    """Every NAME=SPEC of cfg.policies resolved (before any image is made, so a bad spec fails first)."""
    if not cfg.policies:
        raise SetupError("no policies to evaluate: give --compare NAME=SPEC ... (or policies in the config)")
    return {name: resolve_policy(spec) for name, _, spec in (p.partition("=") for p in cfg.policies)}


def generate_and_score(name: str, source: PolicySource, tasks: Sequence[Task], backends: MetricBackends, cfg: EvalConfig, eval_dir: Path) -> PolicyScores:
    """One policy: K images per task (saved under images/<name>/), scored by every metric."""
    policy = load_policy(source, cfg.device)
    per_image: dict[str, list[np.ndarray]] = {metric: [] for metric in cfg.metrics.metrics}
    for index, task in enumerate(tqdm(tasks, desc=f"evaluate {name}", dynamic_ncols=True)):
        images = generate(policy, task, cfg.generation)
        for k, image in enumerate(images):
            save_png(image, eval_dir / "images" / name / f"task-{index:04d}-{k:02d}.png")
        count = len(images)
        scores = backends.score(ScoreBatch(list(images), [task.prompt] * count, [task.references] * count))
        for metric, values in scores.items():
            per_image[metric].append(values)
    del policy
    gc.collect()
    stacked = {metric: np.stack(values) for metric, values in per_image.items()}  # (T, K)
    per_task = {metric: nanmean(values, axis=1) for metric, values in stacked.items()}  # (T,) over a task's images
    return PolicyScores(stacked, per_task)


def save_grids(tasks: Sequence[Task], names: Sequence[str], cfg: EvalConfig, eval_dir: Path) -> None:
    """Per task, a row per policy: its references (resized to the image size), then its K images."""
    size = (cfg.generation.width, cfg.generation.height)
    folder = eval_dir / "grids"
    folder.mkdir(exist_ok=True)
    for index, task in enumerate(tasks):
        references = [np.asarray(Image.fromarray(r.image).resize(size, Image.BILINEAR)) for r in task.references]
        tiles, captions = [], []
        for name in names:
            tiles += references
            captions += [r.caption or "reference" for r in task.references]
            for k in range(cfg.generation.num_images):
                tiles.append(np.asarray(Image.open(eval_dir / "images" / name / f"task-{index:04d}-{k:02d}.png").convert("RGB")))
                captions.append(name if k == 0 else f"{name} {k}")
        save_image_grid(np.stack(tiles), folder / f"task-{index:04d}.png", columns=len(references) + cfg.generation.num_images, captions=captions)


def write_results(tasks: Sequence[Task], sources: dict[str, PolicySource], scores: dict[str, PolicyScores], cfg: EvalConfig,
                  eval_dir: Path) -> tuple[dict[str, dict[str, Summary]], dict[str, dict[str, Summary]]]:
    """metrics.json, table.md and table.csv; returns each policy's summaries and every other policy's
    paired differences from the first."""
    metrics = list(cfg.metrics.metrics)
    rows = {name: summarize(s.per_task, cfg.bootstrap_samples, cfg.confidence, cfg.task_seed) for name, s in scores.items()}
    reference, *others = scores
    differences = {name: paired_differences(scores[name].per_task, scores[reference].per_task, cfg.bootstrap_samples, cfg.confidence, cfg.task_seed)
                   for name in others}
    report = {
        "benchmark": cfg.tasks.manifest or f"synthetic (task_seed {cfg.task_seed})",
        "tasks": len(tasks),
        "images_per_task": cfg.generation.num_images,
        "metrics": metrics,
        "policies": {},
    }
    for name, source in sources.items():
        report["policies"][name] = {
            "generation": generation_settings(cfg.generation, source),
            "aggregate": {metric: summary._asdict() for metric, summary in rows[name].items()},
            **({"difference": {"from": reference, "aggregate": {metric: summary._asdict() for metric, summary in differences[name].items()}}}
               if name in differences else {}),
            "tasks": [
                {
                    "index": index,
                    "prompt": task.prompt,
                    "references": [{"kind": r.kind, "caption": r.caption} for r in task.references],
                    "metrics": {m: _finite_or_none(scores[name].per_task[m][index]) for m in metrics},
                    "per_image": {m: [_finite_or_none(v) for v in scores[name].per_image[m][index]] for m in metrics},
                }
                for index, task in enumerate(tasks)
            ],
        }
    (eval_dir / "metrics.json").write_text(json.dumps(report, indent=2, default=_finite_or_none))
    (eval_dir / "table.md").write_text(table_markdown(rows, metrics, cfg.confidence, differences, reference))
    (eval_dir / "table.csv").write_text(table_csv(rows, metrics))
    return rows, differences


def _finite_or_none(value) -> float | None:
    value = float(value)
    return value if np.isfinite(value) else None


# ---- the recipe -----------------------------------------------------------------------------------------


def evaluate(cfg: EvalConfig) -> EvalResult:
    """Evaluate every policy of ``cfg`` on the benchmark; raises SetupError (bad spec, missing backend,
    existing folder) before any image is made."""
    sources = policy_sources(cfg)
    tasks = benchmark_tasks(cfg)
    kinds = frozenset(r.kind for task in tasks for r in task.references)
    backends = MetricBackends(cfg.metrics, kinds)
    eval_dir = open_eval(cfg)
    log.info("%d tasks x %d images, policies %s, metrics %s", len(tasks), cfg.generation.num_images, ", ".join(sources), ", ".join(cfg.metrics.metrics))
    scores = {name: generate_and_score(name, source, tasks, backends, cfg, eval_dir) for name, source in sources.items()}
    save_grids(tasks, list(sources), cfg, eval_dir)
    rows, differences = write_results(tasks, sources, scores, cfg, eval_dir)
    log.info("table in %s", eval_dir / "table.md")
    return EvalResult(eval_dir, rows, differences)


__all__ = ["EvalResult", "evaluate"]
