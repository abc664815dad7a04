"""The model I/O contract and its one eval transform."""

from __future__ import annotations

import numpy as np
import pytest

from cellpipe.contract import DEFAULT_CROP, ModelContract, to_model_input
from cellpipe.data.geometry import CropGeometry
from cellpipe.errors import ParamsError
from cellpipe.params import load_section
from cellpipe.slides.scoring import ScoreParams

CONTRACT = ModelContract(class_names=("a", "b"), image_size=4, mean=(0.5, 0.25, 0.0),
                         std=(0.5, 0.25, 1.0))


def test_normalises_per_channel_and_moves_channels_first() -> None:
    image = np.zeros((4, 4, 3), np.uint8)
    image[..., 0], image[..., 1], image[..., 2] = 255, 0, 51
    batch = to_model_input(image, CONTRACT)
    assert batch.shape == (1, 3, 4, 4) and batch.dtype == np.float32
    np.testing.assert_allclose(batch[0, 0], (1.0 - 0.5) / 0.5)
    np.testing.assert_allclose(batch[0, 1], (0.0 - 0.25) / 0.25)
    np.testing.assert_allclose(batch[0, 2], 0.2, rtol=1e-6)


def test_rejects_inputs_that_break_the_contract() -> None:
    with pytest.raises(ValueError, match="uint8"):
        to_model_input(np.zeros((1, 4, 4, 3), np.float32), CONTRACT)
    with pytest.raises(ValueError, match="N×4×4×3"):
        to_model_input(np.zeros((1, 8, 8, 3), np.uint8), CONTRACT)


def test_round_trips_through_a_dict() -> None:
    assert ModelContract.from_dict(CONTRACT.to_dict()) == CONTRACT
    assert CONTRACT.input_shape == (3, 4, 4)
    cropped = ModelContract(("a",), 4, (0, 0, 0), (1, 1, 1),
                            crop=CropGeometry(0.3, square=False, border="shift"))
    assert ModelContract.from_dict(cropped.to_dict()) == cropped


def test_a_contract_from_before_crop_geometry_scores_with_ingest_defaults() -> None:
    """Models published before the contract carried the geometry still load and score."""
    old = CONTRACT.to_dict()
    del old["crop"]
    contract = ModelContract.from_dict(old)
    assert contract.crop is None and contract.crop_geometry == DEFAULT_CROP


def test_scoring_params_refuse_to_restate_the_crop_geometry(tmp_path) -> None:  # noqa: ANN001
    """score.pad_fraction / border are gone: the error says where the geometry comes from."""
    params = tmp_path / "params.yaml"
    params.write_text("score:\n  pad_fraction: 0.15\n  border: fill\n")
    with pytest.raises(ParamsError, match="score.border, score.pad_fraction: the crop "
                                          "geometry now comes from the served model"):
        load_section(ScoreParams, "score", params)
    assert ScoreParams().mode == "cells"
