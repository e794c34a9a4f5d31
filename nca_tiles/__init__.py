"""nca-tiles: synthetic whole-slide images from a Diff-NCA denoising diffusion model.

The public API, one function per stage (examples/api_end_to_end.py runs the pipeline with it)::

    open_slide(path)                          read any slide format (wsi.slide)
    extract_patches(slides, out, ...)         tissue patches into a zarr store (training.patches)
    train(patches, out, preset, TrainConfig(...), device)   a training run (training.trainer.run_training)
    load_model(path=None, device="auto")      a single- or scale-space model for sampling: a path, or "default" or "fast" (bundled); None: "default"
    generate_region(model, height, width)     a region in memory, level by level (diffusion.levels)
    load_synthesis_model(path=None)           the same as load_model (its first name)
    synthesize_slide(SlideRequest(...), model)             a slide of any size (synthesis.slide_job)
    export_canvas(work_dir, out, ...)         re-export a kept canvas (synthesis.export_job)
    evaluate_model(model, patches, ...)       metrics against held-out real patches (evaluation.protocol)
    evaluate_patches(train, heldout, synthetic), evaluate_slide(slide, chunk)
    run_demo(out, ...)                        the whole pipeline on the bundled sample slide

Every error a user can cause is an ``NcaTilesError`` with a one-line message. The names are
imported on first use, so ``import nca_tiles`` stays cheap (no torch, zarr or dask).
"""

__version__ = "0.1.0"

# public name -> (module, attribute)
_API: dict[str, tuple[str, str]] = {
    "NcaTilesError": ("nca_tiles.errors", "NcaTilesError"),
    "open_slide": ("nca_tiles.wsi.slide", "open_slide"),
    "extract_patches": ("nca_tiles.training.patches", "extract_patches"),
    "open_patch_store": ("nca_tiles.training.patches", "open_patch_store"),
    "train": ("nca_tiles.training.trainer", "run_training"),
    "TrainConfig": ("nca_tiles.training.trainer", "TrainConfig"),
    "load_model": ("nca_tiles.diffusion.levels", "load_synthesis_model"),
    "generate_region": ("nca_tiles.diffusion.levels", "generate_levels"),
    "load_synthesis_model": ("nca_tiles.diffusion.levels", "load_synthesis_model"),
    "synthesize_slide": ("nca_tiles.synthesis.slide_job", "synthesize_slide"),
    "SlideRequest": ("nca_tiles.synthesis.slide_job", "SlideRequest"),
    "export_canvas": ("nca_tiles.synthesis.export_job", "export_canvas"),
    "evaluate_model": ("nca_tiles.evaluation.protocol", "evaluate_model"),
    "evaluate_patches": ("nca_tiles.evaluation.protocol", "evaluate_patches"),
    "evaluate_slide": ("nca_tiles.evaluation.protocol", "evaluate_slide"),
    "run_demo": ("nca_tiles.demo", "run_demo"),
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> object:
    import importlib

    if name not in _API:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attribute = _API[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value  # once imported, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*__all__, *(name for name in globals() if not name.startswith("_"))})
