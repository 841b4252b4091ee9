"""``df.ahi.sql`` errors: what names columns and syntax is shown, what quotes cells is not."""

from __future__ import annotations

import pandas as pd
import pytest

from healthimaging_df.accessor import SQLQueryError


def test_a_mistyped_column_is_named(frame: pd.DataFrame) -> None:
    secret = str(frame["PatientID"].dropna().iloc[0])
    with pytest.raises(SQLQueryError) as raised:
        frame.ahi.sql(f"SELECT PatientNmae FROM image_sets WHERE PatientID = '{secret}'")
    text = str(raised.value)
    assert raised.value.kind == "BinderException"
    assert "PatientNmae" in text
    assert secret not in text


def test_a_syntax_error_is_shown_without_literals(frame: pd.DataFrame) -> None:
    with pytest.raises(SQLQueryError) as raised:
        frame.ahi.sql("SELECT * FORM image_sets WHERE PatientID = 'SECRET-1'")
    text = str(raised.value)
    assert raised.value.kind == "ParserException"
    assert "syntax error" in text
    assert "SECRET-1" not in text
