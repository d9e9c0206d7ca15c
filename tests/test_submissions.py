"""The 2022 entries as recipes (pipelines/submissions-2022/) against their Brain-Score plugins'
own code: the frozen layers, the test sizes and the averaged epochs."""

import ast
import re
from pathlib import Path

import brainscore_vision
import pytest
import timm

from fasttricks.models.freezing import resolve
from fasttricks.recipes import load_recipe

PLUGINS = Path(brainscore_vision.__file__).parent / "models"
ENTRIES = {
    "sam-fcutmix-robust": "effnetb1_cutmixpatch_SAM_robust32_avge6e8e9e10_manylayers_324x288",
    "augmix-fcutmix-robust": "effnetb1_cutmixpatch_augmix_robust32_avge4e7_manylayers_324x288",
    "cutmix-augmix-sam": "effnetb1_cutmix_augmix_sam_e1_5avg_424x377",
}


def plugin_constants(entry: str) -> dict:
    """The module-level constants of the entry's model.py (read, never imported: it downloads)."""
    tree = ast.parse((PLUGINS / entry / "model.py").read_text())
    return {t.id: ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
            for t in node.targets if isinstance(t, ast.Name) and isinstance(node.value, (ast.Constant, ast.List))}


@pytest.mark.parametrize("recipe,entry", ENTRIES.items())
def test_each_entry_recipe_matches_its_plugin(recipe, entry):
    r = load_recipe(f"submissions-2022/{recipe}")
    code = plugin_constants(entry)
    assert (r.data.val_resize, r.data.val_crop) == (code["image_resize"], code["image_crop"])
    assert f"{code['image_resize']}/{code['image_crop']}" in r.fixres.sizes
    assert r.model.pretrained_name() == "tf_efficientnet_b1.ns_jft_in1k"  # timm's tf_efficientnet_b1_ns
    behaviour = r.stages[-1]
    # the plugin puts in eval mode the batch norms of conv_stem, bn1 and its freeze_layers
    net = timm.create_model(r.model.arch)
    assert resolve(net, behaviour.freeze) == (["conv_stem", "bn1", *code["freeze_layers"]]
                                              if "freeze_layers" in code else [])
    averaged = re.search(r"avge(\d+)e(\d+)e(\d+)e(\d+)|avge(\d+)e(\d+)|e(\d+)_(\d+)avg", entry)
    numbers = [int(g) for g in averaged.groups() if g]
    expected = numbers if len(numbers) == 4 else list(range(numbers[0], numbers[1] + 1))
    assert behaviour.averaged_epochs() == expected
    assert ("robust" in entry) == any(s.adversarial is not None for s in r.stages)
    assert ("SAM" in entry or "sam" in entry) == (behaviour.optimizer.sam is not None)
    assert ("augmix" in entry) == (behaviour.augmix is not None)
    assert ("cutmixpatch" in entry) == (behaviour.mixing.kind == "foreground_cutmix")
