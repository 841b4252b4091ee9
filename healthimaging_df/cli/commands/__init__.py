"""The service commands of ``healthimaging-df``: one module per command group.

Each module has ``register(commands)``, which adds its subparsers and sets ``handler(args) -> int``
on them; ``healthimaging_df.cli.app`` maps the exceptions they raise to exit codes.
"""
