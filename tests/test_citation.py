"""What a first visitor needs to reuse and cite the tool: a licence file that says what pyproject
says, citation metadata that track the version, and the paper's reference in the README."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from nca_tiles import __version__

REPO = Path(__file__).resolve().parents[1]

AUTHORS = [("Kalkhof", "John"), ("Kühn", "Arlene"), ("Frisch", "Yannik"), ("Mukhopadhyay", "Anirban")]
PAPER = "Frequency-Time Diffusion with Neural Cellular Automata"


def test_licence_file_matches_pyproject():
    licence = (REPO / "LICENSE").read_text()
    assert licence.startswith("MIT License\n")
    assert "Copyright (c) 2026 the nca-tiles authors" in licence
    assert "THE SOFTWARE IS PROVIDED \"AS IS\"" in licence
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["license"] == {"text": "MIT"}


def test_citation_cff():
    yaml = pytest.importorskip("yaml")
    cff = yaml.safe_load((REPO / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0" and cff["type"] == "software"
    assert cff["version"] == __version__  # bump it with nca_tiles.__version__
    assert cff["license"] == "MIT" and cff["authors"] and cff["title"].startswith("nca-tiles")
    (paper,) = cff["references"]
    assert paper["title"] == PAPER and paper["year"] == 2024
    assert [(a["family-names"], a["given-names"]) for a in paper["authors"]] == AUTHORS
    assert paper["url"] == "https://arxiv.org/abs/2401.06291"
    assert {i["value"] for i in paper["identifiers"]} == {"arXiv:2401.06291", "10.48550/arXiv.2401.06291"}


def test_readme_cites_the_paper_and_names_the_sample_slides_licence():
    readme = (REPO / "README.md").read_text()
    section = readme.split("\n## Citing and licences\n", 1)[1].split("\n## ", 1)[0]
    assert "John Kalkhof, Arlene Kühn, Yannik Frisch, and Anirban Mukhopadhyay" in section
    assert PAPER in section and "arXiv:2401.06291" in section
    bibtex = re.search(r"```bibtex\n(.*?)```", section, re.S).group(1)
    assert "eprint        = {2401.06291}" in bibtex
    assert 'Kalkhof, John and K{\\"u}hn, Arlene and Frisch, Yannik and Mukhopadhyay, Anirban' in bibtex
    assert f"version = {{{__version__}}}" in bibtex
    assert "cmu_small_region.svs" in section and "CC0 1.0" in section and "[`LICENSE`](LICENSE)" in section
    assert "CC0 1.0" in (REPO / "nca_tiles" / "data" / "sample" / "README.md").read_text()
