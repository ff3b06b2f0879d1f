"""The teacher side: a trained nnU-Net model found, checked and frozen, and its outputs computed once and stored as
training targets (dense or top-k), then read back through nnU-Net's data loader."""
