"""`squall image`: what it refuses before building anything, each with one line saying why."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from cli.main import app

runner = CliRunner()


def squall(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.stdout + result.stderr


def test_help_teaches_the_steps() -> None:
    code, text = squall("image", "--help")
    assert code == 0
    for command in ("build", "export", "publish"):
        assert command in text
    code, text = squall("image", "export", "--help")
    assert code == 0
    assert "wwctl image import" in text


def test_an_unknown_layer_is_refused_before_a_build(tmp_path: Path) -> None:
    code, text = squall("image", "build", "--layer", "fpga", "--cache", str(tmp_path))
    assert code != 0
    assert "no layer fpga in the recipe (it has: efa, gpu, infiniband)" in text
    assert list(tmp_path.iterdir()) == []


def test_export_needs_one_destination_and_publish_a_known_cloud(tmp_path: Path) -> None:
    code, text = squall("image", "export", "--cache", str(tmp_path))
    assert code != 0
    assert "--disk FILE or --warewulf PATH" in text
    code, text = squall(
        "image", "export", "--disk", "a.raw", "--warewulf", "b.tar", "--cache", str(tmp_path)
    )
    assert code != 0
    code, text = squall("image", "publish", "--cloud", "ibm", "--region", "x")
    assert code != 0
    assert "ibm" in text
    assert "aws, gcp, azure" in text
    code, text = squall("image", "publish", "--cloud", "azure", "--region", "eastus")
    assert code != 0
    assert "page blob" in text
    assert list(tmp_path.iterdir()) == []


def test_a_broken_recipe_names_its_file_and_field(tmp_path: Path) -> None:
    recipe = tmp_path / "node.yaml"
    recipe.write_text("name: Bad Name\n")
    code, text = squall("image", "build", "--recipe", str(recipe), "--cache", str(tmp_path))
    assert code != 0
    assert f"{recipe}: name: String should match pattern" in text
