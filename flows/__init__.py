"""Prefect flows of cellpipe: `training` (DVC → publish), `scoring` (slides → Triton)."""
