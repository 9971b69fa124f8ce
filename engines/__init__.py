"""Engines: precision plans, TensorRT and ONNX Runtime runners, engine cache, accuracy gates. Knows nothing of Ray or Spark."""
