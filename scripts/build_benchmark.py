"""Two-subject benchmark / RL task manifests from a folder of references (MultiCrafter Appendix D); the
builder is rl_align/eval/benchmark.py.

    python scripts/build_benchmark.py faces <face_dir> --out <out_dir>                   # every pair, 10% held out
    python scripts/build_benchmark.py faces <face_dir> --out <out_dir> --test-size 1000  # the paper: 1,000 held out
    python scripts/build_benchmark.py objects <object_dir> --out <out_dir> --pairs 5000 --test-size 0.2 --seed 1
    python scripts/build_benchmark.py faces <face_dir> --out <out_dir> --vlm-dir <local Qwen2.5-VL folder>

<face_dir>: one identity per image (*.png, *.jpg, *.jpeg, *.webp), optional captions.jsonl
({"image": "anna.png", "caption": "a young woman"}) or sidecar anna.txt; uncaptioned faces are "a person".
<object_dir>: the same, but every image needs a caption (captions.jsonl may add "category").
--test-size: a count (an integer) or a fraction (0 < f < 1) of the tasks. --vlm-dir: prompts from a local
image-text-to-text model, the template prompt where its sentence lacks a caption (counted as fallbacks).

Writes <out_dir>/train.jsonl and test.jsonl (scripts/train_gspo.py tasks.source=manifest
tasks.manifest=<out_dir>/train.jsonl), references/ and benchmark.json; <out_dir> must be new or empty.
Exit code 2 with one line naming the file or option on bad input.
"""

from __future__ import annotations

import argparse
import sys

from rl_align.core.errors import ConfigError, ManifestError
from rl_align.core.runs import setup_logging
from rl_align.eval.benchmark import BenchmarkSettings, VlmSceneDescriber, build_benchmark

KINDS = {"faces": "face", "objects": "object"}


def parse_test_size(text: str) -> int | float:
    """An integer is a count of tasks, anything else a fraction."""
    return int(text) if text.strip().isdigit() else float(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=tuple(KINDS), help="faces (one identity per image) or objects (captioned)")
    parser.add_argument("folder", help="the folder of reference images")
    parser.add_argument("--out", required=True, help="the benchmark folder to write (new or empty)")
    parser.add_argument("--pairs", type=int, help="draw this many of all unordered pairs (default: every pair)")
    parser.add_argument("--test-size", type=parse_test_size, default=0.1, help="held-out tasks: a count or a fraction (default 0.1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vlm-dir", help="local image-text-to-text model folder writing the prompts (default: templates)")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        settings = BenchmarkSettings(KINDS[args.kind], pairs=args.pairs, test_size=args.test_size, seed=args.seed)
        describer = VlmSceneDescriber(args.vlm_dir) if args.vlm_dir else None
        report = build_benchmark(args.folder, args.out, settings, describer)
    except (ConfigError, ManifestError) as exc:
        print(f"build_benchmark: {exc}", file=sys.stderr)
        return 2
    fallbacks = f", {report.fallbacks} VLM fallbacks" if describer is not None else ""
    print(f"{report.out}: {report.train} train and {report.test} test tasks{fallbacks}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
