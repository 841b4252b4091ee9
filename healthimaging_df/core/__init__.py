"""The bottom layer: dates, log redaction, progress and frame helpers every other layer shares."""
