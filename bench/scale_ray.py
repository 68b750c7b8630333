"""`dhumor score` vs `dhumor score --engine ray` (a local Ray instance) on the same Harm-C memes, and the
per-stage costs a cluster is sized from.

    nice -n 10 python bench/scale_ray.py [--n 300] [--stage-n 20] [--repeats 1]

1. Warm-up: `dhumor score` over the N memes once, so OCR text and features are in the stage cache
   (the shared one, $DHUMOR_CACHE or ~/.cache/dhumor/cache.sqlite). Both timed engines then run on
   the same warm cache: what is compared is each engine's own cost (decode + sha256, cache reads,
   TCRNet, writing rows, and for Ray its start, scheduling and object transfers), not OCR twice.
2. Timed, alternating, each a fresh process with a fresh output: `dhumor score` (JSONL) and
   `--engine ray` (Parquet), same flags (the shipped checkpoint, batch 16), same cores. By default
   the memes come as a manifest with Harm-C's captions (``--ocr none``); ``--ocr rapidocr`` scores a
   folder of them with OCR instead (its cold warm-up is slow on a shared 2-core CPU).
   memes/s = N / the command's wall time (process start, model load and Ray start included), and
   also over the summary's `seconds` (the scoring loop; for Ray it includes starting the instance).
3. Per-stage costs, cold (a fresh temporary cache, in this process): CPU-seconds per meme of decode
   (+ sha256) and of rapidocr (process CPU time, all threads), and milliseconds per meme of the
   encoders (features) and of the TCRNet head + calibration, on this CPU.

Writes bench/results/scale_ray.json. Harm-C comes from $DHUMOR_DATA (the images are linked from a
temporary folder, never copied into the repository).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import Recorder, results_path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def harm_c_images(n: int) -> list[Path]:
    sys.path.insert(0, str(ROOT))
    from dhumor.paths import data_root

    root = data_root()
    out = []
    for split in ("val", "train"):
        manifest = root / f"{split}.jsonl"
        if not manifest.exists():
            continue
        for line in manifest.read_text().splitlines():
            rec = json.loads(line)
            p = root / "images" / rec["image"]
            if p.exists():
                out.append(p)
            if len(out) == n:
                return out
    if not out:
        sys.exit(f"Harm-C not found under {root}: set DHUMOR_DATA")
    return out


def run_cli(args: list[str], env: dict) -> tuple[float, dict, int]:
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "dhumor.cli", *args], env=env, cwd=ROOT,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t
    lines = p.stderr.strip().splitlines()
    try:
        summary = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        sys.exit(f"dhumor {' '.join(args)} failed ({p.returncode}):\n" + "\n".join(lines[-20:]))
    return wall, summary, p.returncode


def timed(src: Path, out: Path, flags: list[str], env: dict, n: int) -> dict:
    """One `dhumor score` command (either engine, by ``flags``): wall time, the loop's time, steady memes/s.

    Steady state for Ray: rows after the first batch over the time from the first to the last batch
    (from the dataset's _SUCCESS); for score: the loop (after the model loaded)."""
    wall, summary, rc = run_cli(["score", str(src), "--out", str(out), *flags], env)
    assert summary["total"] == n and summary["scored"] + summary["failed"] == n, summary
    r = {"wall_s": round(wall, 2), "loop_s": summary["seconds"], "exit": rc, "memes_per_s": round(n / wall, 2),
         "loop_memes_per_s": round(n / summary["seconds"], 2), "cache_hits": summary["cache_hits"]}
    if out.suffix == ".parquet":
        clock = json.loads((out / "_SUCCESS").read_text())["ray"]
        span = clock["last_rows_s"] - clock["first_rows_s"]
        r.update(ray_started_s=clock["ray_started_s"], first_rows_s=clock["first_rows_s"],
                 steady_memes_per_s=round((n - clock["first_rows"]) / span, 2) if span > 0 else None)
    else:
        r["steady_memes_per_s"] = r["loop_memes_per_s"]
    return r


def stage_costs(images: list[Path]) -> dict:
    """Cold per-stage costs on ``images`` with a fresh cache, in this process."""
    from dhumor.cache import StageCache
    from dhumor.images import load_image_with_digest
    from dhumor.inference.items import Item
    from dhumor.ocr import create_ocr
    from dhumor.inference.pipeline import Pipeline, Prepared

    with tempfile.TemporaryDirectory() as tmp:
        cache = StageCache(Path(tmp) / "cache.sqlite")
        ocr = create_ocr("rapidocr", cache)
        pipe = Pipeline.from_checkpoint(cache=cache, device="cpu")
        ocr.read(*load_image_with_digest(images[0]))  # load the OCR models (not timed)
        decoded, c_dec, c_ocr = [], 0.0, 0.0
        for p in images[1:]:
            c = time.process_time()
            img, sha = load_image_with_digest(p)
            c_dec += time.process_time() - c
            c = time.process_time()
            caption = ocr.read(img, sha)
            c_ocr += time.process_time() - c
            decoded.append(Prepared(Item(p.name, p), image=img, sha256=sha, caption=caption))
        k = len(decoded)
        pipe.features(decoded[:2])  # load the encoders (not timed)
        t = time.perf_counter()
        c = time.process_time()
        feats = pipe.features(decoded[2:])
        f_wall, f_cpu = time.perf_counter() - t, time.process_time() - c
        m = len(decoded) - 2
        reps = 20
        t = time.perf_counter()
        for _ in range(reps):
            pipe.forward_features(feats)
        head = (time.perf_counter() - t) / (reps * m)
        import torch

        return {"memes": k, "torch_threads": torch.get_num_threads(),
                "decode_cpu_s_per_meme": round(c_dec / k, 4), "ocr_cpu_s_per_meme": round(c_ocr / k, 3),
                "features_ms_per_meme": round(1000 * f_wall / m, 1), "features_cpu_s_per_meme": round(f_cpu / m, 3),
                "head_ms_per_meme": round(1000 * head, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=300, help="memes through both engines")
    ap.add_argument("--stage-n", type=int, default=20, help="memes for the cold per-stage costs")
    ap.add_argument("--repeats", type=int, default=1, help="timed runs of each engine (alternating)")
    ap.add_argument("--ocr", default="none", choices=["none", "rapidocr"],
                    help="none: a manifest of the memes with Harm-C's captions; rapidocr: a folder, captions by OCR "
                         "(a cold warm-up costs ~2 CPU-s per meme)")
    ap.add_argument("--cold", type=int, default=0, help="also N other memes through both engines from empty caches "
                                                        "(OCR included)")
    ap.add_argument("--skip-stages", action="store_true")
    ap.add_argument("--out", default=str(results_path("scale_ray")))
    a = ap.parse_args()
    rec = Recorder("scale_ray")

    images = harm_c_images(a.n)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1"}
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} CPU cores ({platform.processor() or 'cpu'}), "
                         "shared with other agents' work; run under nice -n 10",
              "memes": len(images), "cache": "warm for both engines (one `dhumor score` warm-up over the same memes)",
              "flags": f"--ocr {a.ocr} --batch-size 16 (ray: --ray-batch-size 16, 1 CPU per decode+OCR task, "
                       "1 model actor with 1 CPU), shipped checkpoint",
              "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    with tempfile.TemporaryDirectory() as tmp:
        if a.ocr == "rapidocr":  # a folder of links: captions read by OCR
            src = Path(tmp) / "memes"
            src.mkdir()
            for p in images:
                (src / p.name).symlink_to(p)
        else:  # a manifest of the same memes: Harm-C's own captions, no OCR
            src = Path(tmp) / "memes.jsonl"
            recs = {json.loads(l)["image"]: l for split in ("val", "train")
                    for l in (images[0].parent.parent / f"{split}.jsonl").read_text().splitlines()}
            src.write_text("".join(json.dumps({**json.loads(recs[p.name]), "image": str(p)}) + "\n" for p in images))
        common = ["--ocr", a.ocr, "--batch-size", "16", "--quiet"]
        t = time.perf_counter()
        _, warm, _ = run_cli(["score", str(src), "--out", str(Path(tmp) / "warm.jsonl"), *common], env)
        result["warmup"] = {"seconds": round(time.perf_counter() - t, 1), "cache_hits": warm["cache_hits"]}
        print(f"warm-up: {result['warmup']}", file=sys.stderr)
        runs = {"score": [], "ray": []}
        for r in range(a.repeats):
            for engine in ("score", "ray"):
                out = Path(tmp) / (f"s{r}.jsonl" if engine == "score" else f"r{r}.parquet")
                extra = ["--engine", "ray", "--ray-batch-size", "16"] if engine == "ray" else []
                runs[engine].append(timed(src, out, common + extra, env, len(images)))
                print(f"{engine}: {runs[engine][-1]}", file=sys.stderr)
        result["runs"] = runs
        best = {e: min(x["wall_s"] for x in v) for e, v in runs.items()}
        loop = {e: min(x["loop_s"] for x in v) for e, v in runs.items()}
        result["memes_per_s"] = {e: round(len(images) / best[e], 2) for e in best}
        result["ray_overhead_ratio_wall"] = round(best["ray"] / best["score"], 3)
        result["ray_overhead_ratio_loop"] = round(loop["ray"] / loop["score"], 3)
        steady = {e: max((x["steady_memes_per_s"] or 0) for x in v) for e, v in runs.items()}
        result["steady_memes_per_s"] = steady
        if steady["ray"]:
            result["ray_overhead_ratio_steady"] = round(steady["score"] / steady["ray"], 3)
        if a.cold:  # both engines from an empty cache (each its own), OCR included: the real per-meme work
            cold_imgs = harm_c_images(a.n + a.cold)[a.n:]
            csrc = Path(tmp) / "cold"
            csrc.mkdir()
            for p in cold_imgs:
                (csrc / p.name).symlink_to(p)
            cold = {}
            for engine in ("score", "ray"):
                cenv = {**env, "DHUMOR_CACHE": str(Path(tmp) / f"cold-{engine}.sqlite")}
                out = Path(tmp) / ("cold.jsonl" if engine == "score" else "cold.parquet")
                extra = ["--engine", "ray", "--ray-batch-size", "4"] if engine == "ray" else []
                cold[engine] = timed(csrc, out, ["--ocr", "rapidocr", "--batch-size", "4", "--quiet", *extra], cenv,
                                     len(cold_imgs))
                print(f"cold {engine}: {cold[engine]}", file=sys.stderr)
            result["cold"] = {"memes": len(cold_imgs), "flags": "--ocr rapidocr --batch-size 4 (ray: --ray-batch-size 4), "
                              "each engine with its own empty cache", **cold,
                              "ray_overhead_ratio_wall": round(cold["ray"]["wall_s"] / cold["score"]["wall_s"], 3),
                              "ray_overhead_ratio_steady": round(cold["score"]["steady_memes_per_s"]
                                                                 / cold["ray"]["steady_memes_per_s"], 3)
                              if cold["ray"]["steady_memes_per_s"] else None}
    if not a.skip_stages:
        result["stages_cold"] = stage_costs(harm_c_images(a.stage_n + 1)[1:] if a.stage_n else images[:2])
        print(f"stages: {result['stages_cold']}", file=sys.stderr)
    rec.write(result, a.out)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
