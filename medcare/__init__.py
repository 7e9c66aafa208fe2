"""medcare: two-stage MedCare fine-tuning (knowledge aggregation, then alignment) on Hugging Face models.

The training layer: adapters (layers, inject), data, the trainer and its loss head, the transition into
stage 2 (stage_model), checkpoints and export, evaluation, the demo and the ablation. The kernels it calls
live in `medcare_kernels`.
"""

__version__ = "0.1.0"
