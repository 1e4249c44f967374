"""The modalities an item can hold, defined once for the model, the data readers and the training code.

`MEDIA_MODALITIES` is the order media are encoded in (images, then videos through the image tower, then audio);
`MODALITIES` adds text, which every model reads.
"""
MEDIA_MODALITIES = ("image", "video", "audio")
MODALITIES = ("text",) + MEDIA_MODALITIES

__all__ = ["MODALITIES", "MEDIA_MODALITIES"]
