"""``nca-tiles train``: train a Diff-NCA on a patch store."""

from __future__ import annotations

import math
from pathlib import Path

import click

from nca_tiles.errors import NcaTilesError
from nca_tiles_cli.options import compile_option, device_option, seed_option, threads_option


# The names of nca_tiles.diffusion.model.PRESETS (a test keeps them equal), written out so --help imports no
# torch. Not a click.Choice: an unknown name gets the one-line error of `info --preset`.
PRESETS = ("paper", "small", "medium", "wide", "deep", "tiny")
# nca_tiles.diffusion.schedule.BETA_SCHEDULES, written out for the same reason (a test keeps them equal).
BETA_SCHEDULES = ("linear", "cosine")


@click.command(short_help="Train a Diff-NCA model on a patch store.")
@click.option("--patches", type=click.Path(path_type=Path), required=True, help="Patch store from extract-patches.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Run directory (checkpoint, model/, samples/, metrics.jsonl).")
@click.option("--preset", default="small", show_default=True, metavar=f"[{'|'.join(PRESETS)}]",
              help="Model preset: paper (the paper's model, for a GPU), small (CPU), medium (a CPU model's coarse levels), "
                   "wide (small with twice the hidden units: a finest level, widened from a small one with "
                   "--init-from), deep (small iterated 20 NCA steps: it sees 20 px a denoising step, at twice "
                   "the cost; from a small one with --init-from), tiny (tests).")
@click.option("--steps", type=int, default=200_000, show_default=True, help="Total training steps (the paper: 200 000).")
@click.option("--batch-size", type=int, default=16, show_default=True, help="Patches per training step (the paper's: 16).")
@click.option("--lr", type=float, default=1.6e-3, show_default=True,
              help="Adam learning rate at step 0, decayed ×0.9999 per step (the paper's).")
@device_option()
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto", show_default=True,
              help="auto: bf16 autocast on CUDA, fp32 on CPU (bf16 is very slow on CPUs).")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
@click.option("--overwrite", is_flag=True, help="Start afresh in an existing --out.")
@seed_option()
@compile_option()
@click.option("--val-every", type=int, default=500, show_default=True, help="Steps between validation losses.")
@click.option("--sample-every", type=int, default=2000, show_default=True,
              help="Steps between sample PNGs; the last step always gets one (0: never).")
@click.option("--checkpoint-every", type=int, default=500, show_default=True,
              help="Steps between checkpoints (--resume starts from the last; the end of a run and Ctrl-C save one too).")
@click.option("--max-timestep", type=int, default=None,
              help="Train only timesteps t ≤ N: for a finer level of a scale-space model, which starts at its "
                   "t_start (see build-model). Default: every t.")
@click.option("--relay-factor", type=int, default=None,
              help="Train a finer level of a scale-space model on what the sampler hands it from a level N times "
                   "coarser: patches area-averaged by N and upsampled back, the lost detail counted as noise, so the "
                   "level learns to redraw it. Needs --max-timestep; build-model then starts the level at "
                   "--t-start equal to it, N times finer than the level below.")
@click.option("--balance-slides", is_flag=True,
              help="Draw training patches slide by slide: each slide equally likely, whatever its patch count "
                   "(a large overview slide otherwise decides what the model draws). Kept on --resume.")
@click.option("--slide-weight", "slide_weights", multiple=True, metavar="PATTERN=W",
              help="With --balance-slides: draw the slides whose file name matches PATTERN (e.g. 'ovary_*') W times "
                   "as often as the others (default 1; 0: never); repeatable, the first match counts. Kept on "
                   "--resume.")
@click.option("--beta-schedule", type=click.Choice(BETA_SCHEDULES), default="linear", show_default=True,
              help="Noise schedule over the 300 timesteps. linear: the paper's (its last step keeps 22 % of the "
                   "image, so sampling from pure noise lacks the large-scale contrast, e.g. background); cosine "
                   "(Nichol & Dhariwal 2021) ends at pure noise: for the coarsest level of a scale-space model.")
@click.option("--init-from", type=click.Path(path_type=Path), default=None,
              help="Start from this model's weights instead of random ones; a new run only. Same --preset, or a "
                   "wider one (small to wide or medium): the model is widened so that it computes what it did; or a "
                   "deeper one (small to deep): the same weights iterate more NCA steps, and training adapts them.")
@click.option("--time-limit", default=None, metavar="DURATION",
              help="Stop after this much training time (e.g. 90s, 9m, 2.5h; a number: seconds), checkpointed, "
                   "exit code 0; --resume goes on. For a lent machine or a scheduler's time slot.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@threads_option()
def train(patches, out, preset, steps, batch_size, lr, device, precision, resume, overwrite, seed,
          val_every, sample_every, checkpoint_every, max_timestep, relay_factor, balance_slides, slide_weights,
          beta_schedule, init_from, time_limit, no_progress) -> None:
    """Train Diff-NCA with the paper's recipe (MSE + L1 on ε, Adam, ExponentialLR, EMA 0.99).

    Ctrl-C or SIGTERM saves a checkpoint; rerun with --resume to continue exactly where it stopped.
    """
    from nca_tiles.diffusion.schedule import ScheduleConfig
    from nca_tiles.training.trainer import TrainConfig, run_training

    seconds = None if time_limit is None else parse_duration("--time-limit", time_limit)
    config = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, seed=seed, val_every=val_every,
                         sample_every=sample_every, checkpoint_every=checkpoint_every, max_timestep=max_timestep,
                         relay_factor=relay_factor, balance_slides=balance_slides,
                         slide_weights=parse_slide_weights(slide_weights))
    trainer, last = run_training(patches, out, preset, config, device, precision,
                                 resume=resume, overwrite=overwrite, progress=not no_progress, init_from=init_from,
                                 schedule=ScheduleConfig(beta_schedule=beta_schedule),
                                 on_resume=lambda step: click.echo(f"resuming at step {step}"),
                                 time_limit=seconds)
    if trainer.stopped_at_time_limit:
        click.echo(f"stopped at the --time-limit of {time_limit} at step {trainer.step} of {steps}, "
                   f"checkpointed: --resume goes on")
    click.echo(f"trained to step {trainer.step}: loss {last.get('loss', float('nan')):.4f}; model in {out / 'model'}")


DURATION_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(option: str, value: str) -> float:
    """'90s', '9m', '2.5h', '1d' or a bare number of seconds, in seconds (> 0, finite)."""
    text = value.strip().lower()
    unit = DURATION_UNITS.get(text[-1:], None)
    number = text[:-1] if unit is not None else text
    try:
        seconds = float(number) * (unit or 1.0)
    except ValueError:
        seconds = float("nan")
    if not (math.isfinite(seconds) and seconds > 0):
        raise NcaTilesError(f"{option} takes a positive duration such as 90s, 9m or 2.5h, got {value!r}")
    return seconds


def parse_slide_weights(values: tuple[str, ...]) -> tuple[tuple[str, float], ...]:
    """--slide-weight PATTERN=W values as (pattern, weight) pairs, in the order given."""
    pairs = []
    for value in values:
        pattern, sep, weight = value.rpartition("=")
        try:
            if not (sep and pattern):
                raise ValueError
            pairs.append((pattern, float(weight)))
        except ValueError:
            raise NcaTilesError(f"--slide-weight takes PATTERN=weight (e.g. 'ovary_*=0.5'), got {value!r}") from None
    return tuple(pairs)
