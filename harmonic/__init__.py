"""HarmonicDet core: the paper's losses, detector adapters, data, evaluation and analyses.

Pure PyTorch + torchvision + pycocotools: nothing here imports Ray, MLflow or FastAPI.
"""

__version__ = "0.1.0"
