"""The model I/O contract: one object that says how to feed a model and read it.

It is created by training from the shards' description and the backbone, stored
in the checkpoint, and (in later stages) drives the ONNX export, config.pbtxt,
labels.txt, Triton's preprocess model and the client. Scoring takes from it how a
found cell is cropped (the geometry ingest cut the training objects with) and how a
deep slide is scaled to 8 bits, so no scoring setting can restate them differently.
:func:`to_model_input` is the one evaluation transform: training, evaluation and
serving all call it, so the preprocessing cannot drift between them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from cellpipe.data.geometry import CropGeometry
from cellpipe.data.imageio import decode_rgb
from cellpipe.data.transforms import fit_square


@dataclass(frozen=True)
class ModelContract:
    """Input and output of a trained classifier, and how raw images become inputs."""

    class_names: tuple[str, ...]
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    # How a decoded image becomes an image_size² uint8 input (see data.transforms).
    resize: str = "pad"
    pad_value: int = 0
    resample: str = "bilinear"
    bit_depth_scaling: str = "percentile"
    # How objects were cut from annotated slides; None: trained on whole images (crops
    # made elsewhere), so scoring falls back to :data:`DEFAULT_CROP`.
    crop: CropGeometry | None = None
    # Tensor names and layout.
    input_name: str = "image"
    output_name: str = "logits"
    # The exported (served) model adds calibrated class probabilities under this name.
    probabilities_name: str = "probabilities"
    channels: int = 3
    input_dtype: str = "float32"

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """C×H×W of one input (the batch axis is dynamic)."""
        return (self.channels, self.image_size, self.image_size)

    @property
    def crop_geometry(self) -> CropGeometry:
        """The geometry scoring crops found objects with."""
        return self.crop or DEFAULT_CROP

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelContract:
        """The contract from :meth:`to_dict`'s output (older contracts lack ``crop``)."""
        fields = dict(data)
        for key in ("class_names", "mean", "std"):
            fields[key] = tuple(fields[key])
        if fields.get("crop") is not None:
            fields["crop"] = CropGeometry(**fields["crop"])
        return cls(**fields)


# Scoring's crop for a model trained on whole images: ingest.voc's defaults.
DEFAULT_CROP = CropGeometry()


def to_model_input(images: np.ndarray, contract: ModelContract) -> np.ndarray:
    """uint8 N×S×S×3 (or S×S×3) RGB → float32 N×3×S×S, normalised by the contract."""
    if images.ndim == 3:
        images = images[np.newaxis]
    expected = (contract.image_size, contract.image_size, contract.channels)
    if images.dtype != np.uint8 or images.shape[1:] != expected:
        raise ValueError(f"model input must be uint8 N×{'×'.join(map(str, expected))}, "
                         f"got {images.dtype} {images.shape}")
    mean = np.asarray(contract.mean, np.float32) * 255.0
    scale = 1.0 / (np.asarray(contract.std, np.float32) * 255.0)
    normalised = (images.astype(np.float32) - mean) * scale
    return np.ascontiguousarray(normalised.transpose(0, 3, 1, 2))


def fit_to_contract(rgb: np.ndarray, contract: ModelContract) -> np.ndarray:
    """Decoded H×W×3 uint8 image → the model's square uint8 input, as preprocess made it."""
    return fit_square(rgb, contract.image_size, mode=contract.resize,
                      resample=contract.resample, pad_value=contract.pad_value)


def encoded_to_model_input(encoded: Sequence[bytes], contract: ModelContract) -> np.ndarray:
    """Encoded image files (PNG, JPEG, TIFF…) → float32 N×3×S×S model input.

    Decode, fit and normalise exactly as the training data went: Triton's
    preprocess model and the file-scoring client both call this.
    """
    # The image rules of training (imageio's, default limits) apply to served files too.
    fitted = [fit_to_contract(decode_rgb(blob, scaling=contract.bit_depth_scaling), contract)
              for blob in encoded]
    return to_model_input(np.stack(fitted), contract)
