"""Networks and their files: the attention and feature networks and ``SlideClassifier``
(``networks``), pretrained encoders by name (``encoders``), model files in safetensors
plus JSON (``checkpoint``)."""
