"""Twinkle plugin: mode='ray' runs components as Ray actors on DeviceGroups."""

__version__ = "0.1.0"
