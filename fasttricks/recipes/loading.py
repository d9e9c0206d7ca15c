"""Recipes by name or path: the shipped catalogue, ``base:`` inheritance, overrides and validation.

A recipe may start from another with ``base: NAME_OR_PATH`` and then reads as a diff. Overrides come
from files (``--override``) and from ``--set dotted.key=value``; in both, a list of stages can be
addressed by index (``stages.0.epochs=2``) or all at once with ``*`` (``stages.*.batch_size=64``).
"""

from __future__ import annotations

import copy
import difflib
import fnmatch
import os
import types
import typing
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import (
    BaseModel,
    ValidationError,
)

from fasttricks.errors import InputMissing
from fasttricks.recipes.schema import Recipe, RecipeError


def _pipelines() -> Path:
    """The shipped recipes: ``fasttricks/pipelines/`` in an installed wheel, the repo's top-level
    ``pipelines/`` in a clone or an editable install."""
    here = Path(__file__).resolve().parent.parent  # fasttricks/
    installed = here / "pipelines"
    return installed if installed.is_dir() else here.parent / "pipelines"


PIPELINES = _pipelines()



def toy_override(recipe: Recipe) -> Path:
    """The override ``train --data toy`` applies to ``recipe`` when the user gives none."""
    path = PIPELINES / (recipe.toy_override or "overrides/toy.yaml")
    if not path.is_file():
        raise RecipeError(f"toy_override: {path} does not exist")
    return path


def recipe_path(name_or_path: str | os.PathLike, relative_to: Path | None = None, what: str = "recipe") -> Path:
    """A path as given (or relative to ``relative_to``), else a shipped one: ``NAME``, ``NAME.yaml``
    or ``pipelines/NAME`` inside the installed recipes, so names work from any directory."""
    name = str(name_or_path)
    shipped = name.removeprefix("pipelines/")
    candidates = [Path(name_or_path)]
    if relative_to is not None:
        candidates.insert(0, relative_to / name_or_path)
    candidates += [PIPELINES / f"{shipped}.yaml", PIPELINES / shipped]
    for path in candidates:
        if path.is_file():
            return path
    raise RecipeError(f"no {what} {name!r}: not a file, and not one of {shipped_names()} in {PIPELINES} "
                      f"(`fasttricks recipes` lists them)")


def shipped_names() -> list[str]:
    """Every shipped YAML by the name it is found under (``winner``, ``table1/2-heavy-aug``, ...)."""
    if not PIPELINES.is_dir():
        return []
    return sorted(str(p.relative_to(PIPELINES).with_suffix("")) for p in PIPELINES.rglob("*.yaml"))


def catalogue() -> list[dict]:
    """Every shipped YAML: name (as ``--recipe``/``--override`` take it), kind, description, path.
    A recipe's description is its own; an override's or a shared base's is its first comment line."""
    rows = []
    for name in shipped_names():
        path = PIPELINES / f"{name}.yaml"
        kind = ("override" if name.startswith("overrides/") else "shared base" if Path(name).name.startswith("_")
                else "table row" if "/" in name else "recipe")
        description = ""
        if kind in ("recipe", "table row"):
            try:
                description = load_recipe(path).description
            except RecipeError as e:
                description = f"(invalid: {e})"
        if not description:
            comments = [line.lstrip("# ").strip() for line in path.read_text().splitlines() if line.startswith("#")]
            description = comments[0] if comments else ""
        rows.append({"name": name, "kind": kind, "description": description, "path": str(path)})
    return rows


def recipe_folder(name_or_path: str | os.PathLike) -> Path:
    """A folder of recipes as given, else a shipped one (``table1``, ``pipelines/table2``)."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    shipped = PIPELINES / str(name_or_path).removeprefix("pipelines/")
    if shipped.is_dir():
        return shipped
    raise InputMissing(f"{name_or_path} is not a folder of recipes (shipped: table1, table2)")


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise RecipeError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path} must hold a mapping at the top level, not {type(data).__name__}")
    return data


def read_recipe_tree(name_or_path: str | os.PathLike, _seen: tuple = ()) -> dict:
    """The raw recipe with its ``base:`` chain merged in."""
    path = recipe_path(name_or_path, _seen[-1].parent if _seen else None).resolve()
    if path in _seen:
        raise RecipeError(f"recipe base cycle: {' -> '.join(map(str, (*_seen, path)))}")
    data = _read_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return data
    try:
        tree = read_recipe_tree(base, (*_seen, path))
    except RecipeError as e:
        if str(e).startswith("no recipe "):  # name the file whose base: it is
            raise RecipeError(f"{path}: base: {e}") from None
        raise
    inherited = {k: v for k, v in tree.items() if k not in NOT_INHERITED}
    return merge(inherited, data)


# What a recipe says about itself alone: a child of `winner` (a SAM variant, say) is not the run the
# paper's figures belong to, nor the recipe its description describes.
NOT_INHERITED = ("paper", "description")


def own_files(name_or_path: str | os.PathLike, _seen: tuple = ()) -> list[Path]:
    """The files of a recipe's ``base:`` chain that the user wrote (not shipped ones), base first."""
    path = recipe_path(name_or_path, _seen[-1].parent if _seen else None).resolve()
    if path in _seen:
        return []
    base = _read_yaml(path).get("base")
    chain = own_files(base, (*_seen, path)) if base is not None else []
    return chain if path.is_relative_to(PIPELINES.resolve()) else [*chain, path]


# What an override may change whatever the user's recipe file says: the run's size and budget
# (DESIGN, 2026-12-01). Every other key is an experiment variable (ε, step, lr, augmentation,
# mixing, the evaluation's attack...): one that the user's own file sets wins over an override.
SIZE_KEYS = ("model.arch", "model.pretrained", "model.compile", "data.workers", "data.val_resize", "data.val_crop",
             "data.val_batch_size", "data.pixel_scale", "data.order", "data.os_cache", "stages.*.epochs",
             "stages.*.batch_size", "stages.*.resolution", "stages.*.schedule.warmup_epochs",
             "stages.*.average.bn_batches", "fixres.sizes", "fixres.finetune.steps", "fixres.finetune.batch_size",
             "evaluation.every", "evaluation.autoattack.images", "stages.*.adversarial.guard.images", "logging")


def is_size_key(key: str) -> bool:
    """``key`` (dotted, stage indices as numbers or ``*``) or a key above it is one of SIZE_KEYS."""
    parts = key.split(".")
    if parts[0] == "stages" and len(parts) > 1:
        parts[1] = "*"
    return any(fnmatch.fnmatchcase(".".join(parts[:n]), pattern)
               for pattern in SIZE_KEYS for n in range(1, len(parts) + 1))


def experiment_part(data: Any, path: str = "") -> Any:
    """``data`` (a raw recipe or a part of it) without its size keys."""
    if isinstance(data, list) and path == "stages":
        return [experiment_part(item, _join(path, i)) for i, item in enumerate(data)]
    if not isinstance(data, dict):
        return data
    out = {}
    for k, v in data.items():
        key = _join(path, k)
        if is_size_key(key):
            continue
        part = experiment_part(v, key)
        if part == {} and v != {}:  # only size keys below: nothing of the experiment
            continue
        out[k] = part
    return out


def leaf_changes(before: Any, after: Any, path: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, old, new) for every leaf of two raw recipes that differs."""
    if isinstance(before, dict) and isinstance(after, dict):
        return [c for k in dict.fromkeys([*before, *after])
                for c in leaf_changes(before.get(k), after.get(k), _join(path, k))]
    if isinstance(before, list) and isinstance(after, list) and len(before) == len(after) and \
            _is_list_of_mappings(before):
        return [c for i, (b, a) in enumerate(zip(before, after, strict=True))
                for c in leaf_changes(b, a, _join(path, i))]
    return [] if before == after else [(path, before, after)]


def merge(base: Any, override: Any, path: str = "") -> Any:
    """Deep merge, the one rule for ``base:``, ``--override`` and ``--set``: mappings key by key; a
    list of mappings (``stages``) item by item, so a child lists only what each stage changes, and
    a list of another length is an error (the items would no longer say which stage they change);
    a mapping of indices (``{0: {...}}``, ``'*'`` for every item) patches the items it names; a
    list of plain values (``betas``, ``average.epochs``) is replaced; anything else is replaced."""
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for k, v in override.items():
            out[k] = merge(base[k], v, _join(path, k)) if k in base else copy.deepcopy(v)
        return out
    if isinstance(base, list) and isinstance(override, dict):
        out = list(base)
        for k, v in override.items():
            for i in _list_indices(out, k, path):
                out[i] = merge(out[i], v, _join(path, i))
        return out
    if _is_list_of_mappings(base) and isinstance(override, list):
        if len(override) != len(base):
            raise RecipeError(
                f"{path or 'list'}: a list merges item by item into the base's {len(base)} item(s), but "
                f"{len(override)} were given. Change some items with a mapping of indices ({path or 'stages'}: "
                f"{{0: {{epochs: 5}}}}, or '*' for every item); for a different number of stages, write the "
                f"recipe without base:")
        return [merge(b, o, _join(path, i)) for i, (b, o) in enumerate(zip(base, override, strict=True))]
    return copy.deepcopy(override)


def _is_list_of_mappings(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _list_indices(items: list, key: Any, path: str = "") -> range | list[int]:
    if key == "*":
        return range(len(items))
    try:
        i = int(key)
    except (TypeError, ValueError):
        raise RecipeError(f"{path or 'a list'} is addressed by an index or '*', not {key!r}") from None
    if not -len(items) <= i < len(items):
        raise RecipeError(f"{_join(path, i)}: index {i} is out of range ({path or 'the list'} has "
                          f"{len(items)} item(s): 0..{len(items) - 1})")
    return [i]


def parse_set(assignment: str) -> dict:
    """``a.b.0.c=value`` as the nested override {a: {b: {0: {c: value}}}}; value read as YAML."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key.strip():
        raise RecipeError(f"--set expects dotted.key=value, not {assignment!r}")
    value = yaml.safe_load(raw) if raw.strip() else None
    for part in reversed(key.strip().split(".")):
        value = {part: value}
    return value


def load_recipe(name_or_path: str | os.PathLike, overrides: list[str | os.PathLike] = (),
                sets: list[str] = ()) -> Recipe:
    """Load, merge ``overrides`` files then ``sets``, and validate. The experiment keys that the
    user's own recipe files set (not the shipped ones they start from) win over the overrides."""
    own = [(path, _read_yaml(path)) for path in own_files(name_or_path)] if overrides else []
    return apply_overrides(read_recipe_tree(name_or_path), overrides, sets, source=str(name_or_path), own=own)


def read_override(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """An override file, merged over the override its ``base:`` names (relative to the file), if any."""
    raw = _read_yaml(path)
    if "base" not in raw:
        return raw
    base = (path.parent / raw["base"]).resolve()
    if not base.is_file():
        raise RecipeError(f"{path}: base: {raw['base']} does not exist ({base})")
    if base in seen:
        raise RecipeError(f"{path}: base: {raw['base']} is a loop")
    return merge(read_override(base, (*seen, path.resolve())), {k: v for k, v in raw.items() if k != "base"})


def apply_overrides(data: dict, overrides: list[str | os.PathLike] = (), sets: list[str] = (), *,
                    source: str = "recipe", own: list[tuple[Path, dict]] = ()) -> Recipe:
    """A raw recipe with ``overrides`` files merged over it, then the experiment keys of ``own``
    (the user's files, whose experiment an override must not change), then ``sets``; validated.
    The recipe's ``notes()`` list what the overrides changed in the experiment and what ``own`` kept."""
    notes, start = [], data
    paths = [recipe_path(file, what="override file") for file in overrides]
    for path in paths:
        data = merge(data, read_override(path))
    for file, raw in own:
        before, data = data, merge(data, experiment_part({k: v for k, v in raw.items() if k != "base"}))
        kept = leaf_changes(before, data)
        if kept:
            notes.append(f"{_short(file)} sets these itself, so no override changes them: "
                         + "; ".join(f"{k}={new} (the override's: {old})" for k, old, new in kept))
    changed = [(k, old, new) for k, old, new in leaf_changes(start, data) if not is_size_key(k)]
    if changed:
        notes.insert(0, f"{', '.join(map(_short, paths))} also change{'s' * (len(paths) == 1)} the experiment: "
                     + "; ".join(f"{k} {_unset(old)} -> {_unset(new)}" for k, old, new in changed))
    for assignment in sets:
        data = merge(data, parse_set(assignment))
    recipe = validate(data, source=source)
    recipe._notes = notes
    return recipe


def _unset(value: Any) -> Any:
    return "(default)" if value is None else value


def _short(path: Path) -> str:
    """A shipped file by its name in pipelines/, another as given."""
    try:
        return str(Path(path).resolve().relative_to(PIPELINES.resolve()))
    except ValueError:
        return str(path)


def validate(data: dict, source: str = "recipe") -> Recipe:
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise RecipeError(f"invalid recipe {source}:\n" + "\n".join(_describe(err) for err in e.errors())) from None


def _describe(err: dict) -> str:
    loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
    line = f"  {loc}: {err['msg']}"
    if err["type"] == "extra_forbidden":
        allowed = _allowed_keys(err["loc"][:-1])
        close = difflib.get_close_matches(str(err["loc"][-1]), allowed, n=1, cutoff=0.6)
        if close:
            line += f"; did you mean {close[0]}?"
        if allowed:
            line += f" (allowed keys here: {', '.join(allowed)})"
    elif "input" in err and not isinstance(err["input"], dict):
        line += f" (got {err['input']!r})"
    return line


def _allowed_keys(loc: tuple) -> list[str]:
    cls: Any = Recipe
    for part in loc:
        if isinstance(part, int):
            continue
        field = cls.model_fields.get(part)
        if field is None:
            return []
        cls = _model_class(field.annotation)
        if cls is None:
            return []
    return list(cls.model_fields)


def _model_class(annotation: Any) -> type[BaseModel] | None:
    """The BaseModel inside ``X``, ``list[X]``, ``X | None`` or ``Annotated[...]``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = typing.get_origin(annotation)
    if origin in (list, typing.Union, types.UnionType, Annotated):
        for arg in typing.get_args(annotation):
            found = _model_class(arg)
            if found is not None:
                return found
    return None


def dump(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
