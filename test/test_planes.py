"""Standard planes: stable indices and the name parser."""

import pytest

from cardiac_copilot_ros.planes import PLANE_NAMES, PLANES, UnknownPlaneError, parse_plane, plane_index


def test_stable_indices():
    assert PLANE_NAMES == ("PLAX", "PSAX-AV", "PSAX-MV")
    assert [p.index for p in PLANES] == [0, 1, 2]


@pytest.mark.parametrize("text,name", [
    ("PLAX", "PLAX"), ("plax", "PLAX"), (" Plax ", "PLAX"),
    ("psax_av", "PSAX-AV"), ("PSAX-AV", "PSAX-AV"), ("psax-av", "PSAX-AV"), ("psax av", "PSAX-AV"),
    ("PSAXAV", "PSAX-AV"), ("psax_mv", "PSAX-MV"), ("PSAX-MV", "PSAX-MV"), ("psax.mv", "PSAX-MV"),
    ("Parasternal long axis", "PLAX"),
])
def test_common_spellings(text, name):
    assert parse_plane(text).name == name


def test_index_and_plane_objects():
    assert parse_plane(1).name == "PSAX-AV"
    assert parse_plane(PLANES[2]) is PLANES[2]
    assert plane_index("psax_mv") == 2


@pytest.mark.parametrize("bad", ["A4C", "", "psax", 3, -1, True, None])
def test_unknown_rejected_with_valid_list(bad):
    with pytest.raises(UnknownPlaneError) as err:
        parse_plane(bad)
    for name in PLANE_NAMES:
        assert name in str(err.value)
