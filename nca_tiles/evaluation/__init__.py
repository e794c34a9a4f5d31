"""Offline realism measurement: metrics (``metrics``: random-feature FD/KID, stain W1, C2ST,
seams), nuclei statistics (``nuclei``), power spectra (``spectrum``) and the protocol that brackets
each by a real-vs-real floor and a noise ceiling (``protocol``). See docs/design.md §8.
"""
