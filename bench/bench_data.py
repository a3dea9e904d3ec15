"""Data-pipeline throughput per CPU core: each stage and the whole loader, for both augmentation paths.

    python -m bench.bench_data                      # VOC-sized and 1024-px JPEG shards, 1 and 2 workers
    python -m bench.bench_data --samples 300 --workers 1,2,4 --rate 8000 --json runs/bench_data.json
    python -m bench.bench_data --device cuda        # also: the device half's ms per batch of 256 on the GPU

Shards are written to a temporary folder from the VOC images in ``../shared/data/vocmini`` (or ``--images``):
``voc`` stores them as they are (500x375, 513x513), ``1024-px`` upscales each to a 1024-px long side (bicubic,
quality 90: real content but smooth, few bits per pixel), ``1024-px-mosaic`` tiles four photos 2 x 2 into
1024x768 at about their own resolution (quality 90: photo texture everywhere, the bits per pixel of a real large
photo). The report gives each set's bits per pixel.

Stages (CPU time per sample in this process with one torch thread, median of ``--repeats`` passes):

* ``decode``: full JPEG decode to RGB with PIL (the ``cpu`` path); ``decode_turbo``: the same with libjpeg-turbo
  through simplejpeg into NumPy (:func:`groupvit.imageio.decode_array`); ``crop``: RandomResizedCrop to 224 of the
  decoded image (PIL);
* ``augment_cpu``: flip + RandAugment m9 + normalise + erasing (PIL + torch, the ``cpu`` path);
* ``decode_region_gpu``: the ``gpu`` path's CPU half per sample: the crop's region decoded (DCT-scaled where it can),
  not resized, + parameter draws; ``pack_regions``: copying a batch's regions into one buffer, per sample;
* ``device_crop_resize`` / ``device_augment``: the ``gpu`` path's batched resize / augmentation run on the CPU (on
  a GPU they cost no CPU time; shown for scale only);
* ``prompts_tagged`` / ``prompts_precomputed``: K = 3 noun prompts with NLTK tagging / from ``.nouns`` members;
* ``tokens``: tokenising caption + 3 prompts; ``collate``: stacking one sample into a batch of 32.

Loader (``num_workers=0``: everything in this process, CPU time, so one core's rate): ``cpu`` path with on-the-fly
tagging (today's default) against the ``gpu`` path's CPU half with precomputed nouns, on the same shards.
With one worker (CPU time of the worker process): the same comparison including the hand-over of each batch to
the main process (shared memory), which the in-process rate leaves out. Worker scaling (wall clock): the ``gpu``
path with 1, 2, ... workers (a worker is a process: samples/s grows with the workers until the cores run out, so
on N free cores expect about N x the one-worker rate; measure with ``--workers 1,2,4,8`` on the training
machine). ``cores per GPU`` = R pairs/s / (loader samples/s per core).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import random
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image

from bench.common import git_sha
from groupvit.imageio import decode_array, decode_image, image_size
from groupvit.tokenizer import get_tokenizer
from train.data import build_train_loader, write_shards
from train.gpu_augment import DeviceAugment
from train.prompts import add_nouns, candidate_words, make_prompts
from train.transforms import RandAugment, _to_normalized_tensor, decode_region, random_erasing, random_resized_crop

__all__ = ["CAPTIONS", "make_shards", "measure_loader", "measure_stages", "main"]

ROOT = Path(__file__).resolve().parents[1]
VOC_DIR = ROOT.parent / "shared" / "data" / "vocmini" / "JPEGImages"
_SHARED_NLTK = ROOT.parent / "shared" / "data" / "nltk_data"
CAPTIONS = (  # caption-like texts (GCC/YFCC style), cycled over the images
    "a man riding a horse along a dirt road next to a wooden fence",
    "two dogs playing with a ball on the grass in the park",
    "a red car parked in front of an old brick building",
    "people sitting at a table with bottles and glasses of wine",
    "a cat sleeping on a sofa beside the window",
    "a boat sailing on the lake under a cloudy sky",
    "a woman holding an umbrella while walking down the street",
    "a train crossing a bridge over the river at sunset",
    "children watching television in the living room",
    "a bird perched on a branch of a tree in winter",
    "an airplane flying above the mountains",
    "a bicycle leaning against a wall with a potted plant",
    "sheep grazing in a green field near a farmhouse",
    "a bus stopping at a station in the city centre",
    "a chair and a dining table in an empty kitchen",
)


def _images(src: Path, long_side: int | None, mosaic: bool = False) -> list[bytes]:
    """``src``'s JPEGs as they are, or re-encoded (quality 90) at ``long_side`` x 3/4 ``long_side``: upscaled
    (bicubic, smooth: few bits per pixel), or with ``mosaic`` as 2 x 2 tiles of four photos at about their own
    resolution (photo texture at every pixel: a real large photo's bits per pixel)."""
    files = sorted(p for p in src.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
    if not files:
        raise FileNotFoundError(f"bench_data: no JPEG in {src} (pass --images DIR)")
    if long_side is None:
        return [p.read_bytes() for p in files]
    photos = [Image.open(p).convert("RGB") for p in files]
    out = []
    for i, im in enumerate(photos):
        if mosaic:
            tw, th = long_side // 2, long_side * 3 // 8
            big = Image.new("RGB", (2 * tw, 2 * th))
            for k in range(4):
                tile = photos[(i + k) % len(photos)]
                s = max(tw / tile.width, th / tile.height)
                tile = tile.resize((math.ceil(tile.width * s), math.ceil(tile.height * s)), Image.Resampling.BICUBIC)
                big.paste(tile.crop((0, 0, tw, th)), (tw * (k % 2), th * (k // 2)))
            im = big
        else:
            s = long_side / max(im.size)
            im = im.resize((round(im.width * s), round(im.height * s)), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def _bits_per_pixel(images: Sequence[bytes]) -> float:
    return statistics.mean(8 * len(b) / math.prod(image_size(b)) for b in images)


def make_shards(
    out_dir: str | os.PathLike,
    n: int,
    *,
    src: Path = VOC_DIR,
    long_side: int | None = None,
    mosaic: bool = False,
    per_shard: int = 100,
) -> str:
    """``n`` (jpg, txt) samples cycling over ``src``'s JPEGs (re-encoded at ``long_side`` if given, see
    :func:`_images`); returns a glob pattern of the shards."""
    images = _images(Path(src), long_side, mosaic)
    samples = ((f"s{i:06d}", images[i % len(images)], CAPTIONS[i % len(CAPTIONS)]) for i in range(n))
    write_shards(samples, out_dir, "bench", maxcount=per_shard)
    return os.path.join(os.fspath(out_dir), "bench-*.tar")


def _cpu_per_sample(fn: Callable[[Any], Any], items: Sequence[Any], repeats: int) -> float:
    """Median over ``repeats`` passes of process CPU seconds per item."""
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        for it in items:
            fn(it)
        times.append((time.process_time() - t0) / len(items))
    return statistics.median(times)


def measure_stages(images: list[bytes], size: int = 224, repeats: int = 3) -> dict[str, float]:
    """CPU ms per sample of each stage (see the module docstring)."""
    rngs = lambda: iter(random.Random(i) for i in range(10**9))  # noqa: E731 - a fresh seed per call
    ra = RandAugment.from_string("rand-m9-mstd0.5-inc1")
    decoded = [decode_image(b) for b in images]
    g = rngs()
    crops = [random_resized_crop(im, size, next(g)) for im in decoded]

    def augment_cpu(im: Image.Image, g=rngs()) -> torch.Tensor:
        rng = next(g)
        if rng.random() < 0.5:
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        x = _to_normalized_tensor(ra(im, rng), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
        return random_erasing(x, rng)

    dev_aug = DeviceAugment(size)

    def decode_region_gpu(b: bytes, g=rngs()) -> tuple:
        rng = next(g)
        region = decode_region(b, size, rng)
        dev_aug.sample_params(rng)
        return region

    g = rngs()
    regions = [decode_region(b, size, next(g)) for b in images][:16]
    flat, rows = DeviceAugment.pack_regions(regions)
    batch = torch.stack([torch.from_numpy(np.array(c)).permute(2, 0, 1) for c in crops][:16])
    params = torch.from_numpy(np.stack([dev_aug.sample_params(random.Random(i)) for i in range(len(batch))]))
    caps = [CAPTIONS[i % len(CAPTIONS)] for i in range(max(len(images), 60))]
    words = {c: candidate_words(c) for c in caps}
    tok = get_tokenizer()
    one = torch.zeros(3, size, size)
    ms = {
        "decode": _cpu_per_sample(decode_image, images, repeats),
        "decode_turbo": _cpu_per_sample(decode_array, images, repeats),
        "crop": _cpu_per_sample(lambda im, g=rngs(): random_resized_crop(im, size, next(g)), decoded, repeats),
        "augment_cpu": _cpu_per_sample(augment_cpu, crops, repeats),
        "decode_region_gpu": _cpu_per_sample(decode_region_gpu, images, repeats),
        "pack_regions": _cpu_per_sample(lambda _: DeviceAugment.pack_regions(regions), [0], repeats) / len(regions),
        "device_crop_resize": _cpu_per_sample(lambda _: dev_aug.crop_resize(flat, rows), [0], repeats) / len(regions),
        "device_augment": _cpu_per_sample(lambda _: dev_aug.apply(batch, params), [0], repeats) / len(batch),
        "prompts_tagged": _cpu_per_sample(lambda c, g=rngs(): make_prompts(c, 3, next(g)), caps, repeats),
        "prompts_precomputed": _cpu_per_sample(
            lambda c, g=rngs(): make_prompts(c, 3, next(g), words=words[c]), caps, repeats
        ),
        "tokens": _cpu_per_sample(
            lambda c, g=rngs(): tok([c] + make_prompts(c, 3, next(g), words=words[c])), caps, repeats
        ),
        "collate": _cpu_per_sample(lambda _: torch.stack([one] * 32), [0], repeats) / 32,
    }
    return {k: 1000 * v for k, v in ms.items()}


def _loader(pattern: str, augment_on: str, num_workers: int, batch_size: int, batches: int, size: int) -> Any:
    loader = build_train_loader(
        pattern,
        batch_size=batch_size,
        num_workers=num_workers,
        multi_label=3,
        img_size=size,
        shuffle_buffer=0,
        seed=0,
        epoch_len=batches,
        augment_on=augment_on,
    )
    loader.device_augment = None  # measure the CPU side only: the workers' uint8 batches
    return loader


def measure_loader(
    pattern: str, *, augment_on: str, num_workers: int = 0, batch_size: int = 32, batches: int = 8, size: int = 224
) -> float:
    """Samples/s of the training loader (K = 3 prompts) over ``batches`` batches after one warm-up batch, per CPU
    second of this process with ``num_workers=0`` (one core's rate, robust to other load), per wall second with
    workers; with ``augment_on="gpu"`` only its CPU half runs (the device step is switched off)."""
    it = iter(_loader(pattern, augment_on, num_workers, batch_size, batches + 1, size))
    next(it)
    clock = time.process_time if num_workers == 0 else time.perf_counter
    t0 = clock()
    n = sum(len(b["keys"]) for b in it)
    return n / (clock() - t0)


def measure_worker_cpu(
    pattern: str, *, augment_on: str, batch_size: int = 32, batches: int = 8, size: int = 224
) -> float:
    """Samples per CPU second of one DataLoader worker process, including what :func:`measure_loader` leaves out:
    handing the batches to the main process (shared memory). The worker's CPU time (``RUSAGE_CHILDREN`` once it
    has exited) for ``batches + 1`` batches minus that for 1 batch, so start-up cancels out."""

    def run(n_batches: int) -> tuple[float, int]:
        r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        n = sum(len(b["keys"]) for b in _loader(pattern, augment_on, 1, batch_size, n_batches, size))
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        return r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime, n

    (t_short, n_short), (t_long, n_long) = run(1), run(batches + 1)
    return (n_long - n_short) / (t_long - t_short) if t_long > t_short else float("nan")  # nan: too few batches


def measure_device_augment(
    device: torch.device, images: Sequence[bytes], batch: int = 256, size: int = 224, reps: int = 10
) -> dict[str, float]:
    """Milliseconds per batch on ``device`` of the ``gpu`` path's device half: the host-to-device copy of the
    packed regions (``copy``, from pinned memory on CUDA), :meth:`DeviceAugment.crop_resize` (``resize``) and
    :meth:`DeviceAugment.apply` (``augment``), for ``batch`` crops of ``images`` (cycled); synchronised, median of
    ``reps`` after two warm-up calls. Compare with a GroupViT-S step at the same batch (``bench/bench_model.py``):
    the issue's target is <= 5 %. Also ``bytes_per_sample`` of the packed regions."""
    aug = DeviceAugment(size)
    flat, rows = aug.pack_regions(
        [decode_region(images[i % len(images)], size, random.Random(i)) for i in range(batch)]
    )
    if device.type == "cuda":
        flat = flat.pin_memory()
    params = torch.from_numpy(np.stack([aug.sample_params(random.Random(i)) for i in range(batch)]))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {"copy": [], "resize": [], "augment": []}
    for i in range(reps + 2):
        sync()
        t0 = time.perf_counter()
        dev_flat = flat.to(device, non_blocking=True)
        sync()
        t1 = time.perf_counter()
        crops = aug.crop_resize(dev_flat, rows)
        sync()
        t2 = time.perf_counter()
        aug.apply(crops, params)
        sync()
        if i >= 2:
            for k, v in zip(times, (t1 - t0, t2 - t1, time.perf_counter() - t2)):
                times[k].append(1000 * v)
    return {**{k: statistics.median(v) for k, v in times.items()}, "bytes_per_sample": flat.numel() / batch}


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(1)
    if "NLTK_DATA" not in os.environ and _SHARED_NLTK.is_dir():
        os.environ["NLTK_DATA"] = str(_SHARED_NLTK)
    res: dict[str, Any] = {
        "commit": git_sha(ROOT),
        "machine": f"{os.cpu_count()} CPU cores, {sys.platform}",
        "rate": args.rate,
        "size": args.size,
        "cases": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        large = f"{args.large_side}-px"
        for case, long_side, mosaic in (
            ("voc", None, False),
            (large, args.large_side, False),
            (large + "-mosaic", args.large_side, True),
        ):
            d = Path(tmp) / case
            pattern = make_shards(d, args.samples, src=Path(args.images), long_side=long_side, mosaic=mosaic)
            tagged = make_shards(
                Path(tmp) / (case + "-tagged"), args.samples, src=Path(args.images), long_side=long_side, mosaic=mosaic
            )
            add_nouns([tagged], workers=1)
            images = _images(Path(args.images), long_side, mosaic)
            stages = measure_stages(images, size=args.size, repeats=args.repeats)
            kw = dict(batches=max(1, args.samples // args.batch_size - 1), batch_size=args.batch_size, size=args.size)
            rates: dict[str, list[float]] = {"cpu": [], "gpu": []}
            for _ in range(args.rounds):  # alternating, so a change in the machine's load hits both alike
                rates["cpu"].append(measure_loader(pattern, augment_on="cpu", **kw))  # tagging on the fly
                rates["gpu"].append(measure_loader(tagged, augment_on="gpu", **kw))  # precomputed nouns
            base, new = statistics.median(rates["cpu"]), statistics.median(rates["gpu"])
            in_worker = {
                path: measure_worker_cpu(p, augment_on=path, **kw) for path, p in (("cpu", pattern), ("gpu", tagged))
            }
            scaling = {w: measure_loader(tagged, augment_on="gpu", num_workers=w, **kw) for w in args.workers}
            res["cases"][case] = {
                "bits_per_pixel": _bits_per_pixel(images),
                "rounds": rates,
                "stages_ms": stages,
                "loader_cpu_tagged": base,
                "loader_gpu_nouns": new,
                "speedup": new / base,
                "workers_gpu_nouns": scaling,
                "worker_cpu": in_worker,
            }
    if args.device:
        dev = torch.device(args.device)
        res["device_augment"] = {
            "device": str(dev),
            "batch": args.device_batch,
            "ms_per_batch": measure_device_augment(dev, _images(Path(args.images), None), args.device_batch, args.size),
        }
    return res


def report(res: dict[str, Any]) -> str:
    lines = [
        f"bench_data at {res['commit']} on {res['machine']} (one torch thread; CPU ms per sample, crop {res['size']})"
    ]
    for case, r in res["cases"].items():
        lines.append(
            f"[{case} JPEGs, {r['bits_per_pixel']:.2f} bits/pixel] stages: "
            + ", ".join(f"{k} {v:.2f}" for k, v in r["stages_ms"].items())
        )
        lines.append(
            f"  loader, 1 core: cpu path + tagging {r['loader_cpu_tagged']:.0f} samples/s, gpu path + "
            f"precomputed nouns {r['loader_gpu_nouns']:.0f} samples/s ({r['speedup']:.1f}x; medians of "
            f"{len(r['rounds']['cpu'])} alternating rounds)"
        )
        wc = r["worker_cpu"]
        lines.append(
            f"  1 worker, its CPU time (with the hand-over to the main process): cpu path {wc['cpu']:.0f} samples/s, "
            f"gpu path {wc['gpu']:.0f} samples/s ({wc['gpu'] / wc['cpu']:.1f}x)"
        )
        lines.append(
            "  workers (gpu path, wall clock): "
            + ", ".join(f"{w}: {v:.0f} samples/s" for w, v in r["workers_gpu_nouns"].items())
        )
        lines.append(
            f"  cores per GPU needed at {res['rate']:.0f} pairs/s: cpu path "
            f"{res['rate'] / r['loader_cpu_tagged']:.0f}, gpu path {res['rate'] / r['loader_gpu_nouns']:.0f}"
        )
    if "device_augment" in res:
        d = res["device_augment"]
        ms = d["ms_per_batch"]
        lines.append(
            f"device half on {d['device']}, ms per batch of {d['batch']} VOC crops: copy {ms['copy']:.2f}, resize "
            f"{ms['resize']:.2f}, augment {ms['augment']:.2f} ({ms['bytes_per_sample'] / 1e3:.0f} kB/sample shipped; "
            f"compare with one GroupViT-S training step at that batch)"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_data", description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=256, help="samples per shard set (default 256)")
    ap.add_argument("--images", default=str(VOC_DIR), help="folder of source JPEGs (default: the VOC mini set)")
    ap.add_argument("--workers", default="1,2", help="worker counts for the scaling run (default 1,2)")
    ap.add_argument("--rate", type=float, default=8000.0, help="pairs/s one GPU consumes (default 8000)")
    ap.add_argument("--size", type=int, default=224, help="training crop side (default 224)")
    ap.add_argument("--batch-size", type=int, default=32, help="loader batch size (default 32)")
    ap.add_argument("--large-side", type=int, default=1024, help="long side of the large-JPEG case (default 1024)")
    ap.add_argument("--repeats", type=int, default=3, help="passes per stage measurement (median)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating cpu/gpu loader measurements (median)")
    ap.add_argument("--device", help="also time the batched device augmentation there (e.g. cuda)")
    ap.add_argument("--device-batch", type=int, default=256, help="batch for --device (default 256)")
    ap.add_argument("--json", help="also write the results to this JSON file")
    args = ap.parse_args(argv)
    try:
        args.workers = [int(w) for w in args.workers.split(",") if w.strip()]
    except ValueError:
        ap.error(f"--workers takes comma-separated integers, got {args.workers!r}")
    if args.samples < 2 * args.batch_size or not Path(args.images).is_dir():
        ap.error("need --samples >= 2 x --batch-size and an existing --images folder")
    res = run(args)
    print(report(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
