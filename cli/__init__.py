"""The click front end of nca-tiles (installed as the package ``nca_tiles_cli``)."""
