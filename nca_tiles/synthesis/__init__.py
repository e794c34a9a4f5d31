"""Synthesizing a slide of any size: the request and all its validation and the whole job
(``slide_job``), the work dir with its zarr canvas and manifest (``workdir``), sweeps and executors
(``sweeps``), the plan and dry run (``plan``), disk accounting (``diskspace``) and re-export of a
kept work dir (``export_job``). See docs/design.md §3, §6.

Add a sampler in ``sweeps.py`` (and its job fields in ``workdir.py``).
"""
