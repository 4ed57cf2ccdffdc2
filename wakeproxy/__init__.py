"""wakeproxy: a wake-on-demand proxy that lets idle containers sleep."""

__version__ = "0.1.0"
