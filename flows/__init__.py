"""Prefect flows of cellpipe: `training` (DVC pipeline → publish) and `scoring` (slides → Triton)."""
