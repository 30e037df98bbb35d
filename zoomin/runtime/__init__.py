"""The lean zoomin runtime: numpy, OpenCV, onnxruntime and tokenizers only (never torch or transformers)."""

from .chat import ChatTokenizer, Image, Message, Text, render_chat
from .config import ImageConfig, ModelConfig, TextConfig, TokenIds, VisionConfig
from .crop import Crop, CropConfig, box_to_original, crop_box, crop_image, make_crop
from .image_io import ImageError, load_image
from .manifest import EngineError, Manifest
from .parse import Box, Verdict, parse_boxes, parse_verdict
from .pipeline import DetectResult, Region, ZoomIn, result_record
from .preprocess import PreprocessedImage, preprocess_image, smart_resize
from .protocol import Protocol, ProtocolError
from .providers import DeviceError
from .rope import decode_positions, mrope_positions
from .sampling import Sampling

__all__ = [
    "Box", "ChatTokenizer", "Crop", "CropConfig", "DetectResult", "DeviceError", "EngineError", "Image",
    "ImageConfig", "ImageError", "Manifest", "Message", "ModelConfig", "PreprocessedImage", "Protocol",
    "ProtocolError", "Region", "Sampling", "Text", "TextConfig", "TokenIds", "Verdict", "VisionConfig", "ZoomIn",
    "box_to_original", "crop_box", "crop_image", "decode_positions", "load_image", "make_crop", "mrope_positions",
    "parse_boxes", "parse_verdict", "preprocess_image", "render_chat", "result_record", "smart_resize",
]
