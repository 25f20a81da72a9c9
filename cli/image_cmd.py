"""`squall image build|export`: the node image of images/warewulf/node.yaml."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from .output import Format, die, err, escape, out, print_json

if TYPE_CHECKING:
    from orchestrator.nodeimage.build import BuiltImage

__all__ = ["app"]

app = typer.Typer(
    help=(
        "The node image every Squall node boots: one recipe (images/warewulf/node.yaml) "
        "built from Debian's packages into an OCI image, which an on-prem Warewulf "
        "cluster imports and from which a bootable disk is made for the clouds and for "
        "VMs on this machine (`squall run --site vm`)."
    ),
    no_args_is_help=True,
    rich_markup_mode="markdown",
)


def _say(line: str) -> None:
    err.print(f"  {escape(line)}", style="dim")


def _recipe_and_layers(recipe: Path | None, layer: list[str]):  # type: ignore[no-untyped-def]
    from orchestrator.nodeimage.recipe import RECIPE, RecipeError, checkout, load_recipe

    try:
        return load_recipe(recipe or checkout() / RECIPE), tuple(layer)
    except RecipeError as exc:
        die(str(exc))


def _built(recipe: Path | None, layer: list[str], cache: Path | None) -> BuiltImage:
    from orchestrator.nodeimage.build import build
    from orchestrator.nodeimage.recipe import RecipeError

    loaded, layers = _recipe_and_layers(recipe, layer)
    try:
        return build(loaded, layers, cache=cache, say=_say)
    except RecipeError as exc:
        die(str(exc))


def _is_local(registry: str) -> bool:
    host = registry.split("/", 1)[0].rsplit(":", 1)[0]
    insecure = {r.strip() for r in os.environ.get("SQUALL_INSECURE_REGISTRIES", "").split(",") if r}
    return host in ("127.0.0.1", "localhost", "[::1]") or registry.split("/")[0] in insecure


_RECIPE = typer.Option(None, "--recipe", help="The recipe [default: images/warewulf/node.yaml].")
_LAYER = typer.Option(
    [], "--layer", help="An optional layer of the recipe (gpu, efa, infiniband); repeatable."
)
_CACHE = typer.Option(
    None, "--cache", help="Where built images are kept [default: ~/.cache/squall/node-images]."
)


@app.command("build")
def build(
    push: str = typer.Option(
        "",
        "--push",
        metavar="REGISTRY/NAME[:TAG]",
        help="Push the image there too [default: the first of $SQUALL_SEARCH_REGISTRIES, "
        "as squall-node:DIGEST, when that is set]. Loopback and $SQUALL_INSECURE_REGISTRIES "
        "registries are reached over plain HTTP.",
    ),
    no_push: bool = typer.Option(False, "--no-push", help="Keep it in the cache only."),
    recipe: Path = _RECIPE,
    layer: list[str] = _LAYER,
    cache: Path = _CACHE,
    output: Format = typer.Option(Format.text, "--output", "-o", help="text or json."),
) -> None:
    """Build the node image (as root; minutes the first time, nothing when the cache has it).

    The root file system comes from Debian's packages (mmdebstrap), the agent is this
    checkout's `squall` with its dependencies at the versions installed here, in a venv at
    /opt/squall. Dates and file times are fixed, so that the same recipe and package
    versions can give the same digest.

    **Examples**

        squall image build
        squall image build --layer infiniband --push registry.example.com/hpc/squall-node:v1
        squall image build --no-push -o json
    """
    image = _built(recipe, layer, cache)
    facts = image.as_dict()
    destination = push
    if not destination and not no_push:
        search = [r for r in os.environ.get("SQUALL_SEARCH_REGISTRIES", "").split(",") if r]
        if search:
            destination = f"{search[0].strip()}/squall-node:{image.digest.split(':')[1][:16]}"
    if destination and not no_push:
        from orchestrator.nodeimage.build import push as push_image
        from orchestrator.nodeimage.recipe import RecipeError

        try:
            facts["pushed"] = destination
            facts["pushed_digest"] = push_image(image, destination, insecure=_is_local(destination))
        except RecipeError as exc:
            die(str(exc))
    if output is Format.json:
        print_json(facts)
        return
    how = "cached" if image.cached else f"built in {image.seconds:.0f} s"
    out.print(f"{image.digest}  {image.size / 2**20:.0f} MiB  ({how})")
    out.print(f"  OCI layout: {escape(image.reference)}")
    if "pushed" in facts:
        out.print(f"  pushed: {escape(destination)}")


@app.command("export")
def export(
    disk: Path | None = typer.Option(None, "--disk", help="Write a bootable disk to this file."),
    disk_format: str = typer.Option(
        "qcow2", "--format", help="The disk's format: raw, qcow2, vhd (Azure) or gce."
    ),
    warewulf: Path | None = typer.Option(
        None,
        "--warewulf",
        help="Write what `wwctl image import` takes: a docker-archive (a FILE.tar), or a "
        "chroot (a new or empty folder).",
    ),
    recipe: Path = _RECIPE,
    layer: list[str] = _LAYER,
    cache: Path = _CACHE,
    output: Format = typer.Option(Format.text, "--output", "-o", help="text or json."),
) -> None:
    """Export the node image (built first when the cache lacks it) for Warewulf or as a disk.

    **Examples**

        squall image export --disk node.qcow2
        squall image export --disk node.raw --format raw          # AWS snapshot import
        squall image export --warewulf squall-node.tar            # wwctl image import FILE
        squall image export --warewulf /srv/chroots/squall-node   # wwctl image import DIR
    """
    if (disk is None) == (warewulf is None):
        die("say --disk FILE or --warewulf PATH (one of them)")
    image = _built(recipe, layer, cache)
    from orchestrator.nodeimage.recipe import RecipeError

    try:
        if disk is not None:
            from orchestrator.nodeimage.disk import export_disk

            facts = export_disk(image, disk, disk_format).as_dict()
        elif warewulf is not None:
            from orchestrator.nodeimage.warewulf import export_warewulf

            facts = export_warewulf(image, warewulf).as_dict()
    except RecipeError as exc:
        die(str(exc))
    facts["digest"] = image.digest
    if output is Format.json:
        print_json(facts)
        return
    out.print(f"{escape(str(facts['path']))}  ({facts['format']}, from {image.digest})")


@app.command("publish")
def publish(
    cloud: str = typer.Option(..., "--cloud", help="aws, gcp or azure."),
    region: str = typer.Option(..., "--region", help="The region the image is made in."),
    blob_url: str = typer.Option(
        "",
        "--blob-url",
        help="Azure: the VHD (`squall image export --disk F --format vhd`) uploaded as a page "
        "blob (`az storage blob upload --type page`); Pulumi's azure-native provider cannot "
        "upload page blobs.",
    ),
    recipe: Path = _RECIPE,
    layer: list[str] = _LAYER,
    cache: Path = _CACHE,
    output: Format = typer.Option(Format.text, "--output", "-o", help="text or json."),
) -> None:
    """Publish the node image as a cloud region's machine image, with a Pulumi stack.

    The disk is exported in the format the cloud imports (AWS raw, GCE tar.gz, Azure fixed
    VHD), uploaded to a private bucket of the stack's, and made an AMI, a GCE image or an
    Azure image that boots UEFI. The stack is in the ledger (`squall stack list`) and stays
    until `squall stack destroy squall-image-...` takes it and the image down. Needs the
    pulumi CLI and the cloud's credentials, as a cloud run does.

    **Examples**

        squall image publish --cloud aws --region us-east-2
        squall image publish --cloud gcp --region us-central1 -o json | jq -r .image
    """
    from orchestrator.local_site import LocalSettings, stack_driver
    from orchestrator.nodeimage.publish import check_request, publish_image
    from orchestrator.nodeimage.recipe import RecipeError
    from orchestrator.provision import ProvisionError

    try:
        check_request(cloud, blob_url or None)
    except RecipeError as exc:
        die(str(exc))
    image = _built(recipe, layer, cache)
    try:
        done = publish_image(
            image, cloud, region, stack_driver(LocalSettings()), _say, blob_url or None
        )
    except RecipeError as exc:
        die(str(exc))
    except ProvisionError as exc:
        die(str(exc), exc.category)
    made = done.image
    if output is Format.json:
        print_json(dataclasses.asdict(done))
        return
    out.print(f"{escape(made)}")
    err.print(f"set SQUALL_IMAGE_{cloud.upper()}={escape(made)} for clusters to boot it")
