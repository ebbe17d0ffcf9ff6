"""The incseg service: HTTP API, training workers, model registry and hot swap (issue 8)."""
