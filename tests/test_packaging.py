"""The installed package, not only the clone: a wheel built from the repo carries every recipe,
and they are found by name from any directory."""

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def unpacked_wheel(tmp_path_factory):
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(dist)], check=True, capture_output=True, timeout=300)
    wheel, = dist.glob("fasttricks-*.whl")
    site = tmp_path_factory.mktemp("site")
    zipfile.ZipFile(wheel).extractall(site)  # what pip install puts in site-packages
    return site


def _python(site, code, cwd):
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_the_wheel_ships_every_recipe_found_by_name_from_another_directory(unpacked_wheel, tmp_path):
    code = """
import json, fasttricks, fasttricks.recipes as r
names = r.shipped_names()
loaded = {n: r.load_recipe(n).name for n in names if not n.startswith("overrides/")}
toy = r.load_recipe("winner", ["overrides/toy-winner.yaml"]).model.arch
print(json.dumps({"module": fasttricks.__file__, "pipelines": str(r.PIPELINES), "loaded": loaded, "toy": toy,
                  "table1": [p.name for p in r.recipe_folder("table1").glob("*.yaml")]}))
"""
    out = json.loads(_python(unpacked_wheel, code, cwd=tmp_path))
    assert out["module"].startswith(str(unpacked_wheel)) and out["pipelines"].startswith(str(unpacked_wheel))
    assert out["loaded"]["winner"] == "winner" and out["loaded"]["baseline"] == "baseline"
    shipped = REPO / "pipelines"
    expected = {p.relative_to(shipped).with_suffix("").as_posix() for p in shipped.rglob("*.yaml")
                if "overrides" not in p.parts}
    assert set(out["loaded"]) == expected  # every table row and shared base, resolved by name
    assert out["toy"] == "test_efficientnet" and "7-wa.yaml" in out["table1"]


def test_recipes_command_lists_names_descriptions_and_paths_from_the_wheel(unpacked_wheel, tmp_path):
    code = "import sys; from fasttricks.cli import app; sys.argv = ['fasttricks', 'recipes', '--json']; app()"
    rows = json.loads(_python(unpacked_wheel, code + "\n", cwd=tmp_path))
    by_name = {r["name"]: r for r in rows}
    assert by_name["winner"]["kind"] == "recipe" and "PGD" in by_name["winner"]["description"]
    assert by_name["table1/5-heavy-aug-fcutmix"]["kind"] == "table row"
    assert by_name["overrides/toy-winner"]["kind"] == "override" and by_name["overrides/toy-winner"]["description"]
    assert all(Path(r["path"]).is_file() and r["path"].startswith(str(unpacked_wheel)) for r in rows)
