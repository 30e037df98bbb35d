"""`zoomin serve`: the ZoomIn detector as an HTTP service for camera and moderation appliances (extra `serve`)."""

from .app import create_app
from .config import ServeConfig

__all__ = ["ServeConfig", "create_app"]
