"""Brain-Score export, offline: the plugin folder imports without fasttricks, builds its
ModelCommitment and gives activations through brainscore_vision's own wrapper; its preprocessing
is our evaluation transform; identifiers name the resolution; scoring offline is a clear error."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from fasttricks.brainscore.export import ExportError, export, identifier_for
from fasttricks.cli import app
from fasttricks.data.beton import BetonOptions, build_beton
from fasttricks.data.loader import ValLoader
from fasttricks.models.factory import create_model
from fasttricks.models.weights import save_weights, update_info
from fasttricks.recipes import ModelConfig


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run folder as training leaves it: final.safetensors with its info, summary.json."""
    out = tmp_path_factory.mktemp("runs") / "my-run"
    out.mkdir()
    torch.manual_seed(0)
    model = create_model(ModelConfig(arch="test_efficientnet"), 10)
    info = {"arch": "test_efficientnet", "num_classes": 10, "classes": [str(i) for i in range(10)],
            "mean": model.mean.flatten().tolist(), "std": model.std.flatten().tolist(), "val_resize": 48,
            "val_crop": 40, "recipe": "winner", "frozen": ["conv_stem", "bn1"]}
    save_weights(out / "final.safetensors", model.net, info)
    (out / "summary.json").write_text(json.dumps({"val_top1": 50.0, "val_clutter_top1": 20.0}))
    return out


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("stimuli")
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(53, 77), (96, 64), (120, 120)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"im{i}.png")
    return folder


@pytest.fixture(scope="module")
def plugin(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "fasttricks_plugin"
    config = export(run, out, regions=["V1=blocks.1", "IT=blocks.4"])
    return out, config


def test_export_writes_the_plugin_layout_unpinned_and_named_by_resolution(plugin):
    out, config = plugin
    assert {p.name for p in out.iterdir()} == {"__init__.py", "model.py", "model.json", "test.py", "metadata.yaml",
                                              "requirements.txt", "weights.safetensors", "region_layer_map"}
    name = config["identifier"]
    assert name == "fasttricks-winner-test_efficientnet-my-run-48x40"
    assert f"model_registry['{name}'] = lambda: ModelCommitment(" in (out / "__init__.py").read_text()
    # --region over the default map (a tiny net: the winning map's relative depths)
    assert json.loads((out / "region_layer_map" / f"{name}.json").read_text()) == {
        "V1": "blocks.1", "V2": "blocks.2.0", "V4": "blocks.2.0", "IT": "blocks.4"}
    requirements = (out / "requirements.txt").read_text().splitlines()
    # names with bounds where a feature needs one, never this machine's exact builds
    assert "torch" in requirements and "timm>=1.0.9" in requirements
    assert not any("==" in r for r in requirements)
    assert config["source"]["exported_with"]["torch"]  # the versions are recorded, not imposed
    assert config["layers"][-1] == config["behavioral_readout_layer"] == "global_pool"
    assert "blocks.4.0.conv_pwl" in config["layers"] and (config["resize"], config["crop"]) == (48, 40)
    assert "fasttricks" not in (out / "model.py").read_text().split('"""', 2)[2]  # no import of ours


def test_the_plugin_imports_without_fasttricks_and_gives_activations_through_brainscore(plugin, images, tmp_path):
    out, config = plugin
    name = config["identifier"]
    script = textwrap.dedent(f"""
        import importlib.abc, json, sys
        class NoFasttricks(importlib.abc.MetaPathFinder):
            def find_spec(self, fullname, path=None, target=None):
                if fullname.split(".")[0] == "fasttricks":
                    raise ImportError("fasttricks must not be needed")
        sys.meta_path.insert(0, NoFasttricks())
        sys.path.insert(0, {str(out.parent)!r})
        import fasttricks_plugin
        from brainscore_vision import model_registry
        commitment = model_registry[{name!r}]()
        wrapper = fasttricks_plugin.model.get_model({name!r})
        paths = sorted(str(p) for p in __import__("pathlib").Path({str(images)!r}).glob("*.png"))
        acts = wrapper(paths, layers=["blocks.1", "global_pool"])
        print(json.dumps({{"identifier": commitment.identifier, "shape": list(acts.shape),
                          "layers": sorted(set(acts["layer"].values.tolist())),
                          "fasttricks": any(m.split(".")[0] == "fasttricks" for m in sys.modules)}}))
    """)
    env = {**os.environ, "RESULTCACHING_DISABLE": "1", "PYTHONPATH": ""}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["identifier"] == name and result["layers"] == ["blocks.1", "global_pool"]
    assert result["shape"][0] == 3 and not result["fasttricks"]


def test_export_preprocessing_is_our_evaluation_transform(plugin, images, tmp_path):
    out, config = plugin
    folder = tmp_path / "set" / "0"
    folder.mkdir(parents=True)
    for p in sorted(images.glob("*.png")):
        (folder / p.name).write_bytes(p.read_bytes())
    build_beton(tmp_path / "set", tmp_path / "val.beton", BetonOptions(write_mode="raw", workers=1))
    ours = torch.cat([x for x, _ in ValLoader(tmp_path / "val.beton", batch_size=8, resize=48, crop=40,
                                              device=torch.device("cpu"), workers=1)])
    mean, std = torch.tensor(config["mean"])[:, None, None], torch.tensor(config["std"])[:, None, None]
    ours = ((ours - mean) / std).numpy()
    sys.path.insert(0, str(out.parent))
    try:
        from fasttricks_plugin import model as plugin_model
    finally:
        sys.path.remove(str(out.parent))
    theirs = plugin_model.preprocess(sorted(str(p) for p in images.glob("*.png")))
    assert theirs.shape == ours.shape == (3, 3, 40, 40)
    np.testing.assert_allclose(theirs, ours, atol=1e-5)


def test_identifiers_differ_between_resolutions_and_follow_fixres(run, tmp_path):
    info = {"arch": "efficientnet_b1", "recipe": "winner"}
    assert identifier_for(info, "r", 272, 240) != identifier_for(info, "r", 324, 288)
    assert identifier_for(info, "r", 324, 288, given="My Model").endswith("my-model-324x288")
    copy = tmp_path / "run"
    copy.mkdir()
    (copy / "final.safetensors").write_bytes((run / "final.safetensors").read_bytes())
    first = export(copy, tmp_path / "a")["identifier"]
    update_info(copy / "final.safetensors", {"val_resize": 64, "val_crop": 56})  # what `fixres` records
    second = export(copy, tmp_path / "b")
    assert first != second["identifier"] and (second["resize"], second["crop"]) == (64, 56)


def test_export_at_a_given_size_names_it_and_feeds_the_network_at_it(run, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["brainscore", "export", str(run), "--out", str(tmp_path / "p"), "--size", "56/44"])
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "p" / "model.json").read_text())
    assert (config["resize"], config["crop"]) == (56, 44) and config["identifier"].endswith("-56x44")
    assert os.path.samefile(tmp_path / "p" / "weights.safetensors", run / "final.safetensors")  # linked, not copied
    from fasttricks.brainscore.local import load_plugin

    image = tmp_path / "im.png"
    Image.fromarray(np.zeros((70, 90, 3), dtype=np.uint8)).save(image)
    assert load_plugin(tmp_path / "p").preprocess([image]).shape == (1, 3, 44, 44)
    for bad in ("44/56", "324x288"):
        refused = runner.invoke(app, ["brainscore", "export", str(run), "--out", str(tmp_path / "q"), "--size", bad])
        assert refused.exit_code == 2 and "--size" in refused.output and not (tmp_path / "q").exists()


def test_bad_export_options_are_errors_and_leave_nothing(run, tmp_path):
    with pytest.raises(ExportError, match="REGION=LAYER"):
        export(run, tmp_path / "x", regions=["V9=blocks.1"])
    with pytest.raises(ExportError, match="not one of the exported layers"):
        export(run, tmp_path / "x", regions=["V1=nope"])
    with pytest.raises(ExportError, match="neither final.safetensors"):
        export(tmp_path, tmp_path / "x")
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x.*"))
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep").write_text("mine")
    with pytest.raises(ExportError, match="--overwrite"):
        export(run, tmp_path / "x")
    assert (tmp_path / "x" / "keep").read_text() == "mine"


def test_activations_command_saves_each_layer_for_local_images(run, images, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["brainscore", "activations", str(run), "--images", str(images), "--out",
                                 str(tmp_path / "acts.npz"), "--layers", "blocks.2", "--layers", "global_pool",
                                 "--layers", "conv_stem"])  # any module, not only the export's layer list
    assert result.exit_code == 0, result.output
    saved = np.load(tmp_path / "acts.npz")
    assert saved["global_pool"].shape[0] == saved["blocks.2"].shape[0] == saved["conv_stem"].shape[0] == 3
    assert sorted(os.path.basename(p) for p in saved["stimulus_paths"]) == ["im0.png", "im1.png", "im2.png"]
    bad = runner.invoke(app, ["brainscore", "activations", str(run), "--images", str(images), "--out",
                              str(tmp_path / "x.npz"), "--layers", "fc9"])
    assert bad.exit_code == 2 and "fc9" in bad.output and not (tmp_path / "x.npz").exists()


def test_score_offline_is_a_clear_error_naming_the_caches(run, tmp_path, monkeypatch):
    # a dead proxy: offline whatever the machine, and fast
    for var in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.setenv("BRAINIO_HOME", str(tmp_path / "brainio"))
    monkeypatch.setenv("RESULTCACHING_HOME", str(tmp_path / "rc"))
    runner = CliRunner()
    result = runner.invoke(app, ["brainscore", "score", str(run), "--benchmark", "FreemanZiemba2013public.V1-pls"])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "could not score benchmark 'FreemanZiemba2013public.V1-pls'" in text
    assert f"BRAINIO_HOME ({tmp_path / 'brainio'})" in text and "RESULTCACHING_HOME" in text
    assert "Traceback" not in result.output
    unknown = runner.invoke(app, ["brainscore", "score", str(run), "--benchmark", "NoSuch.V1-pls"])
    assert unknown.exit_code == 2 and "no benchmark 'NoSuch.V1-pls'" in " ".join(unknown.output.split())


def test_score_takes_a_region_map_of_its_own_and_writes_it_into_the_export(run, tmp_path, monkeypatch):
    for var in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.setenv("BRAINIO_HOME", str(tmp_path / "brainio"))
    result = CliRunner().invoke(app, ["brainscore", "score", str(run), "--benchmark", "FreemanZiemba2013public.V1-pls",
                                      "--region", "V1=blocks.1"])
    assert result.exit_code == 2  # offline: the scoring itself cannot run here
    maps = list((run / "brainscore").glob("*/region_layer_map/*.json"))
    assert len(maps) == 1 and json.loads(maps[0].read_text())["V1"] == "blocks.1"
    # a later use without --region gets the default map, not the folder exported with the given one
    from fasttricks.brainscore.local import plugin_for

    folder = plugin_for(run)
    default = json.loads((folder / "region_layer_map" / f"{folder.name}.json").read_text())
    assert default["V1"] != "blocks.1" and json.loads((folder / "model.json").read_text())["regions_given"] == {}


def test_efficientnet_b1_gets_the_2022_winners_region_map_and_others_the_same_depths():
    import timm

    from fasttricks.brainscore.layers import WINNING_MAP_2022, default_region_map

    for arch in ("efficientnet_b1", "tf_efficientnet_b1"):
        assert default_region_map(arch, timm.create_model(arch))[0] == WINNING_MAP_2022
    resnet, how = default_region_map("resnet50", timm.create_model("resnet50"))
    assert resnet == {"V1": "layer2.2", "V2": "layer3.1", "V4": "layer3.1", "IT": "layer4.1"} and "relative" in how


def test_metadata_yaml_holds_brainscores_own_fields_and_no_region_map_is_possible(run, tmp_path):
    import yaml

    out = tmp_path / "p"
    config = export(run, out, region_map=False)
    assert not (out / "region_layer_map").exists() and config["region_layer_map"] == {}
    meta = yaml.safe_load((out / "metadata.yaml").read_text())["models"][config["identifier"]]
    net = create_model(ModelConfig(arch="test_efficientnet"), 10).net
    assert meta["total_parameter_count"] == sum(p.numel() for p in net.parameters())
    assert meta["total_layers"] == sum(1 for _ in net.modules()) and meta["model_family"] == "efficientnet"
    assert meta["runnable"] is True and meta["model_size_mb"] > 0 and "recipe winner" in meta["extra_notes"]
    with pytest.raises(ExportError, match="contradict"):
        export(run, tmp_path / "q", region_map=False, regions=["V1=blocks.1"])


def test_a_region_map_with_two_regions_on_one_layer_says_so(run, tmp_path, capsys):
    config = export(run, tmp_path / "p", regions=["V1=blocks.1", "V2=blocks.1"])
    assert "V1 and V2 on blocks.1" in config["region_layer_map_source"]
    assert "one layer stands for several regions" in " ".join(capsys.readouterr().err.split())


@pytest.fixture(scope="module", params=["test_efficientnet", "test_convnext", "test_vit"])
def family_plugin(request, plugin, tmp_path_factory):
    """The EfficientNet export, and one of a ConvNeXt and a ViT run (trained at 48 px, exported at
    FixRes' 64: a ViT's position embedding resized), layers and region map from their structure."""
    arch = request.param
    if arch == "test_efficientnet":
        return plugin
    out = tmp_path_factory.mktemp("runs") / f"{arch}-run"
    out.mkdir()
    torch.manual_seed(0)
    model = create_model(ModelConfig(arch=arch), 10)
    info = {"arch": arch, "num_classes": 10, "classes": [str(i) for i in range(10)],
            "mean": model.mean.flatten().tolist(), "std": model.std.flatten().tolist(), "val_resize": 56,
            "val_crop": 48, "recipe": f"winner-{arch.split('_')[1]}"}
    save_weights(out / "final.safetensors", model.net, info)
    (out / "summary.json").write_text(json.dumps({"val_top1": 50.0}))
    folder = tmp_path_factory.mktemp("export") / f"fasttricks_{arch}_plugin"
    return folder, export(out, folder, size=(72, 64))


def test_layers_and_region_map_come_from_each_familys_own_structure(family_plugin):
    _, config = family_plugin
    layers, readout = config["layers"], config["behavioral_readout_layer"]
    expected = {"test_efficientnet": ("global_pool", "blocks.4.0.conv_pwl"),
                "test_convnext": ("head.drop", "stages.3.blocks.1.conv_dw"), "test_vit": ("head_drop", "blocks.5.attn")}
    assert (readout, expected[config["arch"]][1] in layers) == (expected[config["arch"]][0], True)
    assert layers[-1] == readout and set(config["region_layer_map"]) == {"V1", "V2", "V4", "IT"}
    assert all(layer in layers for layer in config["region_layer_map"].values())
    assert config["create_kwargs"] == ({"dynamic_img_size": True} if config["arch"] == "test_vit" else {})


def test_the_export_passes_brainscores_own_plugin_checks_offline(family_plugin, images, monkeypatch):
    """brainscore_vision's generic_plugin_tests (what it runs on a submitted plugin), on our
    commitment, with our three images standing in for its stimuli (not shipped in the wheel): for an
    EfficientNet, a ConvNeXt and a ViT."""
    from brainscore_vision import model_registry
    from brainscore_vision.model_helpers import generic_plugin_tests as generic

    out, config = family_plugin
    name = config["identifier"]
    monkeypatch.setenv("RESULTCACHING_DISABLE", "1")
    monkeypatch.syspath_prepend(str(out.parent))
    __import__(out.name)  # registers the commitment, as Brain-Score's plugin loader would
    paths = sorted(images.glob("*.png"))

    def our_stimuli():
        from brainscore_core.supported_data_standards.brainio.stimuli import StimulusSet

        s = StimulusSet({"stimulus_id": ["stimid1", "stimid2", "stimid3"], "object_name": ["rgb"] * 3,
                         "image_label": ["label1", "label1", "label2"], "filename": ["rgb1", "rgb2", "rgb3"]})
        s.stimulus_paths = dict(zip(["stimid1", "stimid2", "stimid3"], paths, strict=True))
        s.identifier = f"fasttricks-generic-{name}"
        return s

    monkeypatch.setattr(generic, "_make_stimulus_set", our_stimuli)
    monkeypatch.setattr(generic, "load_model", lambda identifier: model_registry[identifier]())
    for check in (generic.test_identifier, generic.test_visual_degrees, generic.test_start_task_or_recording,
                  generic.test_look_at_neural_V1, generic.test_look_at_behavior_probabilities):
        check(name)


def test_a_run_trained_again_is_not_scored_on_its_cached_activations(run, tmp_path, monkeypatch):
    """brainscore caches activations by model identifier, which names the run folder and the size;
    the same folder trained again must not be served the first model's activations."""
    import shutil

    import brainscore_vision
    from fake_benchmarks import ReadoutBenchmark, stimulus_set

    from fasttricks.brainscore.local import score
    from fasttricks.models.weights import read_info

    bench = ReadoutBenchmark(stimulus_set(tmp_path / "stimuli", f"fake.readout.{tmp_path.name}"))
    monkeypatch.setattr(brainscore_vision, "load_benchmark", lambda name: bench)
    again = shutil.copytree(run, tmp_path / "my-run", ignore=shutil.ignore_patterns("brainscore"))
    first = score(again, "Fake.readout")["score"]
    assert score(again, "Fake.readout")["score"] == first
    cache = Path(os.environ["RESULTCACHING_HOME"])  # (conftest's, for the session)
    assert any(cache.rglob(f"*stimuli_identifier=fake.readout.{tmp_path.name},*"))  # the second came from it
    torch.manual_seed(1)  # "trained again": other weights, same run folder, same size
    model = create_model(ModelConfig(arch="test_efficientnet"), 10)
    save_weights(again / "final.safetensors", model.net, read_info(run / "final.safetensors"))
    assert score(again, "Fake.readout")["score"] != pytest.approx(first)
