"""QC benchmarks: train the learned estimator, score both estimators on synthetic slides, time QC vs enhancement.

::

    python benchmarks/qc_bench.py train      # learned estimator → lpfm_toolkit/bundles/lpfm-tiny/estimator/
    python benchmarks/qc_bench.py evaluate   # ROC AUC, Spearman, false positives → benchmarks/results/qc_eval.json
    python benchmarks/qc_bench.py speed      # QC vs enhancement per gigapixel → results/qc_speed.json,
                                             # QC peak memory per slide size → results/qc_memory.json

Training uses training_data/train/ and the sample slide; every evaluation slide is built from
training_data/eval/ (other scanners and stains, never trained on; training_data/SOURCES.md).
Run at ``nice -n 10`` with one thread on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def cmd_train(args: argparse.Namespace) -> None:
    import torch

    from lpfm_toolkit.engine.estimate_learned import ESTIMATOR_DIR, train, training_set
    from lpfm_toolkit.engine.estimate_synthetic import source_tissue

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    sources = source_tissue("train")
    cache = Path(args.cache) if args.cache else None
    if cache is not None and cache.is_file():
        data = dict(np.load(cache))
        print(f"training set: {len(data['y'])} samples from {cache}", flush=True)
    else:
        data = training_set(
            list(sources.values()),
            args.samples,
            seed=args.seed,
            progress=lambda i, n: i % 500 == 0 and print(f"data {i}/{n}", flush=True),
        )
        if cache is not None:
            np.savez(cache, **data)
    t_data = time.perf_counter() - t0
    print(f"training set: {len(data['y'])} samples in {t_data:.0f} s", flush=True)
    t1 = time.perf_counter()
    est = train(
        data,
        steps=args.steps,
        seed=args.seed,
        progress=lambda s, n, loss: print(f"step {s}/{n} loss {loss:.4f}", flush=True),
    )
    t_train = time.perf_counter() - t1
    out = Path(args.out) if args.out else ESTIMATOR_DIR
    est.save(
        out,
        {
            "training": {
                "data": sorted(sources),
                "data_note": "training_data/train/ and the bundled sample slide (training_data/SOURCES.md); "
                "never the eval/ images",
                "degradations": "Gaussian blur σ 0.3–4.8 → Gaussian noise σ 2–48 → JPEG quality 20–95 (each p 0.55), "
                "a quarter blind_degrade(task='any'), 20 % clean; random scale 0.5–1×, 25 % simulated H-DAB",
                "samples": int(len(data["y"])),
                "steps": args.steps,
                "seed": args.seed,
                "threads": args.threads,
                "data_seconds": round(t_data),
                "train_seconds": round(t_train),
                "command": f"nice -n 10 python benchmarks/qc_bench.py train --samples {args.samples} "
                f"--steps {args.steps}",
            }
        },
    )
    print(f"saved to {out} ({t_train:.0f} s training)")


def synthetic_set(n_slides: int, size: int, seed: int = 100, split: str = "eval") -> list[Any]:
    """Synthetic slides from one split's real tissue (every 256-px tile one crop of one source)."""
    from lpfm_toolkit.engine.estimate_synthetic import source_tissue, synthetic_slide, tissue_mosaic

    src = list(source_tissue(split).values())
    return [
        synthetic_slide(tissue_mosaic(src, size, size, seed=seed + k, patch=256), seed=seed + k)
        for k in range(n_slides)
    ]


def tiles_of(slide: Any) -> list[np.ndarray]:
    return [slide.image[t.y : t.y + t.size, t.x : t.x + t.size].astype(np.float32) / 255 for t in slide.truth]


def clean_sets(stride: int = 64) -> dict[str, list[np.ndarray]]:
    """Clean 256-px tiles of the held-out (eval) sources where blur checks cry wolf: sparse tissue (25–75 %:
    loose stroma, lumina, tissue borders), every tissue tile, and the same tissue with a faded stain (optical
    density × 0.4, a pale or old slide) — all at 0.5 µm/px — and the 40× scans' own pixels (not resampled)."""
    from lpfm_toolkit.engine.estimate import tissue_mask
    from lpfm_toolkit.engine.estimate_synthetic import TRAINING_DATA, _read_source, source_tissue

    sets: dict[str, list[np.ndarray]] = {"sparse": [], "dense": [], "faded": [], "native_40x": []}
    for img in source_tissue("eval").values():
        src = img.astype(np.float32) / 255
        for y in range(0, src.shape[0] - 256 + 1, stride):
            for x in range(0, src.shape[1] - 256 + 1, stride):
                t = np.ascontiguousarray(src[y : y + 256, x : x + 256])
                frac = float(tissue_mask(t).mean())
                if 0.25 <= frac < 0.75:
                    sets["sparse"].append(t)
                elif frac >= 0.75 and x % 128 == 0 and y % 128 == 0:
                    sets["dense"].append(t)
                if frac >= 0.25 and x % 128 == 0 and y % 128 == 0:
                    od = -np.log(np.clip(t, 1 / 255, 1.0))
                    faded = np.round(np.exp(-0.4 * od) * 255) / 255
                    sets["faded"].append(faded.astype(np.float32))
    for path in sorted((TRAINING_DATA / "eval").iterdir()):
        src = _read_source(path, 1.0).astype(np.float32) / 255  # mpp 1.0: kept as scanned
        for y in range(0, src.shape[0] - 256 + 1, 256):
            for x in range(0, src.shape[1] - 256 + 1, 256):
                t = np.ascontiguousarray(src[y : y + 256, x : x + 256])
                if tissue_mask(t).mean() >= 0.25:
                    sets["native_40x"].append(t)
    return sets


def _values(ests: list[Any]) -> dict[str, np.ndarray]:
    return {
        "blur": np.array([e.blur_sigma for e in ests], np.float64),
        "noise": np.array([e.noise_sigma for e in ests], np.float64),
        "jpeg": np.array([100.0 - e.jpeg_quality for e in ests], np.float64),
    }


def thresholds_at_tpr(slides: list[Any], est: Any, tpr: float = 0.9) -> dict[str, float]:
    """Per defect, the estimate above which ``tpr`` of the defective tissue tiles of ``slides`` lie."""
    truth = [t for s in slides for t in s.truth]
    vals = _values([e for s in slides for e in est.estimate(tiles_of(s))])
    keep = np.array([t.tissue >= 0.25 for t in truth])
    pos = {
        "blur": np.array([t.blur > 0 for t in truth]),
        "noise": np.array([t.noise > 0 for t in truth]),
        "jpeg": np.array([t.quality > 0 for t in truth]),
    }
    out = {}
    for k, v in vals.items():
        x = v[keep & pos[k]]
        finite = np.sort(x[np.isfinite(x)])[::-1]
        need = int(np.ceil(tpr * len(x)))  # tiles to flag; a NaN estimate is never flagged
        out[k] = float(finite[min(need, len(finite)) - 1] - 1e-6)
    return out


def cmd_evaluate(args: argparse.Namespace) -> None:
    import torch

    from lpfm_toolkit.engine.estimate import ClassicalEstimator, Thresholds
    from lpfm_toolkit.engine.estimate_learned import LearnedEstimator
    from lpfm_toolkit.engine.estimate_synthetic import score_estimates, source_tissue

    torch.set_num_threads(args.threads)
    slides = synthetic_set(args.slides, args.size)
    truth = [t for s in slides for t in s.truth]
    result: dict[str, Any] = {
        "slides": args.slides,
        "size": args.size,
        "tile": 256,
        "source": "training_data/eval/ (cross-source, never trained on): " + ", ".join(source_tissue("eval")),
        "scale_um_per_px": 0.5,
    }
    estimators: list[Any] = [ClassicalEstimator()]
    try:
        estimators.append(LearnedEstimator.load(args.estimator) if args.estimator else LearnedEstimator.load())
    except Exception as exc:  # noqa: BLE001 - report and score the classical one alone
        print(f"no learned estimator: {exc}", file=sys.stderr)
    # thresholds for the false-positive sets are chosen on separate data: synthetic slides of the
    # *training* sources, at 90 % sensitivity per defect
    validation = synthetic_set(args.val_slides, args.size, seed=500, split="train")
    clean = clean_sets()
    result["clean_sets"] = {k: len(v) for k, v in clean.items()}
    blurred = [(s, t) for s in slides for t in s.truth if t.blur and t.tissue >= 0.25]
    for est in estimators:
        t0 = time.perf_counter()
        ests = [e for s in slides for e in est.estimate(tiles_of(s))]
        result[est.name] = {**score_estimates(truth, ests), "seconds_per_tile": (time.perf_counter() - t0) / len(ests)}
        thr = thresholds_at_tpr(validation, est)
        chosen = Thresholds(blur=thr["blur"], noise=thr["noise"], quality=100.0 - thr["jpeg"])
        fp: dict[str, Any] = {"thresholds_from_validation": chosen.to_dict()}
        for name, tiles in clean.items():
            if not tiles:
                continue
            e = est.estimate(tiles)
            for label, th in (("default", Thresholds()), ("validation", chosen)):
                flags = [x.flags(th) for x in e]
                fp[f"{name}@{label}"] = {k: round(sum(f[k] for f in flags) / len(flags), 4) for k in flags[0]}
            fp[f"{name}@median_blur_sigma"] = float(np.nanmedian([x.blur_sigma for x in e]))
        result[est.name]["false_positives"] = fp
        print(est.name, json.dumps(result[est.name], indent=1), flush=True)
    # A focus measure without a tissue mask (variance of the Laplacian over the whole tile, as HistoQC's blur
    # check), its threshold set to find as many blurred tiles as the classical estimator does.
    from scipy import ndimage

    def focus(tile: np.ndarray) -> float:
        return float(ndimage.laplace(tile @ np.array([0.299, 0.587, 0.114], np.float32)).var())

    blur_focus = np.sort(
        [focus(s.image[t.y : t.y + t.size, t.x : t.x + t.size].astype(np.float32) / 255) for s, t in blurred]
    )
    tpr = result["classical"]["blur"]["tpr"]
    threshold = float(blur_focus[min(len(blur_focus) - 1, int(round(tpr * len(blur_focus))) - 1)])
    result["variance_of_laplacian"] = {
        "tpr": tpr,
        **{f"fpr_{k}": sum(focus(t) <= threshold for t in v) / len(v) for k, v in clean.items() if v},
    }
    RESULTS.mkdir(exist_ok=True)
    out = Path(args.out) if args.out else RESULTS / "qc_eval.json"
    out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=1))


def _hwm_mib() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss it is not inherited through fork/exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _qc_child(slide: str, estimator: str) -> None:
    """One QC run in its own process: prints seconds and peak memory (MiB) as JSON."""
    from lpfm_toolkit.qc import assess, get_estimator
    from lpfm_toolkit.sources import open_image

    est = get_estimator(estimator)
    with open_image(slide) as h:
        lv = h.levels[0]
        before = _hwm_mib()
        t0 = time.perf_counter()
        qc = assess(h, estimator=est)
        seconds = time.perf_counter() - t0
    print(
        json.dumps(
            {
                "pixels": lv.width * lv.height,
                "tiles": len(qc.tiles),
                "seconds": round(seconds, 2),
                "peak_rss_mib": round(_hwm_mib(), 1),
                "rss_before_qc_mib": round(before, 1),
            }
        )
    )


def cmd_speed(args: argparse.Namespace) -> None:
    """QC vs enhancement of the same region in one process, then QC's peak memory at growing slide sizes."""
    import subprocess
    import tempfile

    import torch

    from lpfm_toolkit.engine import get_engine
    from lpfm_toolkit.pipeline import plan, run_item
    from lpfm_toolkit.prompts import parse_prompt
    from lpfm_toolkit.qc import assess, get_estimator
    from lpfm_toolkit.sinks.memory import ArraySink
    from lpfm_toolkit.sources import Region, open_image

    torch.set_num_threads(args.threads)
    sample = Path(__file__).resolve().parents[1] / "lpfm_toolkit" / "data" / "cmu_small_region.svs"
    x, y, w, h = (int(v) for v in args.region.split(","))
    region = Region(x, y, w, h)
    gp = w * h / 1e9
    jobs: dict[str, Any] = {}
    with open_image(sample) as handle:
        for name in ("classical", "learned"):
            try:
                est = get_estimator(name)
            except Exception as exc:  # noqa: BLE001 - no learned estimator: time the classical one only
                print(f"{name}: {exc}", file=sys.stderr)
                continue
            assess(handle, region=Region(x, y, 256, 256), estimator=est)  # warm-up (imports)
            jobs[f"qc {name}"] = lambda est=est: assess(handle, region=region, estimator=est)
        for label, engine_name, prompt, method, steps in (
            ("enhance lpfm restore (steps 0, the default)", "lpfm", "restore", None, None),
            ("enhance lpfm restore (steps 4, refiner)", "lpfm", "restore", None, 4),
            ("enhance classical denoise (nlm)", "classical", "denoise", "nlm", None),
            ("enhance classical deblur (richardson_lucy)", "classical", "deblur", "richardson_lucy", None),
        ):
            try:
                engine = get_engine(engine_name, method=method, steps=steps)
            except Exception as exc:  # noqa: BLE001
                print(f"{label}: {exc}", file=sys.stderr)
                continue
            task = parse_prompt(prompt)
            run_item(handle, plan(handle, task, region=Region(x, y, 256, 256))[0], engine, ArraySink(), force=True)
            item = plan(handle, task, region=region)[0]
            jobs[label] = lambda engine=engine, item=item: run_item(handle, item, engine, ArraySink(), force=True)
        # round robin, so a burst of load from other processes hits every job alike; medians per job
        times: dict[str, list[float]] = {k: [] for k in jobs}
        for _ in range(args.rounds):
            for label, job in jobs.items():
                t0 = time.perf_counter()
                job()
                times[label].append(time.perf_counter() - t0)
    from statistics import median

    rows = {k: median(v) for k, v in times.items()}
    per_gp = {k: round(v / gp, 1) for k, v in rows.items()}
    ratios = {
        f"{e} / {q}": round(rows[e] / rows[q], 1)
        for e in rows
        if e.startswith("enhance")
        for q in rows
        if q.startswith("qc")
    }
    result: dict[str, Any] = {
        "region": [x, y, w, h],
        "threads": args.threads,
        "rounds": args.rounds,
        "all_seconds": times,
        "seconds": rows,
        "seconds_per_gigapixel": per_gp,
        "ratios": ratios,
    }
    print(json.dumps(result, indent=1), flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "qc_speed.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    if not args.sizes:
        return
    # memory: QC of synthetic slides of growing size, each in its own process
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from synthetic import write_synthetic_slide

    mem = []
    with tempfile.TemporaryDirectory(prefix="lpfm-qc-bench-") as tmp:
        for size in args.sizes:
            slide = write_synthetic_slide(Path(tmp) / f"synthetic-{size}.ome.tiff", size)
            out = subprocess.run(
                [sys.executable, __file__, "_child", str(slide), args.memory_estimator],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            rec = json.loads(out.strip().splitlines()[-1])
            rec["size"] = size
            mem.append(rec)
            print(json.dumps(rec), flush=True)
    text = json.dumps({"estimator": args.memory_estimator, "tile": 256, "runs": mem}, indent=1)
    (RESULTS / "qc_memory.json").write_text(text + "\n", encoding="utf-8")


def cmd_pictures(args: argparse.Namespace) -> None:
    """The pictures in docs/qc.md: a QC heat map of a synthetic slide, and --auto before/after."""
    import tempfile

    from PIL import Image, ImageDraw

    from lpfm_toolkit.engine import get_engine
    from lpfm_toolkit.engine.estimate_synthetic import degrade_region, source_tissue, synthetic_slide, tissue_mosaic
    from lpfm_toolkit.qc import assess, auto_enhance, get_estimator, write_heatmap
    from lpfm_toolkit.sinks.memory import ArraySink
    from lpfm_toolkit.sources import open_image

    RESULTS.mkdir(exist_ok=True)
    est = get_estimator(args.estimator)
    src = list(source_tissue("eval").values())  # other scanners and stains than the estimator's training
    slide = synthetic_slide(tissue_mosaic(src, 2048, 2048, seed=42, patch=256), seed=42)
    with tempfile.TemporaryDirectory() as tmp:
        path = slide.write(Path(tmp) / "synthetic.ome.tiff")
        with open_image(path) as h:
            qc = assess(h, estimator=est)
            write_heatmap(qc, h, RESULTS / "qc_heatmap.png", max_size=512)
        truth = Image.fromarray(slide.image[::4, ::4]).convert("RGB")
        d = ImageDraw.Draw(truth)
        for t in slide.truth:
            if t.clean:
                continue
            label = " ".join(
                s
                for s in (
                    f"b{t.blur:.1f}" if t.blur else "",
                    f"n{t.noise:.0f}" if t.noise else "",
                    f"q{t.quality}" if t.quality else "",
                )
                if s
            )
            d.rectangle((t.x // 4, t.y // 4, (t.x + t.size) // 4 - 1, (t.y + t.size) // 4 - 1), outline=(0, 0, 0))
            d.text((t.x // 4 + 3, t.y // 4 + 3), label, fill=(0, 0, 0))
        truth.save(RESULTS / "qc_heatmap_truth.png")
        print(json.dumps(qc.summary(), indent=1))
        clean = tissue_mosaic(src, 1024, 1024, seed=4, min_tissue=0.6, patch=256)
        img = clean.copy()
        rng = np.random.default_rng(0)
        for box, blur, noise in (((0, 0, 512, 512), 0.0, 30.0), ((512, 512, 512, 512), 3.0, 0.0)):
            img[box[1] : box[1] + box[3], box[0] : box[0] + box[2]] = degrade_region(clean, box, blur, noise, 0, rng)
        import tifffile

        p2 = Path(tmp) / "two-defects.tiff"
        tifffile.imwrite(p2, img, tile=(256, 256), photometric="rgb")
        with open_image(p2) as h:
            res = auto_enhance(h, ArraySink(), lambda task: get_engine(args.engine, task=task), estimator=est)
        out = res.result.output.extra["pixels"]
        crop = (slice(256, 768), slice(256, 768))  # where the noisy, blurred and clean quarters meet
        panel = np.concatenate(
            [
                img[crop],
                np.full((512, 8, 3), 255, np.uint8),
                out[crop],
                np.full((512, 8, 3), 255, np.uint8),
                clean[crop],
            ],
            axis=1,
        )
        pic = Image.fromarray(panel)
        d = ImageDraw.Draw(pic)
        labels = (
            "input: noise sigma 30 top left, blur sigma 3 bottom right",
            f"lpfm enhance --auto ({args.engine})",
            "clean",
        )
        for i, text in enumerate(labels):
            d.rectangle((i * 520, 0, i * 520 + 6 * len(text) + 6, 14), fill=(255, 255, 255))
            d.text((i * 520 + 3, 2), text, fill=(0, 0, 0))
        pic.save(RESULTS / "qc_auto.png")

        def psnr(a: np.ndarray, b: np.ndarray) -> float | None:
            mse = float(np.mean((a.astype(np.float64) - b) ** 2))
            return round(10 * np.log10(255.0**2 / mse), 2) if mse > 0 else None  # None: identical

        inner = {
            "noisy quarter": (slice(32, 480), slice(32, 480)),
            "blurred quarter": (slice(544, 992),) * 2,
            "clean quarter, 128 px from the defects": (slice(0, 384), slice(640, 1024)),
        }
        res.report["psnr_vs_clean"] = {
            k: {"before": psnr(img[w], clean[w]), "after": psnr(out[w], clean[w])} for k, w in inner.items()
        }
        far = inner["clean quarter, 128 px from the defects"]
        res.report["clean_quarter_identical"] = bool(np.array_equal(out[far], img[far]))
        (RESULTS / "qc_auto.json").write_text(json.dumps(res.report, indent=1) + "\n", encoding="utf-8")
        print(json.dumps({k: v for k, v in res.report.items() if k != "regions"}, indent=1))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--samples", type=int, default=8000)
    t.add_argument("--steps", type=int, default=6000)
    t.add_argument("--cache", default=None, help="an .npz of the training features: read if there, else written")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=1)
    t.add_argument("--out", default=None)
    e = sub.add_parser("evaluate")
    e.add_argument("--slides", type=int, default=6)
    e.add_argument("--size", type=int, default=2048)
    e.add_argument("--threads", type=int, default=1)
    e.add_argument("--estimator", default=None, help="estimator folder (default: the shipped one)")
    e.add_argument("--val-slides", type=int, default=2, help="slides of training tissue the FP thresholds are set on")
    e.add_argument("--out", default=None, help="result JSON (default: benchmarks/results/qc_eval.json)")
    sp = sub.add_parser("speed")
    sp.add_argument("--region", default="100,900,2048,2048", help="x,y,w,h of the sample slide to time")
    sp.add_argument("--rounds", type=int, default=3)
    sp.add_argument("--sizes", type=int, nargs="*", default=[2048, 8192, 16384], help="none: skip the memory runs")
    sp.add_argument("--threads", type=int, default=1)
    sp.add_argument("--memory-estimator", default="learned", help="the estimator of the memory runs")
    pc = sub.add_parser("pictures")
    pc.add_argument("--estimator", default="auto")
    pc.add_argument("--engine", default="auto", help="the engine --auto enhances with (default: as lpfm enhance)")
    c = sub.add_parser("_child")
    c.add_argument("slide")
    c.add_argument("estimator")
    args = p.parse_args(argv)
    if args.cmd == "_child":
        _qc_child(args.slide, args.estimator)
        return
    {"train": cmd_train, "evaluate": cmd_evaluate, "speed": cmd_speed, "pictures": cmd_pictures}[args.cmd](args)


if __name__ == "__main__":
    main()
