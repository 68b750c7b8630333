"""Built-in OCR engines: every module here registers one (see :mod:`dhumor.ocr`)."""
