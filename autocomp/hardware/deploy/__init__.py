"""Deployable artefacts per target and the runtimes that check them outside Python."""
