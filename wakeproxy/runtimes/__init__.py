"""Runtimes: the ways a backend is paused, woken, started and stopped."""

from .base import ChangeCallback, Runtime

__all__ = ["ChangeCallback", "Runtime"]
