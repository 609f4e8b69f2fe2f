"""prism: masked diffusion models and their self-correction (PRISM, ReMDM, ...)."""
__version__ = "0.1.0"
