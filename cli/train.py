"""``nca-tiles train``: train a Diff-NCA on a patch store."""

from __future__ import annotations

from pathlib import Path

import click

from nca_tiles_cli.options import device_option, seed_option


@click.command(short_help="Train a Diff-NCA model on a patch store.")
@click.option("--patches", type=click.Path(path_type=Path), required=True, help="Patch store from extract-patches.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Run directory (checkpoint, model/, samples/, metrics.jsonl).")
@click.option("--preset", default="small", show_default=True, help="Model preset: paper (GPU), small (CPU), tiny (tests).")
@click.option("--steps", type=int, default=200_000, show_default=True, help="Total training steps (the paper: 200 000).")
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option("--lr", type=float, default=1.6e-3, show_default=True)
@device_option()
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto", show_default=True,
              help="auto: bf16 autocast on CUDA, fp32 on CPU (bf16 is very slow on CPUs).")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
@click.option("--overwrite", is_flag=True, help="Start afresh in an existing --out.")
@seed_option()
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the model (CUDA).")
@click.option("--val-every", type=int, default=500, show_default=True, help="Steps between validation losses.")
@click.option("--sample-every", type=int, default=2000, show_default=True, help="Steps between sample PNGs (0: never).")
@click.option("--checkpoint-every", type=int, default=500, show_default=True)
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def train(patches, out, preset, steps, batch_size, lr, device, precision, resume, overwrite, seed, compile_,
          val_every, sample_every, checkpoint_every, no_progress) -> None:
    """Train Diff-NCA with the paper's recipe (MSE + L1 on ε, Adam, ExponentialLR, EMA 0.99).

    Ctrl-C saves a checkpoint; rerun with --resume to continue exactly where it stopped.
    """
    import shutil

    from nca_tiles.errors import NcaTilesError
    from nca_tiles.model import preset as get_preset
    from nca_tiles.patches import open_patch_store
    from nca_tiles.sampling import resolve_device, resolve_precision
    from nca_tiles.schedule import ScheduleConfig
    from nca_tiles.training import Trainer, TrainConfig

    for name, value in (("--val-every", val_every), ("--checkpoint-every", checkpoint_every)):
        if value < 1:
            raise NcaTilesError(f"{name} must be ≥ 1")
    if sample_every < 0:
        raise NcaTilesError("--sample-every must be ≥ 0")
    model_config = get_preset(preset)
    torch_device = resolve_device(device)
    precision = resolve_precision(torch_device, precision)
    if precision == "bf16" and torch_device.type == "cpu":
        raise NcaTilesError("bf16 on a CPU is hundreds of times slower than fp32: use --precision fp32")
    replace = out.exists() and any(out.iterdir()) and not resume
    if replace and not overwrite:
        raise NcaTilesError(f"{out} is not empty: pass --resume to continue it or --overwrite to start afresh")
    store = open_patch_store(patches)
    config = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, seed=seed, val_every=val_every,
                         sample_every=sample_every, checkpoint_every=checkpoint_every)
    trainer = Trainer(store, out, model_config, ScheduleConfig(), config, torch_device, precision,
                      compile=compile_, preset_name=preset)
    if replace:
        shutil.rmtree(out)  # only now that the new run is known to start
    if resume:
        trainer.resume()
        click.echo(f"resuming at step {trainer.step}")
    last = trainer.run(progress=not no_progress)
    click.echo(f"trained to step {trainer.step}: loss {last.get('loss', float('nan')):.4f}; model in {out / 'model'}")
