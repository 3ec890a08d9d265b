"""Foundations every other package uses: errors, units, YAML checking, paths, atomic
writes, progress reporting, the model graph and the layer inventory. Imports nothing above it."""
