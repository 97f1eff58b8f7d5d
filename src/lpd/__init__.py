"""lpd: latent policy diffusion in pure JAX (``lpd -h`` lists the commands)."""

__version__ = "0.1.0"
