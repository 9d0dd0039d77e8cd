"""The top layer: a run's stages, its report, and the store command, as the CLI calls them."""
