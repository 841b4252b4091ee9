"""``python -m healthimaging_df``: the command line."""

from healthimaging_df.cli.app import main

raise SystemExit(main())
