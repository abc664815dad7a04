"""Python code that runs inside Triton (copied into place, never imported by cellpipe).

``onnxruntime_backend.py`` becomes ``<backend-dir>/onnxruntime/model.py``: a
Python-based backend that runs ``platform: onnxruntime_onnx`` models where the
server build has no native onnxruntime backend (the one bundled in
nvidia-pytriton). ``preprocess_model.py`` becomes the ``model.py`` of each
published preprocess version.
"""
