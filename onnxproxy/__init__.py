"""onnxproxy: ProxyGrad activation maximization for ONNX classifiers, validated by onnxruntime.

Importing the package is cheap: torch and onnx2torch are imported only by the modules that need them.
"""

__version__ = "0.1.0"
