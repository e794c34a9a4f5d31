"""The Diff-NCA diffusion model: the cell rule (``model``: weights only), the noise schedule
(``schedule``: arithmetic only), the sampling pipeline (``pipeline``: the loop, written out),
counter-based randomness (``rng``), moves between scale-space levels (``scale_space``) and model
files on disk (``checkpoint``). See docs/design.md §1–2, §7.
"""
