"""The node image's recipe (`images/warewulf/node.yaml`): what it is made of, read and checked.

A recipe names a Debian suite, a kernel, an init, lists of packages, an overlay folder copied
over the installed system, where the agent's venv goes, the units to enable, and optional
layers (more packages, more apt repositories). `Recipe.key(layers)` is the hash of everything
a build reads, so that a build is reused while nothing it reads has changed.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Annotated

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

__all__ = ["RECIPE", "Layer", "Recipe", "RecipeError", "checkout", "load_recipe"]

_PACKAGE = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9+.-]+$")]
_ROOT = Path(__file__).resolve().parent.parent.parent


def checkout() -> Path:
    """The Squall checkout this code runs from (the recipe and the agent's source live
    there); RecipeError when it runs from an installed package without one."""
    if not (_ROOT / "pyproject.toml").exists() or not (_ROOT / "images" / "warewulf").is_dir():
        raise RecipeError(
            "building a node image needs a Squall checkout (its images/warewulf recipe and "
            "the source of the agent it installs); run squall from one"
        )
    return _ROOT


RECIPE = Path("images") / "warewulf" / "node.yaml"


class RecipeError(Exception):
    """A recipe that cannot be used, or a layer that cannot be built here; says why."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Distribution(_Model):
    name: str = Field(pattern=r"^debian$")  # mmdebstrap builds Debian
    suite: str = Field(pattern=r"^[a-z]+$")
    mirror: str = Field(pattern=r"^https?://\S+$")
    components: tuple[str, ...] = ("main",)


class Repository(_Model):
    """An apt repository of a layer's, with the URL of the key that signs it."""

    url: str = Field(pattern=r"^https://\S+$")
    suite: str = Field(min_length=1)
    components: tuple[str, ...] = ()
    key: str = Field(pattern=r"^https://\S+$")


class Layer(_Model):
    about: str = Field(min_length=1)
    packages: tuple[_PACKAGE, ...] = Field(min_length=1)
    components: tuple[str, ...] = ()  # more components of the distribution's archive
    repositories: tuple[Repository, ...] = ()


class Recipe(_Model):
    name: str = Field(pattern=r"^[a-z][a-z0-9-]{0,62}$")
    distribution: Distribution
    architecture: str = Field(pattern=r"^amd64$")
    kernel: _PACKAGE
    init: _PACKAGE
    packages: dict[str, tuple[_PACKAGE, ...]]
    exclude: tuple[str, ...] = ()
    overlay: str = ""  # a folder beside the recipe
    agent: str = Field(pattern=r"^/[a-z0-9/_-]+$")
    enable: tuple[str, ...] = ()
    layers: dict[str, Layer] = Field(default_factory=dict)
    # where the recipe was read from (its overlay is beside it)
    folder: Path = Field(default=Path("."), exclude=True)

    def all_packages(self, layers: tuple[str, ...] = ()) -> list[str]:
        """The packages a build installs, the kernel and init first, then each list in the
        recipe's order, then the layers' (each once)."""
        names = [self.kernel, self.init]
        for group in self.packages.values():
            names += group
        for layer in self.layer_list(layers):
            names += layer.packages
        return list(dict.fromkeys(names))

    def layer_list(self, names: tuple[str, ...]) -> list[Layer]:
        unknown = [n for n in names if n not in self.layers]
        if unknown:
            known = ", ".join(sorted(self.layers)) or "none"
            raise RecipeError(f"no layer {', '.join(unknown)} in the recipe (it has: {known})")
        return [self.layers[n] for n in dict.fromkeys(names)]

    def components(self, layers: tuple[str, ...] = ()) -> list[str]:
        found = list(self.distribution.components)
        for layer in self.layer_list(layers):
            found += layer.components
        return list(dict.fromkeys(found))

    @property
    def overlay_path(self) -> Path | None:
        return self.folder / self.overlay if self.overlay else None

    def key(self, layers: tuple[str, ...], *extra: str) -> str:
        """The hash of what a build with `layers` reads: the recipe, the overlay's files
        (names, modes, contents) and `extra` (the agent's wheels, the build steps' version)."""
        digest = hashlib.sha256()
        digest.update(self.model_dump_json().encode())
        digest.update(repr(sorted(dict.fromkeys(layers))).encode())
        overlay = self.overlay_path
        if overlay is not None:
            for path in sorted(overlay.rglob("*")):
                digest.update(str(path.relative_to(overlay)).encode())
                digest.update(oct(path.lstat().st_mode).encode())
                if path.is_file() and not path.is_symlink():
                    digest.update(path.read_bytes())
        for item in extra:
            digest.update(item.encode())
        return digest.hexdigest()


def load_recipe(path: Path) -> Recipe:
    """The recipe at `path`, checked; RecipeError naming the file and the field."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise RecipeError(f"cannot read {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not YAML: {exc}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a mapping")
    try:
        recipe = Recipe.model_validate({**data, "folder": path.parent})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise RecipeError(f"{path}: {where}: {first['msg']}") from None
    overlay = recipe.overlay_path
    if overlay is not None and not overlay.is_dir():
        raise RecipeError(f"{path}: overlay: {overlay} is not a folder")
    return recipe
