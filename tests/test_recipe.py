"""Recipe: schema, validation (one-line errors), schedules, YAML round trip, content hash."""

from __future__ import annotations

import pytest

from vlmexp.errors import RecipeError
from vlmexp.merge.recipe import Recipe, schedule_value


def base_dict(**over) -> dict:
    data = {
        "vlmexp_recipe": 1,
        "method": "ties",
        "base": {"path": "models/base", "weights_sha256": "a" * 64},
        "donors": [{"name": "vqa", "path": "models/vqa"},
                   {"name": "text", "path": "models/text", "map": "llm_to_vlm"}],
        "parameters": {"normalize": True, "lambda": 1.0},
        "components": {
            "vision": {"vqa": {"weight": 0.2}},
            "language": {"vqa": {"weight": [0.1, 0.6, 0.9], "density": 0.7},
                         "text": {"weight": 0.5, "density": 0.7}},
        },
        "take": {"projector": "vqa"},
        "dtype": "float32",
        "seed": 3,
    }
    data.update(over)
    return data


def test_round_trip_and_hash_stability():
    r = Recipe.from_dict(base_dict())
    again = Recipe.from_yaml_text(r.to_yaml())
    assert again.to_dict() == r.to_dict()
    assert again.content_hash() == r.content_hash()
    # number spelling and key order do not change the hash
    d = base_dict(parameters={"lambda": 1, "normalize": True})
    assert Recipe.from_dict(d).content_hash() == r.content_hash()
    # the base is pinned by its digest, so its path does not count; a donor's path does
    moved = base_dict(base={"path": "elsewhere/base", "weights_sha256": "a" * 64})
    assert Recipe.from_dict(moved).content_hash() == r.content_hash()
    changed = base_dict(seed=4)
    assert Recipe.from_dict(changed).content_hash() != r.content_hash()


# base_dict()'s hash and YAML before recipes could record a revision: folder recipes keep both
FOLDER_RECIPE_HASH = "47f9d5da553998a9ef98ce919a427bb2ea561423d2272dfba9cef7d1bbbd6995"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def test_a_folder_recipe_has_no_revision_and_the_hash_it_always_had():
    r = Recipe.from_dict(base_dict())
    assert r.content_hash() == FOLDER_RECIPE_HASH
    assert "revision" not in r.to_yaml()
    assert r.to_yaml().splitlines()[2] == "base: {path: models/base, weights_sha256: " + "a" * 64 + "}"
    assert r.base.revision is None and all(d.revision is None for d in r.donors)


def test_a_hub_revision_round_trips_and_counts_in_the_hash():
    hub = base_dict(base={"path": "org/base", "revision": COMMIT, "weights_sha256": "a" * 64})
    r = Recipe.from_dict(hub)
    assert r.base.revision == COMMIT
    assert r.to_yaml().splitlines()[2] == (
        f"base: {{path: org/base, revision: {COMMIT}, weights_sha256: {'a' * 64}}}")
    again = Recipe.from_yaml_text(r.to_yaml())
    assert again.base.revision == COMMIT and again.content_hash() == r.content_hash()
    # the digest pins the weights, so the path drops out of the hash; the revision does not
    other_path = base_dict(base={"path": "org/renamed", "revision": COMMIT,
                                 "weights_sha256": "a" * 64})
    assert Recipe.from_dict(other_path).content_hash() == r.content_hash()
    other_commit = base_dict(base={"path": "org/base", "revision": "f" * 40,
                                   "weights_sha256": "a" * 64})
    assert Recipe.from_dict(other_commit).content_hash() != r.content_hash()
    assert r.content_hash() != FOLDER_RECIPE_HASH
    assert r.flat_params()["base.revision"] == COMMIT


def test_with_revisions_sets_only_the_named_models():
    r = Recipe.from_dict(base_dict())
    pinned = r.with_revisions({"base": COMMIT, "vqa": None})
    assert pinned.base.revision == COMMIT
    assert [d.revision for d in pinned.donors] == [None, None]
    assert pinned.with_revisions({}).to_dict() == pinned.to_dict()
    assert r.to_dict() == Recipe.from_dict(base_dict()).to_dict()  # r itself is unchanged
    with pytest.raises(RecipeError, match=r"base\.revision: 5 is not a revision"):
        Recipe.from_dict(base_dict(base={"path": "org/base", "revision": 5}))


def test_schedule_interpolates_like_mergekit_gradient():
    knots = [0.1, 0.6, 0.9]
    assert schedule_value(knots, 0.0) == pytest.approx(0.1)
    assert schedule_value(knots, 0.25) == pytest.approx(0.35)
    assert schedule_value(knots, 0.5) == pytest.approx(0.6)
    assert schedule_value(knots, 0.75) == pytest.approx(0.75)
    assert schedule_value(knots, 1.0) == pytest.approx(0.9)
    assert schedule_value(0.4, 0.3) == 0.4
    r = Recipe.from_dict(base_dict())
    assert r.resolve("language", "vqa", 0.25) == pytest.approx({"weight": 0.35, "density": 0.7})
    assert r.participants("language") == ["vqa", "text"]
    assert r.participants("head") == []


@pytest.mark.parametrize(
    ("over", "message"),
    [
        ({"method": "average"}, "unknown method 'average'"),
        ({"parameters": {"t": 0.5}}, "parameters.t: method 'ties' does not take 't'"),
        ({"components": {"vision": {"vqa": {"weight": 0.2, "density": 1.5}}}},
         "components.vision.vqa.density: 1.5 is out of range [0, 1]"),
        ({"components": {"visual": {"vqa": {"weight": 0.2}}}},
         "components.visual: unknown component"),
        ({"components": {"vision": {"ocr": {"weight": 0.2}}}},
         "components.vision.ocr: unknown donor"),
        ({"components": {"vision": {"vqa": {"weight": "high"}}}},
         "components.vision.vqa.weight: 'high' is not a number"),
        ({"components": {"vision": {"vqa": {"density": 0.5}}}},
         "components.vision.vqa: missing required parameter 'weight'"),
        ({"take": {"head": "ocr"}}, "take.head: unknown donor 'ocr'"),
        ({"dtype": "int8"}, "dtype: 'int8' is not one of"),
        ({"colour": 1}, "unknown key 'colour'"),
        ({"parameters": {"normalize": "yes"}}, "parameters.normalize: 'yes' is not true/false"),
        ({"components": {"projector": {"vqa": {"weight": 1.0}}}},
         "components.projector: the component is also in 'take'"),
    ],
)
def test_validation_errors_are_one_line_and_name_the_fault(over, message):
    with pytest.raises(RecipeError) as err:
        Recipe.from_dict(base_dict(**over), source="r.yaml")
    text = str(err.value)
    assert "\n" not in text
    assert text.startswith("r.yaml: ")
    assert message in text


def test_donor_count_bounds():
    d = base_dict(method="slerp", parameters={},
                  components={"language": {"vqa": {"t": 0.5}, "text": {"t": 0.5}}}, take={})
    with pytest.raises(RecipeError, match="at most 1 donor"):
        Recipe.from_dict(d)


def test_from_yaml_reports_file_and_bad_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: ties\nbase: [unclosed\n")
    with pytest.raises(RecipeError, match=r"bad\.yaml: not valid YAML \(line"):
        Recipe.from_yaml(bad)
    with pytest.raises(RecipeError, match="cannot read recipe"):
        Recipe.from_yaml(tmp_path / "missing.yaml")


def test_flat_params_for_tracking():
    flat = Recipe.from_dict(base_dict()).flat_params()
    assert flat["method"] == "ties"
    assert flat["components.language.vqa.weight"] == "[0.1, 0.6, 0.9]"
    assert flat["donors.text.map"] == "llm_to_vlm"
    assert flat["take.projector"] == "vqa"
