"""medcare: two-stage MedCare fine-tuning (knowledge aggregation, then alignment) on Hugging Face models.

The training layer (adapters, injection, data, trainer, transition, export) arrives with the pipeline
issue; the kernels it calls live in `medcare_kernels`.
"""

__version__ = "0.1.0"
