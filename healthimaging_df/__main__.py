"""``python -m healthimaging_df``: the command line."""

from healthimaging_df.cli import main

raise SystemExit(main())
