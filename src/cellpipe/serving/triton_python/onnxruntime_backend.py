"""A Python-based Triton backend named ``onnxruntime``: serves standard ONNX model folders.

Triton picks it for ``platform: "onnxruntime_onnx"`` when it sits at
``<backend-dir>/onnxruntime/model.py``, so the very model folder that NVIDIA's
native onnxruntime backend serves in production loads unchanged on the bundled
server. Requests that the dynamic batcher groups are run as one onnxruntime call.
"""

import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    """One onnxruntime session per model instance, built once in initialize()."""

    def initialize(self, args):
        config = json.loads(args["model_config"])
        filename = config.get("default_model_filename") or "model.onnx"
        path = os.path.join(args["model_repository"], args["model_version"], filename)
        parameters = config.get("parameters", {})
        threads = int(parameters.get("intra_op_thread_count", {}).get("string_value", "0"))
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.input_names = [tensor["name"] for tensor in config["input"]]
        self.output_names = [tensor["name"] for tensor in config["output"]]

    def execute(self, requests):
        try:
            feeds = {name: [pb_utils.get_input_tensor_by_name(request, name).as_numpy()
                            for request in requests] for name in self.input_names}
            sizes = [len(array) for array in feeds[self.input_names[0]]]
            outputs = self.session.run(
                self.output_names, {name: np.concatenate(arrays) for name, arrays in feeds.items()})
        except Exception as error:  # report to every client instead of crashing the stub
            return [pb_utils.InferenceResponse(error=pb_utils.TritonError(str(error)))
                    for _ in requests]
        bounds = np.cumsum([0, *sizes])
        return [pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor(name, output[start:stop])
                    for name, output in zip(self.output_names, outputs, strict=True)])
                for start, stop in zip(bounds[:-1], bounds[1:], strict=True)]
