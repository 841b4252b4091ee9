"""The QIDO-RS vocabulary of the local service and of the library's client agree (issue 27).

``healthimaging_df/local`` imports nothing from the library, so each keeps its own copy of the
documented search keys and limits; this test is what keeps the two copies one definition.
"""

from __future__ import annotations

import pytest

from healthimaging_df.local import qido as local_qido
from healthimaging_df.local import qido_match

model = pytest.importorskip("healthimaging_df.dicomweb._model")


def test_search_keys_per_level_are_the_same() -> None:
    assert qido_match.STUDY_KEYS == model.STUDY_KEYS
    assert qido_match.SERIES_KEYS == model.SERIES_KEYS
    assert qido_match.INSTANCE_KEYS == model.INSTANCE_KEYS
    for level, operation in model.OPERATIONS.items():
        assert qido_match.KEYS[operation] == model.SEARCH_KEYS[level]


def test_operation_names_and_limits_are_the_same() -> None:
    assert set(model.OPERATIONS.values()) == {
        qido_match.STUDIES,
        qido_match.SERIES,
        qido_match.INSTANCES,
    }
    assert local_qido.MAX_LIMIT == model.MAX_LIMIT
    assert local_qido.MAX_OFFSET == model.MAX_OFFSET
    assert local_qido.MAX_INCLUDEFIELD == model.MAX_INCLUDEFIELD
    assert local_qido.OLDER_RECORD_CAP == model.OLDER_RECORD_CAP


def test_tags_and_vrs_are_the_dictionarys() -> None:
    """The library reads tags and VRs from pydicom; the service's table must say the same."""
    for keyword, (tag, vr, _) in qido_match.ATTRIBUTES.items():
        assert model.keyword(tag) == keyword, keyword
        assert model.vr_of(keyword) == vr, keyword


def test_the_row_keys_are_the_levels_uids() -> None:
    uids = {"studies": "0020000D", "series": "0020000E", "instances": "00080018"}
    for level, keyword in model.ROW_KEY.items():
        assert qido_match.ATTRIBUTES[keyword][0] == uids[level]
        assert local_qido._LEVEL_UID[model.OPERATIONS[level]] == uids[level]
