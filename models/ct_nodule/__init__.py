"""The reference CT nodule segmentation model: a small 3D U-Net, its training on phantoms, ONNX export."""
