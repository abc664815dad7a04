"""Triton Python model: encoded image bytes (PNG, JPEG, TIFF…) → the classifier's input.

It calls cellpipe's own ``encoded_to_model_input``, the evaluation transform the
model was trained with, so files sent as they are get exactly the pixels the
training shards had. The contract comes from this model's config parameters,
written by ``cellpipe publish`` from the same checkpoint as the classifier.
"""

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from cellpipe.contract import ModelContract, encoded_to_model_input


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        contract = config["parameters"]["cellpipe_contract"]["string_value"]
        self.contract = ModelContract.from_dict(json.loads(contract))

    def execute(self, requests):
        responses = []
        for request in requests:
            encoded = pb_utils.get_input_tensor_by_name(request, "image_bytes").as_numpy()
            try:
                images = np.concatenate([self._prepare(index, blob)
                                         for index, blob in enumerate(encoded.reshape(-1))])
            except ValueError as error:  # a bad image fails its request, not the server
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(error))))
                continue
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor(self.contract.input_name, images)]))
        return responses

    def _prepare(self, index, blob):
        try:
            return encoded_to_model_input([bytes(blob)], self.contract)
        except Exception as error:  # cellpipe's ImageRejected says why in words
            raise ValueError(f"image {index} of the request: {error}") from error
