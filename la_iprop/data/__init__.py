"""Image sources and ImageNet class names."""

from la_iprop.data.sources import (
                                   Batch,
                                   ImageSource,
                                   class_name,
                                   class_names,
                                   open_source,
                                   resize_center_crop,
                                   to_rgb_float,
)

__all__ = ["Batch", "ImageSource", "class_name", "class_names", "open_source", "resize_center_crop", "to_rgb_float"]
