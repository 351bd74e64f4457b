"""Throughput of `semjpeg evaluate` on FnApiRunner against a plain Python loop doing the same work.

Both run clean + FGSM (eps 4/255) x none + jpeg:quality=50 with EfficientNet-Lite0 on the same dev
images, batch 16, each in a fresh process (model loading included in both). The loop calls the
same transforms/ functions and writes the same kinds of outputs (tars, Parquet). Prints one JSON
line: images/s of each and ratio = pipeline / loop (target >= 0.85).

    python bench/pipeline.py [--quick] [--n 96] [--repeats 2]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

# Run as a script, bench/ would come first on sys.path and this file would shadow the
# `pipeline` package: put the project root there instead.
_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [str(_ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != _ROOT / "bench"]

from bench._common import ROOT, dev_files, emit, positive_int  # noqa: E402

ATTACK = "fgsm:eps=4/255"
DEFENSE = "jpeg:quality=50"
BATCH = 16


def make_shards(folder: Path, n: int, per_shard: int) -> list[Path]:
    from tests.shards import write_tar

    files = dev_files(n)
    shards = []
    for s in range(0, n, per_shard):
        members = []
        for path, label in files[s : s + per_shard]:
            key = path.stem.replace(".", "_")
            members += [(f"{key}.jpg", path.read_bytes()), (f"{key}.cls", str(label).encode())]
        shards.append(write_tar(folder / f"dev-{s // per_shard:05d}.tar", members))
    return shards


def run_loop(shards: list[str], out: str) -> None:
    """The same work as the pipeline, as one process's loop over batches."""
    import io
    import tarfile

    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from transforms import metrics
    from transforms.attacks import parse_attack, run_attack
    from transforms.defenses import apply_defense, parse_defense
    from transforms.images import decode_image, to_tensor, to_uint8
    from transforms.jpeg import decode_rgb
    from transforms.models import build_model

    from pipeline.allocator import keep_freed_memory

    keep_freed_memory()  # as the pipeline's stages do when they load their model
    model = build_model("efficientnet_lite0")
    attack, defenses = parse_attack(ATTACK), [parse_defense("none"), parse_defense(DEFENSE)]
    samples = []
    for shard in shards:
        with tarfile.open(shard) as tf:
            members = {m.name: tf.extractfile(m).read() for m in tf if m.isfile()}
        for name, data in sorted(members.items()):
            if name.endswith(".jpg"):
                key = name[:-4]
                samples.append((key, int(members[f"{key}.cls"]), decode_image(data)))
    rows, blobs = [], {}
    for b in range(0, len(samples), BATCH):
        chunk = samples[b : b + BATCH]
        x = to_tensor([s[2] for s in chunk])
        with torch.no_grad():
            logits = model(x)
        labels = logits.argmax(1)
        adv = run_attack(attack, model, x, labels, clean_logits=logits)[0].images
        with torch.no_grad():
            adv_logits = model(adv)
        success = adv_logits.argmax(1) != labels
        for name, imgs, known in (("clean", x, logits), (ATTACK, adv, adv_logits)):
            u8 = to_uint8(imgs)
            for d in defenses:
                enc = [apply_defense(d, im) for im in u8]
                seen = to_tensor([im if e.ext == "png" else decode_rgb(e.data) for im, e in zip(u8, enc)])
                with torch.no_grad():  # lossless PNG: the logits already computed for these pixels
                    probs = torch.softmax(known if d.name == "none" else model(seen), 1)
                    psnr, ssim = metrics.psnr(seen, x), metrics.ssim(seen, x)
                top_p, top_i = probs.topk(5, 1)
                for i, (key, label, _) in enumerate(chunk):
                    blobs.setdefault((name, d.text), []).append((f"{key}.{enc[i].ext}", enc[i].data))
                    rows.append({"key": key, "attack": name, "defense": d.text, "pred": int(top_i[i, 0]),
                                 "label": label, "bytes": len(enc[i].data), "psnr": float(psnr[i]),
                                 "ssim": float(ssim[i]), "success": None if name == "clean" else bool(success[i])})
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    for i, ((a, d), members) in enumerate(sorted(blobs.items())):
        with tarfile.open(out_dir / f"{i}.tar", "w") as tf:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    pq.write_table(pa.Table.from_pylist(rows), out_dir / "metadata.parquet", compression="zstd")


def run_pipeline(shards: list[str], out: str) -> None:
    from jobs.__main__ import main

    code = main(["evaluate", *sum((["--input", s] for s in shards), []), "--output", out,
                 "--attack", ATTACK, "--defense", DEFENSE, "--batch-size", str(BATCH), "--runner", "FnApiRunner"])
    if code:
        raise SystemExit(code)


def timed(mode: str, shards: list[Path], out: Path) -> float:
    """Seconds for one fresh process to do the whole job."""
    code = (
        "import sys, time; sys.path.insert(0, %r)\n"
        "import torch; torch.set_num_threads(2)\n"
        "t = time.perf_counter()\n"
        "from pipeline import __name__ as _\n"
        "import bench.pipeline as b\n"
        "b.run_%s(%r, %r)\n"
        "print('SECONDS', time.perf_counter() - t)\n"
    ) % (str(ROOT), mode, [str(s) for s in shards], str(out))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    if r.returncode:
        raise RuntimeError(f"{mode} failed:\n{r.stderr[-3000:]}")
    return float(r.stdout.strip().splitlines()[-1].split()[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="32 images, one repeat")
    ap.add_argument("--n", type=positive_int, default=96)
    ap.add_argument("--repeats", type=positive_int, default=2)
    args = ap.parse_args()
    n, repeats = (32, 1) if args.quick else (args.n, args.repeats)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "in").mkdir()
        shards = make_shards(tmp / "in", n, per_shard=max(1, n // 2))
        times = {"loop": [], "pipeline": []}
        for r in range(repeats):
            for mode in ("loop", "pipeline"):
                times[mode].append(timed(mode, shards, tmp / f"{mode}-{r}"))
    best = {m: min(t) for m, t in times.items()}
    emit({
        "bench": "pipeline", "images": n, "variants_per_image": 4, "batch_size": BATCH,
        "loop_images_per_s": round(n / best["loop"], 3),
        "pipeline_images_per_s": round(n / best["pipeline"], 3),
        "ratio": round(best["loop"] / best["pipeline"], 3),
        "seconds": {m: [round(x, 2) for x in t] for m, t in times.items()},
        "runner": "FnApiRunner", "target_ratio": 0.85,
    })


if __name__ == "__main__":
    main()
