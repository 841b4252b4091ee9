"""The machinery of ``healthimaging_df.polars``: expression reading, translation, the source, SQL.

``expr`` reads Polars' serialised trees; ``conds`` turns one conjunct into conditions;
``translate`` builds the query and says what was pushed; ``source`` is the IO source and
``explain``; ``sql`` runs Polars SQL on it. The public names live in ``healthimaging_df.polars``.
"""
