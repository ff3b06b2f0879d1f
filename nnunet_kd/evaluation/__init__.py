"""Scores of predicted segmentations beyond nnU-Net's Dice: surface distances and what a lesion reader looks at."""
