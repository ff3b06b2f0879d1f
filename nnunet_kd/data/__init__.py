"""Generated datasets in nnU-Net raw format, for the demo and the tests."""
