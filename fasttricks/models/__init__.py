"""Models: timm networks that take [0, 1] images (``factory``), weights files read safely and
checked (``weights``), layer freezing, weight averaging. Imports runtime, recipes and data."""

from fasttricks.models.factory import Classifier, classifier_for, create_model
from fasttricks.models.weights import WeightsError, load_weights, read_info, save_weights, weights_file

__all__ = ["Classifier", "WeightsError", "classifier_for", "create_model", "load_weights", "read_info", "save_weights",
           "weights_file"]
