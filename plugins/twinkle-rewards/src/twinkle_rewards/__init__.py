"""Twinkle plugin: math, GSM8K, format, length, countdown and code-execution rewards."""

__version__ = "0.1.0"
