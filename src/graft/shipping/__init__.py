"""Results out: the bundle (save, load, predict), batch prediction over folders, ONNX export."""
