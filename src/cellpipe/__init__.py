"""cellpipe: a batch system for microscopy cell images (ingest → train → serve → score)."""

__version__ = "0.1.0"
