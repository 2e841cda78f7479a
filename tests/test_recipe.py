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
