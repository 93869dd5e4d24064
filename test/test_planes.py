"""Standard planes: stable indices and the name parser."""

import pytest

from cardiac_copilot_ros.planes import (
    PLANE_NAMES,
    PLANES,
    VIEW_NAMES,
    VIEWS,
    VIEWS_ENV,
    UnknownPlaneError,
    ViewsFileError,
    load_views_file,
    match_view,
    order_views,
    parse_plane,
    plane_index,
    plane_key,
    view_names,
)


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


@pytest.mark.parametrize("bad", ["A6C", "", "psax", 99, -1, True, None])
def test_unknown_rejected_with_valid_list(bad):
    with pytest.raises(UnknownPlaneError) as err:
        parse_plane(bad)
    for name in VIEW_NAMES:
        assert name in str(err.value)


def test_canonical_views_paper_planes_first():
    assert VIEW_NAMES[:3] == PLANE_NAMES
    assert [v.index for v in VIEWS] == list(range(len(VIEWS)))
    for name in ("A4C", "A2C", "A3C", "A5C", "SC4C", "SC-IVC", "PSAX-PM", "PSAX-APEX"):
        assert name in VIEW_NAMES


@pytest.mark.parametrize("text,name", [
    ("a4c", "A4C"), ("AP4", "A4C"), ("apical four chamber", "A4C"), ("4ch", "A4C"),
    ("ALAX", "A3C"), ("aplax", "A3C"), ("a3c", "A3C"), ("sub 4c", "SC4C"), ("S4C", "SC4C"),
    ("sc_ivc", "SC-IVC"), ("IVC", "SC-IVC"), ("SAX-PM", "PSAX-PM"), ("psax apex", "PSAX-APEX"),
    ("PSAX-apex", "PSAX-APEX"), ("ap5", "A5C"), ("ap2", "A2C"),
])
def test_view_aliases(text, name):
    assert parse_plane(text).name == name


def test_aliases_are_unambiguous():
    seen = {}
    for v in VIEWS:
        for text in (v.name, v.display_name, *v.aliases):
            k = plane_key(text)
            assert seen.setdefault(k, v.name) == v.name, (text, seen[k], v.name)


def test_user_views_file_extends_the_list(tmp_path, monkeypatch):
    f = tmp_path / "views.yaml"
    f.write_text("views:\n  - name: A4C-RV\n    display_name: RV-focused apical four-chamber\n"
                 "    aliases: [RVF4C]\n  - name: A4C\n    aliases: [Vierkammerblick]\n")
    with pytest.raises(UnknownPlaneError):
        parse_plane("rvf4c")
    monkeypatch.setenv(VIEWS_ENV, str(f))   # the environment (and so worker processes) sees it
    v = parse_plane("rvf4c")
    assert v.name == "A4C-RV" and v.index >= len(VIEWS) and "A4C-RV" in view_names()
    assert parse_plane("Vierkammerblick").name == "A4C" and parse_plane("A4C").index == 3
    assert order_views(["a4c-rv", "plax", "ap4"]) == ["PLAX", "A4C", "A4C-RV"]
    assert plane_index("PSAX-MV") == 2   # built-in indices never move


@pytest.mark.parametrize("text,err", [
    ("views: 3\n", "expected a list"),
    ("views:\n  - display_name: x\n", "needs a 'name'"),
    ("views:\n  - name: X1\n    colour: red\n", "unknown keys"),
    ("views:\n  - name: X2\n    aliases: [PLAX]\n", "already names view PLAX"),
    ("views:\n  - name: 'bad name!'\n", "must be 1-32"),
    ("views: [\n", "not valid YAML"),
])
def test_bad_views_file_names_file_and_entry(tmp_path, text, err):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(ViewsFileError, match=err) as exc:
        load_views_file(f)
    assert str(f) in str(exc.value)


def test_match_view_uses_the_models_list():
    names = ["PLAX", "A4C", "MY-VIEW"]             # MY-VIEW: not registered here
    assert match_view("my_view", names) == "MY-VIEW"
    assert match_view("apical 4 chamber", names) == "A4C"
    assert match_view(0, names) == "PLAX"
    with pytest.raises(UnknownPlaneError, match="valid planes: PLAX, A4C, MY-VIEW"):
        match_view("PSAX-AV", names)
