class KDConfigurationError(RuntimeError):
    """A distillation run is set up wrongly; the message names the problem and the fix."""
