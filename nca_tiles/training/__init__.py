"""Training: patch stores extracted from slides (``patches``), the trainer with its resumable run
directory (``trainer``), and sample grids written during training (``sample_grid``).
"""
