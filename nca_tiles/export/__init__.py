"""Pyramidal outputs: arrays in, files out. The pyramid builder (``pyramid``), OME-TIFF that
QuPath opens (``ometiff``) and OME-Zarr (``omezarr``). See docs/design.md §5.

Add an export format as a module here, beside ``ometiff.py``.
"""
