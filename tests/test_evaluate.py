"""scripts/evaluate.py end to end on tiny policies with the offline backends: every output of the eval
folder, identical policies giving identical rows, a benchmark built by scripts/build_benchmark.py, and
one-line errors for a bad spec or a missing backend."""

from __future__ import annotations

import csv
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

import numpy as np

from rewards import RewardConfig, ScoreBatch, build_reward
from rewards.config import WeightsConfig
from rl_align.core.config import load_config, save_config
from rl_align.core.synthetic import ShapeSubject, render_reference
from rl_align.eval.config import EvalConfig
from rl_align.eval.evaluate import evaluate
from rl_align.ippo.tasks import ManifestTasks
from policies import PolicyConfig

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "eval" / "quickstart.yaml"
TINY = ROOT / "configs" / "policy" / "tiny.yaml"
METRICS = ("id", "subject_count", "background", "subjects_found")
SMALL = ["num_tasks=3", "generation.num_images=2", "generation.steps=3", "generation.height=32", "generation.width=32",
         "generation.reference_size=16", "bootstrap_samples=200"]


def _evaluate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "evaluate.py"), *args], capture_output=True, text=True, timeout=600, cwd=ROOT)


@pytest.mark.slow  # a script run with three tiny policies (about 30 s)
def test_compare_writes_every_output_and_identical_policies_give_identical_rows(tmp_path):
    other = tmp_path / "other.yaml"
    save_config(load_config(PolicyConfig, TINY, ["tiny.seed=7"]), other)  # another base model
    result = _evaluate("--config", str(QUICKSTART), "--compare", f"a={TINY}", f"b={TINY}", f"c={other}",
                       f"output_root={tmp_path}", "name=e", *SMALL)
    assert result.returncode == 0, result.stderr[-3000:]
    folder = tmp_path / "e"
    assert "| Policy | R_id | R_count | R_background | Subjects found | Overall AVG |" in result.stdout
    report = json.loads((folder / "metrics.json").read_text())
    assert report["tasks"] == 3 and report["images_per_task"] == 2 and list(report["policies"]) == ["a", "b", "c"]
    a, b = report["policies"]["a"], report["policies"]["b"]
    assert a["aggregate"] == b["aggregate"] and a["tasks"] == b["tasks"]
    assert "difference" not in a and b["difference"]["from"] == "a" and report["policies"]["c"]["difference"]["from"] == "a"
    assert all(s == {"mean": 0.0, "low": 0.0, "high": 0.0, "tasks": 3} for s in b["difference"]["aggregate"].values())  # b is a, task by task
    c = report["policies"]["c"]
    assert c["difference"]["aggregate"]["id"]["mean"] == pytest.approx(c["aggregate"]["id"]["mean"] - a["aggregate"]["id"]["mean"])
    assert "| b - a | +0.0000 [+0.0000, +0.0000] |" in result.stdout and "| c - a |" in result.stdout
    assert set(a["aggregate"]) == {*METRICS, "overall"} and len(a["tasks"]) == 3
    assert all(len(task["per_image"]["id"]) == 2 for task in a["tasks"])
    table = (folder / "table.md").read_text().splitlines()
    assert table[2].split("|")[2:] == table[3].split("|")[2:]  # rows a and b agree cell by cell
    rows = list(csv.DictReader((folder / "table.csv").open()))
    assert {(r["policy"], r["metric"]) for r in rows} == {(p, m) for p in "abc" for m in (*METRICS, "overall")}
    images = {p: sorted((folder / "images" / p).glob("*.png")) for p in "abc"}
    assert [len(v) for v in images.values()] == [6, 6, 6]
    digest = {p: [hashlib.sha256(f.read_bytes()).hexdigest() for f in v] for p, v in images.items()}
    assert digest["a"] == digest["b"] and set(digest["a"]).isdisjoint(digest["c"])  # same seeds, other model
    grids = sorted((folder / "grids").glob("*.png"))
    assert len(grids) == 3
    task = report["policies"]["a"]["tasks"][0]
    columns = len(task["references"]) + 2
    assert Image.open(grids[0]).size == (columns * 32, 3 * (32 + 12))  # a row per policy: references, then images
    assert (folder / "config.yaml").is_file() and "eval folder" in (folder / "log.txt").read_text()


def test_a_built_benchmark_is_scored_on_the_saved_images(tmp_path):
    """A benchmark from build_benchmark.py's object builder, evaluated in-process: every per-image score in
    metrics.json is what the reward's id scorer gives the saved PNG with the task's references."""
    source = tmp_path / "objects"
    source.mkdir()
    subjects = [ShapeSubject("circle", "red"), ShapeSubject("square", "blue"), ShapeSubject("triangle", "green")]
    for subject in subjects:
        Image.fromarray(render_reference(subject, 32)).save(source / f"{subject.colour}.png")
        (source / f"{subject.colour}.txt").write_text(subject.caption)
    built = subprocess.run([sys.executable, str(ROOT / "scripts" / "build_benchmark.py"), "objects", str(source), "--out", str(tmp_path / "bench"),
                            "--test-size", "2"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert built.returncode == 0, built.stderr[-2000:]
    manifest = tmp_path / "bench" / "test.jsonl"
    cfg = load_config(EvalConfig, QUICKSTART, [
        "tasks.source=manifest", f"tasks.manifest={manifest}", "num_tasks=0", f"policies=[tiny={TINY}]",
        f"output_root={tmp_path}", "name=built", *SMALL[1:],
    ])
    result = evaluate(cfg)
    assert result.rows["tiny"]["id"].tasks == 2
    report = json.loads((result.eval_dir / "metrics.json").read_text())
    tasks = ManifestTasks(manifest, seed=0).tasks
    scorer = build_reward(RewardConfig(preset="custom", weights=WeightsConfig(id=1.0), id_kinds=("object",), object=cfg.metrics.object)).scorers["id"]
    for index, (task, record) in enumerate(zip(tasks, report["policies"]["tiny"]["tasks"])):
        assert record["prompt"] == task.prompt and [r["caption"] for r in record["references"]] == [r.caption for r in task.references]
        images = [np.asarray(Image.open(result.eval_dir / "images" / "tiny" / f"task-{index:04d}-{k:02d}.png")) for k in range(2)]
        expected = scorer.score(ScoreBatch(images, [task.prompt] * 2, [task.references] * 2))
        np.testing.assert_allclose(record["per_image"]["id"], expected, atol=1e-12)
        assert record["metrics"]["id"] == pytest.approx(expected.mean())


def test_bad_specs_and_missing_backends_are_one_line_errors(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("evaluate_script", ROOT / "scripts" / "evaluate.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)

    def _evaluate(*args: str) -> subprocess.CompletedProcess:  # the script's main in-process: no 10 s start-up per call
        code = script.main(list(args))
        out = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out.out, out.err)

    missing = _evaluate("--config", str(QUICKSTART), "--compare", f"a={tmp_path / 'nothing'}", f"output_root={tmp_path}")
    assert missing.returncode == 2 and missing.stderr.strip().count("\n") == 0
    assert "is not a run folder" in missing.stderr and str(tmp_path / "nothing") in missing.stderr
    no_clip = _evaluate("--config", str(QUICKSTART), "--compare", f"a={TINY}", "metrics.metrics=[clip_t]", f"output_root={tmp_path}")
    assert no_clip.returncode == 2 and "clip.checkpoint" in no_clip.stderr and no_clip.stderr.strip().count("\n") == 0
    bad_key = _evaluate("--config", str(QUICKSTART), "--compare", f"a={TINY}", "generation.nmu_images=2")
    assert bad_key.returncode == 2 and "nmu_images" in bad_key.stderr and "num_images" in bad_key.stderr
    assert not any(tmp_path.glob("eval-*"))  # nothing was created by a run that could not start


def test_synthetic_benchmark_tasks_are_distinct():
    """The images of every task start from the same seeds, so a repeated task would count one task's
    scores twice: the draws skip repeats, and a benchmark larger than the distinct tasks is an error."""
    from rl_align.core.errors import SetupError
    from rl_align.eval.evaluate import benchmark_tasks
    from rl_align.ippo.tasks import SyntheticShapeTasks

    cfg = load_config(EvalConfig, QUICKSTART, ["num_tasks=64"])
    tasks = benchmark_tasks(cfg)
    draws = [SyntheticShapeTasks(cfg.tasks, cfg.task_seed).task(0, i).prompt for i in range(64)]
    assert len(set(draws)) < 64  # the plain draws repeat tasks
    prompts = [t.prompt for t in tasks]
    assert len(set(prompts)) == 64 and prompts[:5] == draws[:5]  # the first draws, in order, then the next new ones
    singles = load_config(EvalConfig, QUICKSTART, ["num_tasks=32", "tasks.max_subjects=1"])
    assert len({t.prompt for t in benchmark_tasks(singles)}) == 32  # every colour x shape once
    with pytest.raises(SetupError, match="num_tasks=33.*only 32 distinct"):
        benchmark_tasks(load_config(EvalConfig, QUICKSTART, ["num_tasks=33", "tasks.max_subjects=1"]))
