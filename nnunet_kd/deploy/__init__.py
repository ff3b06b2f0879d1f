"""Prediction for deployment: the batched sliding window and the Python API, ONNX export, the CPU runtimes that run
an export, and oneDNN convolutions for narrow networks."""
