"""The grid of weights-only checkpoints a run keeps for comparisons at matched loss (train.grid_every): each point
is the model of its step, as the periodic Lightning checkpoint of that step holds it, with the validation loss that
metrics.csv logged at that step; a resume drops the points of a lost continuation; a grid off the validation steps
is refused before anything runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import crate
from crate.errors import ConfigError
from crate.train.grid import GRID, grid_points
from crate.train.run import train
from test_train import metric_rows, recipe

pytestmark = pytest.mark.usefixtures("one_thread")


def _metadata(point: Path) -> dict:
    return json.loads((point / "config.json").read_text())["metadata"]


def test_grid_points_are_the_runs_models_with_their_validation_loss(data_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "r"
    cfg = recipe(data_dir, train__max_steps=8, train__val_every=2, train__grid_every=4, train__ckpt_every=4,
                 train__ckpt_keep=-1)
    train(cfg, out=run, progress=False)
    points = grid_points(run)
    assert list(points) == [4, 8]
    val = dict(metric_rows(run, "val/loss"))
    for step, point in points.items():
        assert _metadata(point)["step"] == step and _metadata(point)["val_loss"] == pytest.approx(val[step], rel=1e-6)
        lightning = torch.load(run / "checkpoints" / f"step-{step:07d}.ckpt", map_location="cpu",
                               weights_only=True)["state_dict"]
        ours = crate.load(point).state_dict()
        for k, v in ours.items():
            assert torch.equal(v, lightning[f"model.{k}"]), (step, k)
    assert sorted(val) == [2, 4, 6, 8]  # each validation at the step whose weights it measured
    final_loss = dict(metric_rows(run, "final/val_loss"))[8]  # over final_val_batches (8), not val_batches (4)
    assert final_loss == pytest.approx(_metadata(run / "final")["val_loss"], rel=1e-6) and final_loss != val[8]
    final = crate.load(run / "final").state_dict()
    assert all(torch.equal(v, final[k]) for k, v in crate.load(points[8]).state_dict().items())  # the same model
    assert not all(torch.equal(v, final[k]) for k, v in crate.load(points[4]).state_dict().items())

    # the report's reading of the run: each validated step once, the last one the final validation's
    from crate.eval.report.results import load_train_run

    curve = load_train_run(run, run / "metrics.csv")
    assert curve.steps == [2, 4, 6, 8] and curve.val_loss[-1] == pytest.approx(final_loss)

    # a point of a lost continuation (after the step a resume starts from) and a killed export's temporary go; the
    # points the resume keeps are untouched, and the run writes its new ones
    before = {s: (p / "model.safetensors").read_bytes() for s, p in points.items()}
    shutil.copytree(points[8], run / GRID / "step-0000016")
    (run / GRID / ".step-0000010.tmp-x1y2").mkdir()
    resumed = recipe(data_dir, train__max_steps=12, train__val_every=2, train__grid_every=4, train__ckpt_every=4,
                     train__ckpt_keep=-1)
    train(resumed, out=run, progress=False)
    assert sorted(p.name for p in (run / GRID).iterdir()) == ["step-0000004", "step-0000008", "step-0000012"]
    assert all((grid_points(run)[s] / "model.safetensors").read_bytes() == b for s, b in before.items())
    assert _metadata(grid_points(run)[12])["val_loss"] == pytest.approx(dict(metric_rows(run, "val/loss"))[12],
                                                                       rel=1e-6)


@pytest.mark.parametrize("over, message", [
    ({"train__val_every": 3, "train__grid_every": 4}, "multiple of train.val_every=3"),
    ({"train__val_every": 0, "train__grid_every": 4}, "multiple of train.val_every=0"),
    ({"train__grid_every": -1}, ">= 0")])
def test_a_grid_off_the_validation_steps_is_refused(data_dir: Path, over: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        recipe(data_dir, **over)
