"""Value classes, errors and small Linux helpers that every other package uses.

Imports nothing above it."""
