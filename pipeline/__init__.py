"""Class-conditioned diffusion on MNIST: model, pipeline, data loading, training and evaluation.

Importing the package loads only the model and the pipeline; the data, training and evaluation modules are imported
explicitly (`from pipeline.training import train`) so that sampling needs nothing beyond torch and diffusers.
"""

from .modeling_class_conditioned_unet import ClassConditionedUNet
from .pipeline_class_conditioned_ddim import ClassConditionedDDIMPipeline

__all__ = ["ClassConditionedDDIMPipeline", "ClassConditionedUNet"]
