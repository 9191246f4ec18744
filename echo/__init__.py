"""Echo: self-hosted real-time messaging with in-transit middleware."""

__version__ = "0.1.0"
