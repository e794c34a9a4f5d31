"""nca-tiles: synthetic whole-slide images from a Diff-NCA denoising diffusion model."""

__version__ = "0.1.0"
