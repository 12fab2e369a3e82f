"""The supervised warm-start trainer: ``train(cfg)`` runs one stage (rl_align/sft/stages.py) end to end.

    prepare the run folder -> build the stage's batch streams -> restore a checkpoint or warm start
    -> for each step: take a batch, one optimizer step, log; evaluate, draw samples, plot, checkpoint.

Under ``torchrun`` each process takes its share of every epoch's batches (``BatchStream`` rank/world),
gradients and losses are averaged over every process's samples before the step, rank 0 alone writes the
run folder, and a checkpoint keeps every process's data position. With ``sharding: fsdp`` the transformer
is sharded over the processes (FluxPolicy.shard_transformer), and every process takes part in each model
call: the padded conditioning groups of a step, the evaluation and the sample grids on rank 0's batch.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

from policies import FluxPolicy, full_tensor
from rl_align.core.checkpoints import Checkpoint, load_checkpoint, remove_stale_files, save_checkpoint
from rl_align.core.config import save_config
from rl_align.core.distributed import Communicator, communicator_from_environment, gathered_optimizer_state, load_optimizer_state
from rl_align.core.errors import ManifestError, RunFolderError, SetupError
from rl_align.core.images import images_to_uint8
from rl_align.core.optim import make_optimizer
from rl_align.core.runs import RunLock, RunResult, config_changes, create_run_dir, record_resume, resume_changes, setup_logging
from rl_align.core.tracking import MetricsLog, due, plot_curves, read_metrics, save_image_grid
from rl_align.sft.builders.synthetic import SYNTHETIC_CATEGORIES, build_synthetic_manifest
from rl_align.sft.config import CurriculumConfig, SFTConfig
from rl_align.sft.data import BatchStream, SFTBatch, curriculum_epochs, curriculum_schedule, epoch_steps
from rl_align.sft.manifest import SampleRecord, load_manifest
from rl_align.sft.objective import StageObjective, StepStats, learning_rate_at, train_step
from rl_align.sft.stages import stage_recipe
from samplers import flux_sigmas, ode_solve
from samplers.noise import key_seed

log = logging.getLogger("sft")
# The keys a resume may change (rl_align.core.runs.resume_changes): the run's length, its outputs and the
# warm start (unused on resume). Every other key (run.seed, stage, policy, data, timesteps, optim, idar,
# diptych, routing, curriculum) shapes the trained state or how the run continues it.
RESUMABLE = ("steps", "init_adapters", "run.output_root", "run.name", "output")


class StepRecord(NamedTuple):
    """One step's outcome, as logged."""

    stats: StepStats
    learning_rate: float
    source: str  # the stream the batch came from
    batch_size: int  # samples of all processes together
    subjects: int
    epoch: int
    seconds: float


@dataclass
class _RankData:
    """The StageData of this process: rank 0 alone looks at the disk, builds missing data and checks
    manifests; the others receive the checked samples."""

    cfg: SFTConfig
    manifest: Path
    run_dir: Path
    comm: Communicator

    def stream(self, samples: Sequence[SampleRecord], root: Path, curriculum: bool = False) -> BatchStream:
        stream = BatchStream(samples, root, self.cfg.data, self.cfg.run.seed, rank=self.comm.rank, world=self.comm.world)
        if curriculum and self.cfg.curriculum.enabled:
            stream.set_subject_limit(subject_curriculum(stream, self.cfg.steps, self.cfg.curriculum))
        return stream

    def built(self, manifest: Path, build: Callable[[], object]) -> list[SampleRecord]:
        error = None
        if self.comm.main and not manifest.is_file():
            try:
                build()
            except (FileNotFoundError, ValueError) as exc:
                error = str(exc)
        error = self.comm.broadcast(error)
        if error is not None:
            raise ValueError(error)
        return self.load(manifest)

    def load(self, manifest: Path) -> list[SampleRecord]:
        loaded: list[SampleRecord] | str | None = None
        if self.comm.main:
            try:
                loaded = load_manifest(manifest, self.cfg.data.categories)
            except (FileNotFoundError, ValueError) as exc:
                loaded = str(exc)
        loaded = self.comm.broadcast(loaded)
        if isinstance(loaded, str):
            raise ManifestError(loaded)
        return loaded


def subject_curriculum(stream: BatchStream, steps: int, c: CurriculumConfig) -> Callable[[int], int]:
    """MS-CustomNet's subject limit per stream epoch (Eq. 15) for a stream that gives every one of the
    ``steps`` steps its batch. E is the number of epochs those steps traverse when each of the stream's
    ``world`` processes takes its share of every epoch (``curriculum_epochs`` over the stream's own plans,
    counted with rank 0's share, the largest, so every rank finds the same E); the last of them trains
    K_max."""
    schedule = lambda epochs: curriculum_schedule(epochs, c.min_subjects, c.max_subjects, c.gamma)  # noqa: E731
    counts: dict[int | None, int] = {}

    def batches(epoch: int, limit: int | None) -> int:
        # An epoch's batch count depends on its limit alone: the shuffle decides which samples share a
        # batch and which subjects they keep, not how many samples fall into each bucket.
        if limit not in counts:
            counts[limit] = len(stream.plan_with_limit(epoch, limit))
        return counts[limit]

    epochs = curriculum_epochs(steps, stream.world, batches, schedule)
    limit = schedule(epochs)
    lengths = epoch_steps(steps, stream.world, lambda epoch: batches(epoch, limit(epoch)))
    shown = str(lengths[0]) if len(set(lengths)) == 1 else f"{min(lengths)}-{max(lengths)}"
    log.info("subject curriculum over %d epochs of %s steps each: K = %s", epochs, shown, [limit(e) for e in range(len(lengths))])
    return limit


# ---- phases ---------------------------------------------------------------------------------------------


def prepare_run(cfg: SFTConfig, resume: Path | None, comm: Communicator, held: ExitStack) -> tuple[SFTConfig, Path]:
    """The config with the stage's policy, and the run folder, which rank 0 opens and locks until ``held``
    closes (every rank raises its refusal: RunFolderError naming the PID that holds the lock, or the keys
    a resume may not change). A new run's folder gets config.yaml and policy.yaml (the policy as trained,
    for train_gspo.py). A resume changes nothing in the folder before ``restore`` has loaded its
    checkpoint, except removing what interrupted checkpoint saves left."""
    trained_policy = stage_recipe(cfg.stage).trained_policy(cfg.policy)
    changed = [f"{c.key}={c.new}" for c in config_changes(cfg.policy, trained_policy, "policy.")]
    cfg = dataclasses.replace(cfg, policy=trained_policy)
    opened: str | Exception | None = None
    if comm.main:
        try:
            opened = str(_open_run_dir(cfg, resume, held))
        except RunFolderError as exc:
            opened = exc
    opened = comm.broadcast(opened)
    if isinstance(opened, Exception):
        raise opened
    run_dir = Path(opened)
    setup_logging(run_dir if comm.main else None, logging.INFO if comm.main else logging.WARNING)
    log.info("run folder %s, stage %s, %d process(es) on %s", run_dir.resolve(), cfg.stage, comm.world, comm.device.type)
    if changed:
        log.info("stage %s trains this policy: %s", cfg.stage, ", ".join(changed))
    if resume is not None and comm.main:
        remove_stale_files(run_dir)
    return cfg, run_dir


def _open_run_dir(cfg: SFTConfig, resume: Path | None, held: ExitStack) -> Path:
    """Rank 0: the resumed run folder, locked, after checking ``cfg`` against its config.yaml; or a new
    run folder, locked, with config.yaml and policy.yaml."""
    if resume is not None:
        held.enter_context(RunLock(resume))
        resume_changes(resume, cfg, RESUMABLE)
        return resume
    run_dir = create_run_dir(cfg.run, cfg, prefix=f"sft-{cfg.stage}")
    held.enter_context(RunLock(run_dir))
    save_config(cfg.policy, run_dir / "policy.yaml")
    return run_dir


def build_streams(cfg: SFTConfig, run_dir: Path, objective: StageObjective, comm: Communicator) -> dict[str, BatchStream]:
    """The stage's batch streams (this process's share) by name. Refuses a manifest with any bad line, or
    with samples the stage cannot use. Without ``data.manifest`` the synthetic shapes are written into
    the run folder first."""
    data = cfg.data
    if data.manifest:
        manifest = Path(data.manifest)
        rank_data = _RankData(cfg, manifest, run_dir, comm)
        samples = rank_data.load(manifest)
    else:
        if not set(data.categories) >= set(SYNTHETIC_CATEGORIES):
            raise ValueError(f"the synthetic data has categories {list(SYNTHETIC_CATEGORIES)}; data.categories {list(data.categories)} lacks some")
        manifest = run_dir / "data" / "synthetic" / "manifest.jsonl"
        rank_data = _RankData(cfg, manifest, run_dir, comm)
        s = data.synthetic
        samples = rank_data.built(manifest, lambda: build_synthetic_manifest(
            manifest.parent, s.samples, s.min_subjects, s.max_subjects, s.image_size, s.reference_size, cfg.run.seed,
        ))
    log.info("%d samples from %s", len(samples), manifest)
    problems = objective.check_samples(samples)
    if problems:
        shown = "\n".join(f"  {manifest}:{p.line}: {p.reason}" for p in problems[:20])
        raise ManifestError(f"{manifest}: {len(problems)} sample(s) this stage cannot use:\n{shown}")
    return objective.stage.streams(samples, rank_data)


def restore(resume: bool, run_dir: Path, cfg: SFTConfig, policy: FluxPolicy, optimizer: torch.optim.Optimizer,
            streams: dict[str, BatchStream], comm: Communicator) -> int:
    """Steps already done: a resumed run's newest intact checkpoint (adapters, optimizer, this process's
    data position), loaded before rank 0 writes the resume's config changes (``record_resume``); else 0
    after an optional warm start from ``init_adapters``."""
    if not resume:
        if cfg.init_adapters:
            policy.load_adapters(cfg.init_adapters)
            log.info("warm start from adapters in %s", cfg.init_adapters)
        return 0
    checkpoint = load_checkpoint(run_dir)
    if len(checkpoint.data_positions) != comm.world:
        raise SetupError(f"the checkpoint was written by {len(checkpoint.data_positions)} process(es); resume it with as many, not {comm.world}")
    policy.load_adapter_state(checkpoint.adapters, source=f"the checkpoint of {run_dir}")
    load_optimizer_state(optimizer, checkpoint.optimizer)
    for name, stream_state in checkpoint.data_positions[comm.rank].items():
        streams[name].load_state(stream_state)
    if comm.main:
        record_resume(run_dir, cfg, checkpoint.completed)
    log.info("resumed after step %d", checkpoint.completed)
    return checkpoint.completed


def take_step(step: int, cfg: SFTConfig, objective: StageObjective, optimizer: torch.optim.Optimizer,
              streams: dict[str, BatchStream], comm: Communicator) -> StepRecord:
    """One optimizer step on the next batch of the stream the stage picks for ``step``; each process draws
    its own flow noise, all take the step of the mean over all processes' samples."""
    started = time.perf_counter()
    source = objective.stage.source(step, cfg)
    stream = streams[source]
    batch = stream.next()
    rate = learning_rate_at(step, cfg.steps, cfg.optim)
    key = key_seed("sft-step", cfg.run.seed, step, comm.rank)
    if comm.world > 1:
        count = torch.tensor([float(len(batch.prompts))])
        comm.all_reduce(count)
        stats = train_step(objective, optimizer, batch, key, rate, total_samples=int(count), all_reduce=comm.all_reduce,
                           sharded=is_sharded(cfg, comm))
        size = int(count)
    else:
        stats, size = train_step(objective, optimizer, batch, key, rate), len(batch.prompts)
    return StepRecord(stats, rate, source, size, len(batch.references), stream.epoch, time.perf_counter() - started)


def step_metrics(record: StepRecord, objective: StageObjective) -> dict[str, float]:
    metrics = {f"loss/{k}": v for k, v in record.stats.terms.floats().items()}
    metrics.update({
        "lr": record.learning_rate, "grad_norm": record.stats.grad_norm, "skipped_update": float(record.stats.skipped),
        "batch_size": record.batch_size, "subjects": record.subjects, "epoch": record.epoch, "time/step": record.seconds,
    })
    if len(objective.stage.sources) > 1:
        metrics[f"{objective.stage.name}_source"] = objective.stage.sources.index(record.source)
    return metrics


def is_sharded(cfg: SFTConfig, comm: Communicator) -> bool:
    return cfg.sharding == "fsdp" and comm.world > 1


def evaluate(objective: StageObjective, batch: SFTBatch, key: int, metrics: MetricsLog | None, step: int) -> dict[str, float]:
    """Loss terms on the fixed evaluation batch with a fixed flow sample: comparable across steps. Sharded
    processes all compute them (on rank 0's batch); the one with ``metrics`` writes them."""
    with torch.no_grad():
        terms = objective.batch_loss(batch, key, backward=False).floats()
    if metrics is None:
        return terms
    metrics.write(step, {f"eval/{k}": v for k, v in terms.items()})
    log.info("step %d: fixed-batch loss %s", step, ", ".join(f"{k} {v:.5f}" for k, v in terms.items()))
    return terms


@torch.no_grad()
def save_samples(objective: StageObjective, batch: SFTBatch, cfg: SFTConfig, path: Path | None) -> None:
    """One row per evaluation sample: its references (stretched to the target size), the target, and an
    image generated from fixed noise with sample_steps Euler steps in the policy's attention mode. Sharded
    processes all generate; only the one given a ``path`` saves."""
    policy = objective.policy
    height, width = batch.targets.shape[-2:]
    noise, _ = objective.flow_sample(batch, key_seed("sft-samples", cfg.run.seed))
    rows = []
    for indices in objective.groups(batch):
        group = batch.select(indices)
        velocity = policy.velocity_fn(objective.conditioning(group))
        sigmas = flux_sigmas(cfg.output.sample_steps, noise.shape[-2] * noise.shape[-1] // 4)
        generated = policy.decode_latents(ode_solve(velocity, noise[indices].to(policy.device), sigmas))
        for i in range(len(indices)):
            references = [F.interpolate(r[i : i + 1], size=(height, width), mode="bilinear")[0] for r in group.references]
            rows.append(torch.stack([*references, group.targets[i], generated[i].cpu()]))
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image_grid(images_to_uint8(torch.cat(rows)), path, columns=rows[0].shape[0])


def adapter_checksum(policy: FluxPolicy) -> float:
    """A sum of every trainable value: data-parallel processes that took the same steps agree on it exactly
    (sharded ones sum their shards together, so every process gets the whole sum)."""
    return float(sum(full_tensor(p.detach().double().sum()).cpu() for p in policy.trainable_parameters()))


# ---- the recipe -----------------------------------------------------------------------------------------


def train(cfg: SFTConfig, resume: Path | None = None) -> RunResult:
    """Run ``cfg.stage`` for ``cfg.steps`` steps (continuing the run folder ``resume`` after its newest
    intact checkpoint); under torchrun every process calls this. Raises SetupError, ManifestError or
    FileNotFoundError (a missing model folder) before the first step when the run cannot start, and
    RunFolderError (a SetupError) when the run folder cannot be used or written."""
    comm = communicator_from_environment()
    try:
        with ExitStack() as held:  # rank 0: the run folder's lock, until the run ends
            return _train(cfg, resume, comm, held)
    finally:
        comm.close()


def _train(cfg: SFTConfig, resume: Path | None, comm: Communicator, held: ExitStack) -> RunResult:
    cfg, run_dir = prepare_run(cfg, resume, comm, held)
    torch.manual_seed(cfg.run.seed)
    try:
        policy = FluxPolicy.from_config(cfg.policy).to(comm.device)
        if cfg.checkpoint_blocks:
            policy.enable_block_checkpointing()
        sharded = is_sharded(cfg, comm)
        if sharded:
            policy.shard_transformer()
            log.info("transformer sharded over %d processes (FSDP2): base, adapters, gradients and AdamW states", comm.world)
        objective = StageObjective(policy, cfg)
        streams = build_streams(cfg, run_dir, objective, comm)
        optimizer = make_optimizer(policy.trainable_parameters(), cfg.optim)
        start = restore(resume is not None, run_dir, cfg, policy, optimizer, streams, comm)
    except (FileNotFoundError, ValueError) as exc:  # a missing model folder, a bad manifest, a checkpoint that does not fit
        raise SetupError(str(exc)) from exc

    eval_stream = streams[objective.stage.eval_source]
    eval_batch = eval_stream.load(eval_stream.plan(0)[0])
    runs_policy = comm.main or sharded  # sharded processes make every model call together
    if sharded:
        eval_batch = comm.broadcast(eval_batch)  # rank 0's, so every process makes the same calls
    eval_key = key_seed("sft-eval", cfg.run.seed)
    metrics = MetricsLog(run_dir, resume_from=start if resume is not None else None) if comm.main else None
    if runs_policy:
        evaluate(objective, eval_batch, eval_key, metrics, start)  # on resume: the record the purge dropped, recomputed
    terms = objective.plotted_terms()
    progress = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc=f"SFT {cfg.stage}", dynamic_ncols=True, disable=not comm.main)
    for step in progress:
        record = take_step(step, cfg, objective, optimizer, streams, comm)
        done = step + 1
        checkpoint_due = due(done, cfg.output.checkpoint_every, cfg.steps)
        if checkpoint_due:  # every process: the gather is collective
            gathered = comm.gather(({n: s.state() for n, s in streams.items()}, adapter_checksum(policy)))
            if len({checksum for _, checksum in gathered}) > 1:
                raise RuntimeError(f"data-parallel processes hold different adapters after step {done}: {[c for _, c in gathered]}")
        if not runs_policy:
            continue
        if comm.main:
            metrics.write(step, step_metrics(record, objective))
            progress.set_postfix(loss=f"{float(record.stats.terms.total):.4f}")
        if due(done, cfg.output.eval_every, cfg.steps):
            evaluate(objective, eval_batch, eval_key, metrics, done)
        if due(done, cfg.output.sample_every, cfg.steps):
            save_samples(objective, eval_batch, cfg, run_dir / "samples" / f"step-{done:08d}.png" if comm.main else None)
        if comm.main and due(done, cfg.output.plot_every, cfg.steps):
            plot_curves(read_metrics(metrics.path), [f"loss/{k}" for k in terms] + [f"eval/{k}" for k in terms] + ["lr", "grad_norm"],
                        run_dir / "loss_curve.png", title=f"SFT {cfg.stage} {run_dir.name}", smooth=5)
        if checkpoint_due:  # gathered whole when sharded: every process takes part, rank 0 saves
            adapters, optimizer_state = policy.adapter_state(), gathered_optimizer_state(optimizer)
            if comm.main:
                save_checkpoint(run_dir, Checkpoint(done, adapters, optimizer_state, tuple(states for states, _ in gathered)),
                                keep=cfg.output.keep_checkpoints)
    summary = {}
    if sharded and not comm.main:
        policy.adapter_state()  # rank 0's save_adapters gathers the shards
    if comm.main:
        metrics.close()
        policy.save_adapters(run_dir / "adapters")
        summary = _summarize(run_dir)
    comm.barrier()
    return RunResult(run_dir, cfg.steps, run_dir / "adapters", summary)


def _summarize(run_dir: Path) -> dict[str, float]:
    evals = [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("eval/total") is not None]
    first, last = evals[0], evals[-1]
    log.info(
        "done: fixed-batch loss %.5f at step %d -> %.5f at step %d (flow %.5f -> %.5f); adapters in %s; "
        "warm-start RL with: python scripts/train_gspo.py policy=%s init_adapters=%s",
        first["eval/total"], first["iteration"], last["eval/total"], last["iteration"], first["eval/flow"], last["eval/flow"],
        run_dir / "adapters", run_dir / "policy.yaml", run_dir / "adapters",
    )
    return {"eval_loss_first": first["eval/total"], "eval_loss_last": last["eval/total"]}
