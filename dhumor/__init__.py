"""dhumor: dark-humor understanding for memes (D-HUMOR, ICDM 2025).

Quick start::

    from dhumor import Pipeline
    pipe = Pipeline.from_checkpoint()              # the shipped HarMeme head, offline encoders
    result = pipe.score_file("examples/astronaut.png")
    result["tasks"]["harmful"]["probs"]
"""

from dhumor.schema import DHUMOR, HARMEME, Meme, Task, TaskSchema, get_schema  # noqa: E402,F401
from dhumor.version import __version__  # noqa: F401


def __getattr__(name):
    # Heavy imports (torch, transformers) only when the pipeline is asked for.
    if name == "Pipeline":
        from dhumor.inference.pipeline import Pipeline
        return Pipeline
    if name == "load_module":
        from dhumor.model.loading import load_module
        return load_module
    raise AttributeError(name)
