"""structattn: attention as a latent alignment in a probabilistic graphical model."""

__version__ = "0.1.0"
