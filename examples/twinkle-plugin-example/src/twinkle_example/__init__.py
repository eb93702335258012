"""An example third-party Twinkle plugin: a loss, a reward and a preprocessor."""

__version__ = "0.1.0"
