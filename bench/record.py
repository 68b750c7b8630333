"""One way for every bench to keep its numbers: ``bench/results/<name>.json``, committed.

Each file says what produced it (the command line, the commit, the date) and on what (the machine and
its load at the start and the end of the run), so a number in the documentation can be traced to a
file and rerun. Written whole or not at all (``atomic_write``).

    from record import Recorder
    rec = Recorder("score")                      # load average read now
    ...
    rec.write({"memes_per_second": ...}, out)    # out defaults to bench/results/score.json
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
if str(ROOT) not in sys.path:  # a bench run from a checkout without `pip install -e .` (the GPU machine)
    sys.path.append(str(ROOT))


def relativise(text: str) -> str:
    """Paths inside the repository written relative to it: a committed file names no machine's folders."""
    return text.replace(json.dumps(str(ROOT) + "/")[1:-1], "")


def as_reported(result: dict, key: str):
    """A bench's own value of ``key`` in a file it wrote: ``write`` keeps it under ``<key>_as_reported``
    when the recorder's provenance uses that key (``machine``); older files have it under ``key``."""
    return result.get(f"{key}_as_reported", result.get(key))


def results_path(name: str) -> Path:
    """Where the bench called ``name`` keeps its numbers by default."""
    return RESULTS / f"{name}.json"


def machine() -> dict:
    """The machine the numbers were measured on (no GPU names a GPU-less machine explicitly)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        mem_gib = None
    gpu = None
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return {"arch": platform.machine(), "cpu": cpu, "cores": os.cpu_count(), "memory_gib": mem_gib,
            "gpu": gpu, "python": platform.python_version()}


def _commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        # Untracked files count where code lives: a new bench or module not yet committed is a change.
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "bench", "dhumor", "configs"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("+changes" if dirty else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _where(path: Path) -> str:
    """``path`` relative to the repository when inside it, else as given (never a machine-local root)."""
    try:
        return Path(path).resolve().relative_to(ROOT).as_posix()
    except ValueError:
        return str(path)


def _dhumor_source() -> str:
    """Which dhumor the bench measured: this checkout's, or an installed copy elsewhere."""
    import importlib.util

    spec = importlib.util.find_spec("dhumor")
    origin = Path(spec.origin).resolve() if spec and spec.origin else None
    if origin is None:
        return "not importable"
    return "this checkout" if ROOT in origin.parents else "an installed copy outside this checkout"


class Recorder:
    """Started when the bench starts (reads the load); ``write`` adds provenance and writes the file.

    ``argv``: the bench's arguments (default ``sys.argv[1:]``), recorded as a command that can be
    rerun from the repository root (``cwd`` says where it ran when that was elsewhere)."""

    def __init__(self, name: str, argv: list[str] | None = None):
        self.name = name
        self.argv = list(sys.argv[1:] if argv is None else argv)
        self.started = _dt.datetime.now(_dt.timezone.utc)
        self.load_start = round(os.getloadavg()[0], 2)

    def provenance(self) -> dict:
        script = _where(Path(sys.argv[0])) if sys.argv and sys.argv[0] not in ("", "-c") else f"bench/{self.name}.py"
        cwd = _where(Path.cwd())
        return {"produced_by": shlex.join(["python", script, *self.argv]),
                **({"cwd": cwd} if Path.cwd().resolve() != ROOT else {}),
                "commit": _commit(), "dhumor_measured": _dhumor_source(),
                "started_utc": self.started.isoformat(timespec="seconds"),
                "finished_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "machine": machine(),
                "load_average_1min": {"start": self.load_start, "end": round(os.getloadavg()[0], 2)}}

    def write(self, numbers: dict, out: str | os.PathLike | None = None) -> Path:
        """Write ``numbers`` plus provenance to ``out`` (default ``bench/results/<name>.json``)."""
        from dhumor.util.files import atomic_write

        path = Path(out) if out else results_path(self.name)
        prov = self.provenance()
        # A bench's own description of the machine (a string) never replaces the recorded one.
        clash = {f"{k}_as_reported": numbers[k] for k in prov if k in numbers}
        payload = {"bench": self.name, **prov, **{k: v for k, v in numbers.items() if k not in prov}, **clash}
        atomic_write(path, relativise(json.dumps(payload, indent=1, ensure_ascii=False)) + "\n")
        print(f"numbers written to {path}", file=sys.stderr)
        return path


def refuse_subset_over_default(ap, out, default: Path, subset_flags: list[str], flag: str = "--out") -> None:
    """A run that measures less than the published one (``subset_flags`` it was given) must name its
    own ``--out``: the default file holds the published numbers and is not overwritten by a subset."""
    if subset_flags and Path(out).resolve() == Path(default).resolve():
        ap.error(f"{', '.join(subset_flags)}: a subset of the published run; pass {flag} FILE (the default "
                 f"{_where(Path(default))} holds the published run)")
