"""Where models (`models`: the embedded digits_resnet, pytorchcv names, local weights) and data (`data`) come from."""
