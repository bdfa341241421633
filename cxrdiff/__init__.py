"""cxrdiff: fine-tune diffusion models on chest X-rays and measure what they understand."""

__version__ = "0.2.0.dev0"
