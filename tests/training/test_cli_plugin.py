"""``locus train`` arrives through the ``locus.commands`` entry point; the node never imports training."""

from __future__ import annotations

from importlib.metadata import entry_points

from click.testing import CliRunner


def test_train_group_is_declared_and_attached() -> None:
    eps = {ep.name: ep.value for ep in entry_points(group="locus.commands")}
    assert eps.get("train") == "training.localizer.cli:train"
    from node.cli import main

    result = CliRunner().invoke(main, ["train", "--help"])
    assert result.exit_code == 0, result.output
    for sub in ("coarse", "fine", "calibrate", "evaluate", "all", "demo-weights"):
        assert sub in result.output
    result = CliRunner().invoke(main, ["train", "coarse", "--help"])
    for opt in ("--seed", "--out", "--device", "--resume"):
        assert opt in result.output
