"""Supervised warm-start stages whose adapters seed scripts/train_gspo.py.

    python scripts/sft.py --config configs/sft/quickstart.yaml stage=idar          # train (see rl_align/sft.py)
    python scripts/sft.py --resume runs/<name>                                      # continue from the last checkpoint
    python scripts/sft.py validate <manifest.jsonl> [--categories a,b] [--config c.yaml]
    python scripts/sft.py make-synthetic <out_dir> [--samples 64 --min-subjects 1 --max-subjects 2 ...]
    python scripts/sft.py build-diptych <single_manifest.jsonl> <out_dir> [--pairing random|same_category --count N]
    python scripts/sft.py build-coco <instances.json> <image_dir> <out_dir> [--captions captions.json --beta 0.015 --alpha 2]

    torchrun --nproc_per_node 8 scripts/sft.py --config ...                        # data-parallel, one process per GPU

Stages: single, idar, diptych, position_id, routing. The run folder gets config.yaml (resolved, with the
stage's policy changes), policy.yaml (the policy section, for train_gspo.py), metrics.jsonl + TensorBoard,
loss_curve.png, samples/, checkpoints/ and, at the end, adapters/. Warm-start RL with
    python scripts/train_gspo.py policy=<run>/policy.yaml init_adapters=<run>/adapters
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm

from policies import FluxPolicy
from rl_align.checkpoints import load_checkpoint, save_checkpoint
from rl_align.config import ConfigError, load_config, save_config
from rl_align.distributed import Ranks, ranks_from_environment
from rl_align.ippo import adapter_state, images_to_uint8, load_adapter_state
from rl_align.runs import create_run_dir, load_run_config, run_parser, setup_logging
from rl_align.sft import StageObjective, diptych_source, learning_rate_at, make_optimizer, stage_policy, train_step
from rl_align.sft_builders import SYNTHETIC_CATEGORIES, build_coco_manifest, build_diptych_manifest, build_synthetic_manifest
from rl_align.sft_config import SFTConfig
from rl_align.sft_data import BatchStream, SFTBatch, subject_count_limit
from rl_align.sft_manifest import ManifestError, SampleRecord, check_manifest, load_manifest
from rl_align.tracking import MetricsLog, plot_curves, read_metrics, save_image_grid
from samplers import flux_sigmas, ode_solve
from samplers.noise import key_seed

log = logging.getLogger("sft")


def _plotted_terms(cfg: SFTConfig) -> list[str]:
    """The loss terms this run can make non-zero."""
    terms = ["total", "flow"]
    terms += {"idar": ["attention"], "routing": ["routing"]}.get(cfg.stage, [])
    return terms + (["balance"] if cfg.optim.load_balancing_weight > 0 else [])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"validate": validate, "make-synthetic": make_synthetic, "build-diptych": build_diptych, "build-coco": build_coco}
    if argv and argv[0] in commands:
        return commands[argv[0]](argv[1:])
    return train(argv)


# ---- data commands --------------------------------------------------------------------------------------


def validate(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="sft.py validate", description="Report every bad line of a training manifest.")
    parser.add_argument("manifest")
    parser.add_argument("--categories", help="comma-separated allowed categories (default: data.categories of --config, else any)")
    parser.add_argument("--config", help="an SFT config whose data.categories to use")
    args = parser.parse_args(argv)
    if args.categories is not None:
        categories = tuple(c.strip() for c in args.categories.split(",") if c.strip())
    elif args.config:
        categories = load_config(SFTConfig, args.config).data.categories
    else:
        categories = ()
    try:
        samples, problems = check_manifest(args.manifest, categories)
    except ManifestError as exc:
        print(exc, file=sys.stderr)
        return 2
    for problem in problems:
        print(f"{args.manifest}:{problem.line}: {problem.reason}")
    print(f"{len(samples)} good sample(s), {len(problems)} bad line(s)", file=sys.stderr)
    return 1 if problems else 0


def make_synthetic(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="sft.py make-synthetic", description="Write the offline coloured-shape dataset.")
    parser.add_argument("out_dir")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--min-subjects", type=int, default=1)
    parser.add_argument("--max-subjects", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--reference-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    a = parser.parse_args(argv)
    path = build_synthetic_manifest(Path(a.out_dir), a.samples, a.min_subjects, a.max_subjects, a.image_size, a.reference_size, a.seed)
    print(path)
    return 0


def build_diptych(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="sft.py build-diptych", description="MUSAR diptych pairs from a single-subject manifest.")
    parser.add_argument("manifest")
    parser.add_argument("out_dir")
    parser.add_argument("--pairing", choices=("random", "same_category"), default="random")
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    a = parser.parse_args(argv)
    try:
        samples = load_manifest(a.manifest)
        path = build_diptych_manifest(samples, Path(a.manifest).parent, Path(a.out_dir), a.pairing, a.count, a.seed)
    except (ManifestError, ValueError) as exc:
        print(exc, file=sys.stderr)
        return 2
    print(path)
    return 0


def build_coco(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="sft.py build-coco", description="MS-CustomNet multi-subject sets from COCO instances.")
    parser.add_argument("annotations")
    parser.add_argument("image_dir")
    parser.add_argument("out_dir")
    parser.add_argument("--captions", help="COCO captions JSON (prompts); default: a list of the subjects")
    parser.add_argument("--beta", type=float, default=0.015, help="minimum instance area ratio (Eq. 1)")
    parser.add_argument("--alpha", type=int, default=2, help="minimum salient instances per image (Eq. 2)")
    parser.add_argument("--pool-size", type=int, default=30, help="reference pool entries per category")
    parser.add_argument("--seed", type=int, default=0)
    a = parser.parse_args(argv)
    report = build_coco_manifest(
        Path(a.annotations), Path(a.image_dir), Path(a.out_dir), beta=a.beta, alpha=a.alpha, pool_size=a.pool_size, seed=a.seed,
        captions_file=Path(a.captions) if a.captions else None,
    )
    print(report.manifest)
    print(
        f"{report.images_kept} images kept, {report.images_dropped} with fewer than {a.alpha} salient instances; "
        f"{report.instances_kept} instances kept, {report.instances_dropped_small} at area ratio <= {a.beta}, "
        f"{report.instances_dropped_crowd} crowd; categories: {', '.join(report.categories)}",
        file=sys.stderr,
    )
    return 0


# ---- training -------------------------------------------------------------------------------------------


def train(argv: list[str]) -> int:
    args = run_parser(__doc__, SFTConfig, "stage=idar, optim.learning_rate=1e-4").parse_args(argv)
    try:
        cfg = load_run_config(SFTConfig, args)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    trained_policy = stage_policy(cfg.policy, cfg.stage)
    changed = _changed_keys(cfg.policy, trained_policy, "policy")
    cfg = dataclasses.replace(cfg, policy=trained_policy)
    ranks = ranks_from_environment()
    if args.resume:
        run_dir = Path(args.resume)
    elif ranks.main:
        run_dir = create_run_dir(cfg.run, cfg, prefix=f"sft-{cfg.stage}")
    run_dir = Path(ranks.broadcast(str(run_dir) if ranks.main else None))
    if ranks.main:
        save_config(cfg, run_dir / "config.yaml")
        save_config(cfg.policy, run_dir / "policy.yaml")
    setup_logging(run_dir if ranks.main else None, logging.INFO if ranks.main else logging.WARNING)
    log.info("run folder %s, stage %s, %d process(es) on %s", run_dir.resolve(), cfg.stage, ranks.world, ranks.device.type)
    if changed:
        log.info("stage %s trains this policy: %s", cfg.stage, ", ".join(changed))
    torch.manual_seed(cfg.run.seed)

    try:
        policy = FluxPolicy.from_config(cfg.policy).to(ranks.device)
        objective = StageObjective(policy, cfg)
        streams, eval_source = _streams(cfg, run_dir, objective, ranks)
    except (FileNotFoundError, ValueError) as exc:  # a missing model folder, a bad manifest (ManifestError)
        log.error("%s", exc)
        ranks.close()
        return 2
    optimizer = make_optimizer(policy, cfg.optim)

    start = 0
    if args.resume:
        state = load_checkpoint(run_dir)
        if len(state["streams"]) != ranks.world:
            log.error("the checkpoint was written by %d process(es); resume it with as many, not %d", len(state["streams"]), ranks.world)
            ranks.close()
            return 2
        load_adapter_state(policy, state["adapters"])
        optimizer.load_state_dict(state["optimizer"])
        for name, stream_state in state["streams"][ranks.rank].items():
            streams[name].load_state(stream_state)
        start = state["iteration"]
        log.info("resumed after step %d", start)
    elif cfg.init_adapters:
        policy.load_adapters(cfg.init_adapters)
        log.info("warm start from adapters in %s", cfg.init_adapters)

    eval_stream = streams[eval_source]
    eval_batch = eval_stream.load(eval_stream.plan(0)[0])
    eval_key = key_seed("sft-eval", cfg.run.seed)
    metrics = MetricsLog(run_dir, resume_from=start if args.resume else None) if ranks.main else None
    if ranks.main:
        _evaluate(objective, eval_batch, eval_key, metrics, start)  # on resume: the record the purge dropped, recomputed
    progress = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc=f"SFT {cfg.stage}", dynamic_ncols=True, disable=not ranks.main)
    for step in progress:
        started = time.perf_counter()
        source = diptych_source(step, cfg.diptych, cfg.run.seed) if cfg.stage == "diptych" else "main"
        stream = streams[source]
        batch = stream.next()
        rate = learning_rate_at(step, cfg.steps, cfg.optim)
        key = key_seed("sft-step", cfg.run.seed, step, ranks.rank)  # each rank its own noise
        if ranks.world > 1:
            count = torch.tensor([float(len(batch.prompts))])
            ranks.all_reduce(count)
            stats = train_step(objective, optimizer, batch, key, rate, total_samples=int(count), all_reduce=ranks.all_reduce)
        else:
            count, stats = None, train_step(objective, optimizer, batch, key, rate)
        done = step + 1
        last = done == cfg.steps
        if done % cfg.output.checkpoint_every == 0 or last:  # every rank: the gather is collective
            gathered = ranks.gather(({n: s.state() for n, s in streams.items()}, _checksum(policy)))
            if len({checksum for _, checksum in gathered}) > 1:
                raise RuntimeError(f"data-parallel processes hold different adapters after step {done}: {[c for _, c in gathered]}")
        if not ranks.main:
            continue
        record = {f"loss/{k}": v for k, v in stats.terms.floats().items()}
        record.update({
            "lr": rate, "grad_norm": stats.grad_norm, "skipped_update": float(stats.skipped),
            "batch_size": int(count) if count is not None else len(batch.prompts), "subjects": len(batch.references),
            "epoch": stream.epoch, "time/step": time.perf_counter() - started,
        })
        if cfg.stage == "diptych":
            record["diptych_source"] = ("single", "random", "same_category").index(source)
        metrics.write(step, record)
        progress.set_postfix(loss=f"{record['loss/total']:.4f}")
        if done % cfg.output.eval_every == 0 or last:
            _evaluate(objective, eval_batch, eval_key, metrics, done)
        if done % cfg.output.sample_every == 0 or last:
            _save_samples(objective, eval_batch, cfg, run_dir / "samples" / f"step-{done:08d}.png")
        if done % cfg.output.plot_every == 0 or last:
            terms = _plotted_terms(cfg)
            plot_curves(read_metrics(metrics.path), [f"loss/{k}" for k in terms] + [f"eval/{k}" for k in terms] + ["lr", "grad_norm"],
                        run_dir / "loss_curve.png", title=f"SFT {cfg.stage} {run_dir.name}", smooth=5)
        if done % cfg.output.checkpoint_every == 0 or last:
            state = {"adapters": adapter_state(policy), "optimizer": optimizer.state_dict(), "streams": [states for states, _ in gathered]}
            save_checkpoint(run_dir, done, state, keep=cfg.output.keep_checkpoints)
    if ranks.main:
        metrics.close()
        policy.save_adapters(run_dir / "adapters")
        _summarize(run_dir, cfg)
    ranks.barrier()
    ranks.close()
    return 0


def _checksum(policy: FluxPolicy) -> float:
    """A sum of every trainable value: data-parallel processes that took the same steps agree on it exactly."""
    return float(sum(p.detach().double().sum().cpu() for p in policy.trainable_parameters()))


def _changed_keys(before, after, prefix: str) -> list[str]:
    changes = []
    for f in dataclasses.fields(before):
        old, new = getattr(before, f.name), getattr(after, f.name)
        if dataclasses.is_dataclass(old):
            changes += _changed_keys(old, new, f"{prefix}.{f.name}")
        elif old != new:
            changes.append(f"{prefix}.{f.name}={new}")
    return changes


def _build_once(ranks: Ranks, manifest: Path, build: Callable[[], object]) -> None:
    """Run ``build`` on rank 0 when ``manifest`` does not exist yet (a resumed run has its data); every
    rank calls this, waits for rank 0 (which alone looks at the disk, so all agree), and raises its error."""
    error = None
    if ranks.main and not manifest.is_file():
        try:
            build()
        except (FileNotFoundError, ValueError) as exc:
            error = str(exc)
    error = ranks.broadcast(error)
    if error is not None:
        raise ValueError(error)


def _load_once(ranks: Ranks, manifest: Path, categories) -> list[SampleRecord]:
    """The checked samples of a manifest, read and checked by rank 0 alone (every file of a large manifest
    is opened) and sent to the others; a bad manifest raises on every rank."""
    loaded: list[SampleRecord] | str | None = None
    if ranks.main:
        try:
            loaded = load_manifest(manifest, categories)
        except (FileNotFoundError, ValueError) as exc:
            loaded = str(exc)
    loaded = ranks.broadcast(loaded)
    if isinstance(loaded, str):
        raise ManifestError(loaded)
    return loaded


def _streams(cfg: SFTConfig, run_dir: Path, objective: StageObjective, ranks: Ranks) -> tuple[dict[str, BatchStream], str]:
    """The stage's batch streams (this rank's share) by name and the one the fixed evaluation batch comes
    from. Refuses a manifest with any bad line, or with samples the stage cannot use."""
    data = cfg.data
    if data.manifest:
        manifest = Path(data.manifest)
    else:
        synthetic = data.synthetic
        manifest = run_dir / "data" / "synthetic" / "manifest.jsonl"
        _build_once(ranks, manifest, lambda: build_synthetic_manifest(
            manifest.parent, synthetic.samples, synthetic.min_subjects, synthetic.max_subjects,
            synthetic.image_size, synthetic.reference_size, cfg.run.seed,
        ))
        categories = set(data.categories)
        if not categories >= set(SYNTHETIC_CATEGORIES):
            raise ValueError(f"the synthetic data has categories {list(SYNTHETIC_CATEGORIES)}; data.categories {list(data.categories)} lacks some")
    samples = _load_once(ranks, manifest, data.categories)
    log.info("%d samples from %s", len(samples), manifest)
    seed = cfg.run.seed
    if cfg.stage != "diptych":
        _refuse(objective.check_samples(samples), manifest)
        limit = None
        if cfg.curriculum.enabled:
            c = cfg.curriculum
            epochs = max(1, math.ceil(cfg.steps * data.batch_size / len(samples)))
            limit = lambda epoch: subject_count_limit(min(epoch, epochs), epochs, c.min_subjects, c.max_subjects, c.gamma)  # noqa: E731
            log.info("subject curriculum over %d epochs: K = %s", epochs, [limit(e) for e in range(epochs + 1)])
        return {"main": BatchStream(samples, manifest.parent, data, seed, limit, ranks.rank, ranks.world)}, "main"
    singles = [s for s in samples if len(s.subjects) == 1]
    log.info("diptych: %d of %d samples have one subject and are the single-subject data and the diptych sources", len(singles), len(samples))
    if len(singles) < 2:
        raise ValueError(f"stage diptych needs single-subject samples to pair; {manifest} has {len(singles)}")
    streams = {"single": BatchStream(singles, manifest.parent, data, seed, rank=ranks.rank, world=ranks.world)}
    for pairing, name in (("random", "random"), ("same_category", "same_category")):
        folder = run_dir / "data" / f"diptych-{pairing}"
        path = folder / "manifest.jsonl"
        pair_seed = key_seed("diptych", seed, pairing) % 2**31
        _build_once(ranks, path, lambda: build_diptych_manifest(singles, manifest.parent, folder, pairing, cfg.diptych.pairs, pair_seed))
        pairs = _load_once(ranks, path, data.categories)
        streams[name] = BatchStream(pairs, folder, data, seed, rank=ranks.rank, world=ranks.world)
        log.info("diptych: %d %s pairs in %s", len(pairs), pairing, path)
    return streams, "same_category"


def _refuse(problems, manifest: Path) -> None:
    if problems:
        shown = "\n".join(f"  {manifest}:{p.line}: {p.reason}" for p in problems[:20])
        raise ManifestError(f"{manifest}: {len(problems)} sample(s) this stage cannot use:\n{shown}")


def _evaluate(objective: StageObjective, batch: SFTBatch, key: int, metrics: MetricsLog, step: int) -> None:
    """Loss terms on the fixed evaluation batch with a fixed flow sample: comparable across steps."""
    with torch.no_grad():
        terms = objective.batch_loss(batch, key, backward=False)
    metrics.write(step, {f"eval/{k}": v for k, v in terms.floats().items()})
    log.info("step %d: fixed-batch loss %s", step, ", ".join(f"{k} {v:.5f}" for k, v in terms.floats().items()))


@torch.no_grad()
def _save_samples(objective: StageObjective, batch: SFTBatch, cfg: SFTConfig, path: Path) -> None:
    """One row per evaluation sample: its references (stretched to the target size), the target, and an
    image generated from fixed noise with sample_steps Euler steps and the stage's attention switches."""
    policy = objective.policy
    height, width = batch.targets.shape[-2:]
    noise, _ = objective.flow_sample(batch, key_seed("sft-samples", cfg.run.seed))
    rows = []
    for indices in objective.groups(batch):
        group = batch.select(indices)
        velocity = policy.velocity_fn(objective.conditioning(group), objective.switches)
        sigmas = flux_sigmas(cfg.output.sample_steps, noise.shape[-2] * noise.shape[-1] // 4)
        generated = policy.decode_latents(ode_solve(velocity, noise[indices].to(policy.device), sigmas))
        for i in range(len(indices)):
            references = [F.interpolate(r[i : i + 1], size=(height, width), mode="bilinear")[0] for r in group.references]
            rows.append(torch.stack([*references, group.targets[i], generated[i].cpu()]))
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = rows[0].shape[0]
    save_image_grid(images_to_uint8(torch.cat(rows)), path, columns=columns)


def _summarize(run_dir: Path, cfg: SFTConfig) -> None:
    evals = [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("eval/total") is not None]
    first, last = evals[0], evals[-1]
    log.info(
        "done: fixed-batch loss %.5f at step %d -> %.5f at step %d (flow %.5f -> %.5f); adapters in %s; "
        "warm-start RL with: python scripts/train_gspo.py policy=%s init_adapters=%s",
        first["eval/total"], first["iteration"], last["eval/total"], last["iteration"], first["eval/flow"], last["eval/flow"],
        run_dir / "adapters", run_dir / "policy.yaml", run_dir / "adapters",
    )


if __name__ == "__main__":
    sys.exit(main())
