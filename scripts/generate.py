"""Generate images of a prompt with reference subjects from a trained policy; the library side is
rl_align/eval/generation.py.

    python scripts/generate.py --policy runs/<run> --prompt "a red circle and a blue square on a white background" \
        --reference red.png --caption "a red circle" --reference blue.png --caption "a blue square" --out gen/
    python scripts/generate.py --policy runs/<run> --tasks benchmark/test.jsonl --out gen/   # a task manifest
    python scripts/generate.py --policy configs/policy/tiny.yaml@runs/<run>/adapters --num-images 8 --seed 3 ...
    python scripts/generate.py --policy /models/FLUX.1-dev@runs/<run>/adapters --height 512 --width 512 --steps 28 ...

--policy is a run folder (its policy.yaml and adapters/), a policy YAML file, or a local diffusers folder,
each optionally followed by @ADAPTERS (an adapter folder, or after a run folder or policy YAML a checkpoint
file such as runs/<run>/checkpoints/iteration-00000060.pt). Trailing key=value arguments override the policy config
(attention.dynamic_routing=true is the same as --dynamic-routing). Writes image-KK.png (one prompt) or
task-NNNN/image-KK.png (a manifest) and generation.json; the same arguments give byte-identical PNGs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from rewards.types import SUBJECT_KINDS, ReferenceSubject
from rl_align.core.config import ConfigError
from rl_align.core.errors import ManifestError, SetupError
from rl_align.eval.generation import GenerationConfig, generate, generation_settings, load_policy, resolve_policy, save_png
from rl_align.ippo.tasks import ManifestTasks, Task


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    defaults = GenerationConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", required=True, help="RUN_DIR | POLICY.yaml | DIFFUSERS_DIR, optionally @ADAPTERS_DIR or @CHECKPOINT.pt")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="the prompt (each reference's caption should occur in it)")
    what.add_argument("--tasks", help="a JSON Lines task manifest (the RL task format): every task is generated")
    parser.add_argument("--reference", action="append", default=[], metavar="IMAGE", help="a reference image (repeat for several)")
    parser.add_argument("--caption", action="append", default=[], help="each reference's caption, in order")
    parser.add_argument("--kind", action="append", default=[], choices=SUBJECT_KINDS, help="each reference's kind (default object)")
    parser.add_argument("--category", action="append", default=[], help="each reference's category (condition ids)")
    parser.add_argument("--out", required=True, help="output folder (must not hold images already)")
    parser.add_argument("--num-images", type=int, default=defaults.num_images)
    parser.add_argument("--seed", type=int, default=defaults.seed, help="image k starts from the noise of seed + k")
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--height", type=int, default=defaults.height)
    parser.add_argument("--width", type=int, default=defaults.width)
    parser.add_argument("--reference-size", type=int, default=defaults.reference_size)
    parser.add_argument("--solver", choices=("euler", "dpmpp_2m"), default=defaults.solver)
    parser.add_argument("--time-shift", choices=("dynamic", "static", "none"), default=defaults.time_shift)
    parser.add_argument("--guidance", type=float, help="guidance scale of a guidance-distilled model (default: the policy's)")
    parser.add_argument("--dynamic-routing", action="store_true", help="MUSAR dynamic routing (Eq. 2-4); captions must occur in the prompt")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="policy config overrides")
    return parser.parse_args(argv)


def single_task(args: argparse.Namespace) -> Task:
    count = len(args.reference)
    for name in ("caption", "kind", "category"):
        given = getattr(args, name)
        if given and len(given) != count:
            raise ManifestError(f"--{name}: given {len(given)} times for {count} --reference images (give it once per reference or not at all)")
    subjects = []
    for i, path in enumerate(args.reference):
        try:
            image = np.asarray(Image.open(path).convert("RGB"))
        except (OSError, ValueError) as exc:
            raise ManifestError(f"--reference {path}: cannot read it as an image ({exc})") from None
        kind = args.kind[i] if args.kind else "object"
        subjects.append(ReferenceSubject(image, kind, args.caption[i] if args.caption else ""))
    return Task(args.prompt, tuple(subjects), tuple(args.category) if args.category else None)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    try:
        overrides = list(args.overrides) + (["attention.dynamic_routing=true"] if args.dynamic_routing else [])
        overrides += [f"guidance_scale={args.guidance}"] if args.guidance is not None else []
        source = resolve_policy(args.policy, overrides)
        cfg = GenerationConfig(
            num_images=args.num_images, seed=args.seed, steps=args.steps, height=args.height, width=args.width,
            reference_size=args.reference_size, solver=args.solver, time_shift=args.time_shift,
        )
        tasks = ManifestTasks(args.tasks, seed=0).tasks if args.tasks else [single_task(args)]
        if out.exists() and any(out.glob("**/*.png")):
            raise SetupError(f"--out {out} already holds images; choose a new folder")
        policy = load_policy(source, args.device)
        written = []
        for index, task in enumerate(tqdm(tasks, desc="generate", dynamic_ncols=True, disable=len(tasks) == 1)):
            folder = out / f"task-{index:04d}" if args.tasks else out
            for k, image in enumerate(generate(policy, task, cfg)):
                save_png(image, folder / f"image-{k:02d}.png")
            written.append({"prompt": task.prompt, "folder": str(folder), "images": cfg.num_images})
    except (ConfigError, ManifestError, SetupError, ValueError) as exc:
        print(f"generate: {exc}", file=sys.stderr)
        return 2
    settings = generation_settings(cfg, source) | {"tasks": written, "device": args.device}
    (out / "generation.json").write_text(json.dumps(settings, indent=2, default=str))
    print(f"{sum(t['images'] for t in written)} images of {len(written)} task(s) in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
