"""fsr: identity-preserving face super-resolution (IP-FSRGAN, IEEE Access 2020)."""

__version__ = "0.1.0"
