"""Pipeline stages: one module per DVC stage, each a core function plus ``run``."""
