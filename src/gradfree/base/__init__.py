"""The ground floor every other package stands on: errors, numerics policy, atomic IO, paths,
provenance, strict config files and plain plots. Nothing here imports another gradfree package.
"""
