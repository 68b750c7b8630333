"""RapidOCR: PP-OCR ONNX models shipped inside the ``rapidocr`` wheel, run by onnxruntime."""
from __future__ import annotations

import logging

from dhumor.ocr.registry import ENGINES


# min_score 0.7: chosen on 60 Harm-C *train* images (character error rate against the captions).
@ENGINES.register("rapidocr", extra="ocr", requires=("rapidocr", "onnxruntime"), min_score=0.7,
                  help="PP-OCR on onnxruntime (default; models inside the wheel)")
def rapidocr_engine():
    from rapidocr import RapidOCR

    impl = RapidOCR()
    for name in logging.root.manager.loggerDict:  # it logs every model file it opens
        if "rapidocr" in name.lower():
            logging.getLogger(name).setLevel(logging.WARNING)

    def detect(rgb):
        r = impl(rgb)
        if r.txts is None or r.boxes is None:
            return []
        return list(zip(r.boxes, r.txts, r.scores))

    return detect
