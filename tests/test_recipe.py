"""Recipes: YAML <-> validated stages, named recipes, and one-line errors for bad input."""

from __future__ import annotations

from pathlib import Path

import pytest

from nncompress.errors import RecipeError
from nncompress.prune import MagnitudePruneConfig
from nncompress.recipe import FineTuneConfig, Recipe, Stage

YAML = """\
name: mine
stages:
  - technique: magnitude_prune
    params: {sparsity: 0.9, scope: global, steps: 3, epochs_per_step: 1}
  - fine_tune: {epochs: 2, lr: 0.0001}
  - evaluate: {}
"""


def python_recipe() -> Recipe:
    return Recipe("mine", [
        Stage.technique("magnitude_prune", sparsity=0.9, scope="global", steps=3,
                        epochs_per_step=1),
        Stage.fine_tune(epochs=2, lr=1e-4),
        Stage.evaluate(),
    ])


def test_yaml_builds_validated_frozen_stages() -> None:
    recipe = Recipe.from_yaml(YAML)
    assert recipe.name == "mine"
    assert [s.kind for s in recipe.stages] == ["technique", "fine_tune", "evaluate"]
    prune = recipe.stages[0].config
    assert isinstance(prune, MagnitudePruneConfig)
    assert (prune.sparsity, prune.scope, prune.steps) == (0.9, "global", 3)
    assert recipe.stages[1].config == FineTuneConfig(epochs=2, lr=1e-4)
    with pytest.raises(Exception, match="frozen"):
        prune.sparsity = 0.5  # type: ignore[misc]


def test_python_built_recipe_equals_yaml_built() -> None:
    assert python_recipe() == Recipe.from_yaml(YAML)
    assert isinstance(python_recipe().stages, tuple)


def test_yaml_and_dict_round_trip() -> None:
    recipe = Recipe.from_yaml(YAML)
    assert Recipe.from_yaml(recipe.to_yaml()) == recipe
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    again = Recipe.from_yaml(recipe.to_yaml())
    assert again.to_yaml() == recipe.to_yaml()
    assert recipe.to_dict()["stages"][0]["params"]["sparsity"] == 0.9


def test_yaml_file_and_resolve(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text(YAML.replace("name: mine\n", ""))     # name defaults to the file stem
    from_file = Recipe.from_yaml(path)
    assert from_file == python_recipe()
    assert Recipe.resolve(path) == from_file
    assert Recipe.resolve(str(path)) == from_file
    assert Recipe.resolve(from_file) is from_file


def test_named_recipes() -> None:
    assert "magnitude-prune" in Recipe.names()
    recipe = Recipe.named("magnitude-prune")
    assert Recipe.resolve("magnitude-prune") == recipe
    cfg = recipe.stages[0].config
    assert (recipe.stages[0].name, cfg.sparsity, cfg.scope) == ("magnitude_prune", 0.9, "global")
    assert cfg.steps > 1 and cfg.epochs_per_step >= 1                 # iterative pruning
    assert recipe.stages[-1].kind == "fine_tune"
    with pytest.raises(RecipeError, match=r"unknown recipe 'nope'; known: .*magnitude-prune"):
        Recipe.named("nope")
    with pytest.raises(RecipeError, match="unknown recipe 'nope'"):
        Recipe.resolve("nope")


@pytest.mark.parametrize("name", Recipe.names())
def test_every_packaged_recipe_loads_and_round_trips(name: str) -> None:
    recipe = Recipe.named(name)
    assert recipe.name == name
    assert Recipe.from_yaml(recipe.to_yaml()) == recipe


def stage_yaml(stage: str) -> str:
    return f"name: bad\nstages:\n  - {stage}\n"


@pytest.mark.parametrize(("text", "expected"), [
    (stage_yaml("{technique: magnitude_prun, params: {sparsity: 0.5}}"),
     "recipe stage 1: unknown technique 'magnitude_prun'; known: "),
    (stage_yaml("{technique: magnitude_prune, params: {sparsty: 0.5}}"),
     "recipe stage 1 (magnitude_prune): unknown parameter 'sparsty'"),
    (stage_yaml("{technique: magnitude_prune, params: {sparsity: '0.5'}}"),
     "recipe stage 1 (magnitude_prune): parameter 'sparsity' must be a valid number (got '0.5')"),
    (stage_yaml("{technique: magnitude_prune, params: {sparsity: 0.5, steps: true}}"),
     "recipe stage 1 (magnitude_prune): parameter 'steps' must be a valid integer (got True)"),
    (stage_yaml("{technique: magnitude_prune, params: {sparsity: 1.5}}"),
     "recipe stage 1 (magnitude_prune): parameter 'sparsity' must be < 1 (got 1.5)"),
    (stage_yaml("{technique: magnitude_prune, params: {sparsity: 0.5, scope: glob}}"),
     "recipe stage 1 (magnitude_prune): parameter 'scope' must be 'layer' or 'global' "
     "(got 'glob')"),
    (stage_yaml("{technique: magnitude_prune, params: {scope: layer}}"),
     "recipe stage 1 (magnitude_prune): missing required parameter 'sparsity'"),
    (stage_yaml("{technique: magnitude_prune, params: [1, 2]}"),
     "recipe stage 1 (magnitude_prune): params must be a mapping"),
    (stage_yaml("{technique: magnitude_prune, parms: {sparsity: 0.5}}"),
     "recipe stage 1 (magnitude_prune): unknown stage key 'parms'"),
    (stage_yaml("{prune: {sparsity: 0.5}}"),
     "recipe stage 1: unknown stage key 'prune'; expected one of technique, fine_tune, evaluate"),
    (stage_yaml("{fine_tune: {epochs: 1, lr: 0}}"),
     "recipe stage 1 (fine_tune): parameter 'lr' must be > 0 (got 0)"),
    (stage_yaml("{fine_tune: {epochs: -1}}"),
     "recipe stage 1 (fine_tune): parameter 'epochs' must be >= 0 (got -1)"),
    (stage_yaml("{evaluate: {every: 2}}"),
     "recipe stage 1 (evaluate): unknown parameter 'every'"),
    (stage_yaml("just-a-string"), "recipe stage 1: a stage must be a mapping"),
    ("name: bad\nstages: []\n", "recipe 'bad' has no stages"),
    ("name: bad\n", "recipe 'bad' has no stages"),
    ("name: bad\nstagse: []\n", "recipe: unknown key 'stagse'"),
    ("- a\n- b\n", "a recipe must be a mapping with keys 'name' and 'stages' (got list"),
    ("name: bad\nstages: [\n  - {evaluate: {}\n", "invalid YAML at line"),
])
def test_invalid_recipes_raise_one_line_errors(text: str, expected: str) -> None:
    with pytest.raises(RecipeError) as info:
        Recipe.from_yaml(text)
    message = str(info.value)
    assert "\n" not in message
    assert expected in message


def test_second_stage_is_numbered() -> None:
    text = YAML.replace("fine_tune: {epochs: 2", "fine_tune: {epochs: 2.5")
    with pytest.raises(RecipeError, match=r"^recipe stage 2 \(fine_tune\): parameter 'epochs'"):
        Recipe.from_yaml(text)


def test_missing_file_and_wrong_types(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match=r"recipe file '.*missing\.yaml' does not exist"):
        Recipe.from_yaml(tmp_path / "missing.yaml")
    with pytest.raises(RecipeError, match="does not exist"):
        Recipe.resolve(str(tmp_path / "missing.yaml"))
    with pytest.raises(RecipeError, match="got int"):
        Recipe.resolve(3)  # type: ignore[arg-type]


def test_python_errors_name_the_technique_and_value() -> None:
    with pytest.raises(RecipeError, match=r"^magnitude_prune: parameter 'sparsity' must be < 1 "
                                          r"\(got 1\.5\)$"):
        Stage.technique("magnitude_prune", sparsity=1.5)
    with pytest.raises(RecipeError, match=r"unknown parameter 'sparsty' \(did you mean "
                                          r"'sparsity'\?\); known: sparsity, scope"):
        Stage.technique("magnitude_prune", sparsty=0.5)
    with pytest.raises(RecipeError, match="unknown technique 'zap'"):
        Stage.technique("zap")
    with pytest.raises(RecipeError, match="has no stages"):
        Recipe("empty", [])
    with pytest.raises(RecipeError, match="expected a Stage"):
        Recipe("dicts", [{"evaluate": {}}])  # type: ignore[list-item]


def test_several_problems_are_counted_on_one_line() -> None:
    with pytest.raises(RecipeError) as info:
        Stage.technique("magnitude_prune", sparsity=2.0, steps=0)
    assert "\n" not in str(info.value)
    assert "(and 1 more problem)" in str(info.value)


def test_yaml_is_safe_loaded() -> None:
    text = "name: !!python/object/apply:os.system ['echo hacked']\nstages: [{evaluate: {}}]\n"
    with pytest.raises(RecipeError, match=r"invalid YAML at line 1.*constructor"):
        Recipe.from_yaml(text)


def test_a_multi_model_method_in_a_recipe_says_how_to_run_it() -> None:
    with pytest.raises(RecipeError, match=r"multi-model method.*nncompress zip"):
        Recipe.from_dict({"name": "r", "stages": [{"technique": "multi_task_zipping"}]})
