"""Image sources, ImageNet class names, ImageNet-C corruptions and the float32 ulp nudge."""

from la_iprop.data.corruptions import Corruption, corruption_names, parse_corruption
from la_iprop.data.nudge import nudge_toward_half
from la_iprop.data.sources import (
                                   Batch,
                                   ImageSource,
                                   class_name,
                                   class_names,
                                   open_source,
                                   read_labels_json,
                                   resize_center_crop,
                                   to_rgb_float,
)

__all__ = ["Batch", "ImageSource", "class_name", "class_names", "open_source", "resize_center_crop", "to_rgb_float",
           "read_labels_json", "Corruption", "corruption_names", "parse_corruption", "nudge_toward_half"]
