"""The ``cellpipe`` subcommands that are not pipeline stages: ``triton …`` and ``score``.

Each module adds its subcommands to the parser (``add_commands``) and holds their
handlers; the handlers call library code and print what a user reads.
"""
