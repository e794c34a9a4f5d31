"""Whole-slide images in: one reader for every input format (OpenSlide formats, OME-TIFF with
SubIFD pyramids, plain TIFF, PNG/JPEG, OME-Zarr), slide descriptions, thumbnails, tissue masks.

Add an input format in ``slide.py``.
"""
