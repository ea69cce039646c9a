"""A module that fails on import, as a user's module can."""

raise RuntimeError("no GPU driver here")
