"""The model I/O contract and its one eval transform."""

from __future__ import annotations

import numpy as np
import pytest

from cellpipe.contract import ModelContract, to_model_input

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
