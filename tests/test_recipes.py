import pytest

from fasttricks.recipes import PIPELINES, RecipeError, load_recipe, merge, parse_set, toy_override

TOY = PIPELINES / "overrides" / "toy.yaml"


RECIPES = sorted(p for p in PIPELINES.rglob("*.yaml") if p.parent.name != "overrides")


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_shipped_recipe_is_valid_alone_and_with_the_toy_override(path):
    recipe = load_recipe(path)
    assert recipe.stages
    for override in {TOY, toy_override(recipe)}:  # the one ablate's README commands give, and train --data toy's
        toy = load_recipe(path, [override])
        assert toy.model.arch.startswith("test_") and toy.model.pretrained is None  # timm's tiny ones, never downloads
        assert all(s.batch_size == 64 for s in toy.stages)


def test_set_addresses_nested_keys_list_items_and_every_item():
    r = load_recipe("baseline", sets=["stages.0.epochs=3", "stages.*.optimizer.name=adam",
                                      "model.arch=resnet50", "data.crop_scale=[0.35, 1]"])
    assert r.stages[0].epochs == 3 and r.stages[0].optimizer.name == "adam"
    assert r.model.arch == "resnet50" and r.data.crop_scale == (0.35, 1.0)


def test_unknown_key_names_the_key_and_the_allowed_ones():
    with pytest.raises(RecipeError) as e:
        load_recipe("baseline", sets=["stages.0.optimiser.lr=0.1"])
    msg = str(e.value)
    assert "stages.0.optimiser" in msg and "allowed keys here:" in msg and "optimizer" in msg


def test_bad_choice_names_the_allowed_values_and_what_was_given():
    with pytest.raises(RecipeError) as e:
        load_recipe("baseline", sets=["stages.0.optimizer.name=lion"])
    msg = str(e.value)
    assert "stages.0.optimizer.name" in msg and "'sgd', 'adam' or 'adamw'" in msg and "'lion'" in msg


@pytest.mark.parametrize("assignment,fragment", [
    ("stages.0.epochs=0", "greater than or equal to 1"),
    ("stages.0.resolution.min=300", "min (300) cannot exceed max"),
    ("data.val_crop=400", "val_crop (400) cannot exceed val_resize"),
    ("stages.5.epochs=1", "stages.5: index 5 is out of range"),
    ("stages", "dotted.key=value"),
])
def test_invalid_values_are_reported_with_their_reason(assignment, fragment):
    with pytest.raises(RecipeError) as e:
        load_recipe("baseline", sets=[assignment])
    assert fragment in str(e.value)


def test_base_recipes_are_merged_and_cycles_are_caught(tmp_path):
    (tmp_path / "child.yaml").write_text("base: baseline\nname: child\nstages: {0: {epochs: 2}}\n")
    child = load_recipe(tmp_path / "child.yaml")
    base = load_recipe("baseline")
    assert child.name == "child" and child.stages[0].epochs == 2
    assert child.stages[0].optimizer == base.stages[0].optimizer
    (tmp_path / "a.yaml").write_text("base: b.yaml\nname: a\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\nname: b\n")
    with pytest.raises(RecipeError, match="cycle"):
        load_recipe(tmp_path / "a.yaml")


def test_missing_recipe_and_bad_yaml_are_clear(tmp_path):
    with pytest.raises(RecipeError, match="baseline"):  # lists the known recipes
        load_recipe("no-such-recipe")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)
    with pytest.raises(RecipeError, match="no override file"):
        load_recipe("baseline", overrides=[tmp_path / "none.yaml"])


def test_merge_semantics():
    assert merge({"a": {"b": 1, "c": 2}}, {"a": {"c": 3}}) == {"a": {"b": 1, "c": 3}}
    assert merge([{"x": 1}, {"x": 2}], {"*": {"y": 0}}) == [{"x": 1, "y": 0}, {"x": 2, "y": 0}]
    assert merge([1, 2], [3]) == [3]
    assert parse_set("a.b=[1, 2]") == {"a": {"b": [1, 2]}}


def test_a_child_stage_list_merges_item_by_item_into_the_base(tmp_path):
    (tmp_path / "child.yaml").write_text("base: baseline\nname: child\nstages: [ {mixing: {kind: cutmix}} ]\n")
    child, base = load_recipe(tmp_path / "child.yaml"), load_recipe("baseline")
    assert child.stages[0].mixing.kind == "cutmix"
    # everything else of the base's stage is kept: epochs, lr, schedule, warm-up, resolution
    assert child.stages[0].model_dump(exclude={"mixing"}) == base.stages[0].model_dump(exclude={"mixing"})
    assert child.stages[0].epochs == 40 and child.stages[0].resolution.max == 240


def test_a_stage_list_of_another_length_is_refused_with_the_form_to_use(tmp_path):
    (tmp_path / "child.yaml").write_text("base: baseline\nname: child\nstages: [ {epochs: 1}, {epochs: 2} ]\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(tmp_path / "child.yaml")
    msg = str(e.value)
    assert "stages" in msg and "1 item" in msg and "2 were given" in msg and "{0: {epochs: 5}}" in msg


def test_lists_of_plain_values_are_replaced_and_out_of_range_names_the_list():
    assert merge({"betas": [0.9, 0.999]}, {"betas": [0.5, 0.9]}) == {"betas": [0.5, 0.9]}
    assert merge([{"a": 1}], [{"b": 2}]) == [{"a": 1, "b": 2}]
    with pytest.raises(RecipeError, match=r"stages\.3: index 3 is out of range \(stages has 1 item"):
        load_recipe("baseline", sets=["stages.3.epochs=1"])


def _user_recipe(tmp_path, body: str):
    path = tmp_path / "mine.yaml"
    path.write_text(body)
    return path


def test_an_override_never_changes_the_experiment_the_users_own_recipe_file_sets(tmp_path, capsys):
    from fasttricks.runs.folder import recipe_for_train

    mine = _user_recipe(tmp_path, "base: winner\nname: mine\nstages:\n  0:\n"
                                  "    adversarial: {eps: 1/255, step_size: 0.5/255}\n    optimizer: {lr: 0.05}\n")
    # `train --recipe mine.yaml --data toy` (toy-winner.yaml, through base: winner) and an explicit --override
    for recipe in (recipe_for_train(str(mine), [], [], out=None, resume=False, toy=True)[0],
                   load_recipe(mine, ["overrides/toy-winner.yaml"])):
        adv = recipe.stages[0].adversarial
        assert (adv.eps, adv.step_size) == (pytest.approx(1 / 255), pytest.approx(0.5 / 255))
        assert recipe.stages[0].optimizer.lr == 0.05
        # the size and budget still shrink, and what the user did not set follows the override
        assert recipe.model.arch == "test_efficientnet" and recipe.stages[0].epochs == 20 and adv.steps == 2
        kept = next(line for line in recipe.notes() if "mine.yaml sets these itself" in line)
        assert "stages.0.adversarial.eps=1/255 (the override's: 2/255)" in kept and "stages.0.optimizer.lr=0.05" in kept
    # a shipped recipe takes the override whole, and the line says what it changes beyond the size
    toy = load_recipe("winner", ["overrides/toy-winner.yaml"])
    assert toy.stages[0].adversarial.eps == pytest.approx(2 / 255)
    changed = toy.notes()[0]
    assert changed.startswith("overrides/toy-winner.yaml also changes the experiment:")
    assert "stages.0.adversarial.eps 8/255 -> 2/255" in changed and "epochs" not in changed
    # --set is the user's last word, over both
    given = load_recipe(mine, ["overrides/toy-winner.yaml"], ["stages.0.adversarial.eps=3/255"])
    assert given.stages[0].adversarial.eps == pytest.approx(3 / 255)


def test_paper_figures_and_the_description_belong_to_the_file_that_names_them(tmp_path):
    assert load_recipe("winner").paper["public_v1"] == 0.3661
    child = load_recipe(_user_recipe(tmp_path, "base: winner\nname: winner-sam\nstages:\n  1:\n"
                                               "    optimizer: {sam: {}}\n"))
    assert child.paper == {} and child.description == ""
    assert load_recipe("table1/8-sam").paper == {}  # written out on the shared base: no paper row of its own
    assert load_recipe("table1/7-wa").paper == {"public_behavior": 0.5563}


def test_the_step_size_follows_eps_unless_given_and_a_step_beyond_eps_is_named():
    step = lambda r, i=0: r.stages[i].adversarial.step_size  # noqa: E731
    assert step(load_recipe("winner")) == pytest.approx(2.5 * (8 / 255) / 3)  # Madry's rule, as the paper's run
    quarter = load_recipe("winner", [], ["stages.0.adversarial.eps=0.25/255"])
    assert step(quarter) == pytest.approx(2.5 * (0.25 / 255) / 3) and not quarter.notes()
    fgsm_rs = load_recipe("winner", [], ["stages.0.adversarial={eps: 8/255, steps: 1}"])
    assert step(fgsm_rs) == pytest.approx(1.25 * 8 / 255)  # Wong et al.'s FGSM-RS
    two = load_recipe("winner", [], ["stages.0.adversarial.steps=2"])
    assert step(two) == pytest.approx(1.25 * 8 / 255) and not two.notes()  # the rule's own step: no warning
    # an explicit step stays absolute; beyond ε in a multi-step attack, it is said
    kept = load_recipe("winner", ["overrides/toy-winner.yaml"], ["stages.0.adversarial.eps=0.25/255"])
    assert step(kept) == pytest.approx(1 / 255)
    assert any(line.startswith("stages.0.adversarial: step_size 1/255 exceeds eps 0.25/255 for a 2-step attack")
               for line in kept.notes())
    assert load_recipe("winner").evaluation.attack.step_size == pytest.approx(1 / 255)  # written: kept


def test_a_key_typo_suggests_the_key_and_a_missing_base_names_the_file_it_came_from(tmp_path):
    with pytest.raises(RecipeError, match=r"stages\.0\.epoch: .*did you mean epochs\?"):
        load_recipe("baseline", sets=["stages.0.epoch=3"])
    child = tmp_path / "child.yaml"
    child.write_text("base: winer\nname: child\n")
    with pytest.raises(RecipeError, match=rf"{child}: base: no recipe 'winer'"):
        load_recipe(child)


def test_stop_after_zero_is_refused_and_points_at_dry_run(tmp_path):
    from typer.testing import CliRunner

    from fasttricks.cli import app

    result = CliRunner().invoke(app, ["train", "--stop-after", "0", "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "--stop-after must be at least 1" in result.output and "--dry-run" in result.output
    assert not (tmp_path / "r").exists()


def test_each_table_row_shows_its_own_description():
    from fasttricks.recipes import catalogue

    rows = {r["name"]: r["description"] for r in catalogue()}
    table1 = [rows[n] for n in rows if n.startswith("table1/") and not n.endswith("_finetune")]
    table2 = [rows[n] for n in rows if n.startswith("table2/")]
    assert len(set(table1)) == len(table1) == 9 and len(set(table2)) == len(table2) == 4
    assert rows["table2/linf-eps4"] != rows["baseline"]  # not the base's words


@pytest.mark.parametrize("family", ["convnext", "vit"])
def test_each_backbone_table_row_differs_from_plain_fine_tuning_only_by_its_trick(family):
    """tables-<family>/'s rows are compared with row 1 by `ablate`, so a row's difference must be its
    trick alone: the augmentation and mixing (Table 1's row 5) or the attack (Table 2's row)."""
    rows = {p.stem: load_recipe(p).model_dump() for p in sorted((PIPELINES / f"tables-{family}").glob("[0-9]*.yaml"))}
    plain = rows.pop("1-finetune")
    differs = {}
    for stem, row in rows.items():
        keys = {k for k in row if k not in {"name", "paper", "description"} and row[k] != plain[k]}
        assert keys == {"stages"}, stem
        differs[stem] = {k for k, v in row["stages"][0].items() if v != plain["stages"][0][k]}
    assert differs == {"2-heavy-aug-fcutmix": {"augment", "mixing"}, "3-linf-eps4": {"adversarial"}}
    assert plain["start"] == "trained" and plain["evaluation"]["attack"]["eps"] == pytest.approx(4 / 255)
