"""The two-stage vertebra pipeline of Serrador et al. 2024 (spine location, then vertebra by vertebra with a memory
channel), built from ordinary nnU-Net models."""
