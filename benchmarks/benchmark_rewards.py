"""Per-call time of each offline-runnable reward on CPU, batch 8 at 512 px.

    python benchmarks/benchmark_rewards.py [--batch 8] [--size 512] [--repeats 5]

No Hub access is assumed: the model-based rewards run on tiny random models of the real classes (built with
:mod:`dag_trl.testing.tiny_models`) that keep the real input size, 224 px, so the on-device preprocessing (resize
from 512 px, crop, normalise) is measured at full cost while the model forward passes are not representative of
ViT-L/H.
The JPEG rewards are the real thing. ``remote_reward`` talks to a local 127.0.0.1 server that answers constant
scores, so it measures the PNG encoding and HTTP round trip. HPSv2 needs the ``hpsv2`` extra (open_clip).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoProcessor  # noqa: E402

from dag_trl import rewards as R  # noqa: E402
from dag_trl.testing.images import smooth_images, to_pil  # noqa: E402
from dag_trl.testing.tiny_models import build_tiny_clip, build_tiny_imagereward  # noqa: E402


class _ConstantScores(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):
        batch = len(json.loads(self.rfile.read(int(self.headers["Content-Length"])))["prompts"])
        body = json.dumps({"scores": [1.0] * batch}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def time_call(fn, repeats: int) -> float:
    """Median seconds per call, after one untimed call (which loads any model)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    images = smooth_images(args.batch, args.size, args.size)
    prompts = ["a photo of a cat"] * args.batch
    metadata = [{} for _ in range(args.batch)]
    print(f"torch {torch.__version__}, CPU, {torch.get_num_threads()} threads; batch {args.batch} at {args.size} px")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        clip_path = str(build_tiny_clip(tmp / "clip", image_size=224, shortest_edge=224, patch_size=32))
        head = tmp / "head.pth"
        torch.save(R.AestheticMLP(16).state_dict(), head)
        imagereward_path = str(build_tiny_imagereward(tmp / "imagereward", image_size=224, patch_size=32))
        server = ThreadingHTTPServer(("127.0.0.1", 0), _ConstantScores)
        threading.Thread(target=server.serve_forever, daemon=True).start()

        tiny = "tiny random model, real 224 px preprocessing"
        rewards = [
            ("jpeg_compressibility", R.jpeg_compressibility(), "real"),
            ("jpeg_incompressibility", R.jpeg_incompressibility(), "real"),
            ("aesthetic_score", R.aesthetic_score(clip_model=clip_path, mlp_path=str(head)), tiny),
            ("pickscore", R.pickscore(clip_path, clip_path), tiny),
            ("clip_score", R.clip_score(clip_path), tiny),
            ("imagereward", R.imagereward(imagereward_path, tokenizer=imagereward_path), tiny),
            ("remote_reward", R.remote_reward(f"http://127.0.0.1:{server.server_address[1]}/"), "loopback server"),
        ]
        print(f"{'reward':<24}{'ms / call':>10}  stand-in")
        for name, reward_fn, note in rewards:
            seconds = time_call(lambda reward_fn=reward_fn: reward_fn(images, prompts, metadata), args.repeats)
            print(f"{name:<24}{seconds * 1000:>10.1f}  {note}")
        print(f"{'hpsv2':<24}{'-':>10}  not run: needs open_clip (pip install dag_trl[hpsv2]) and its ViT-H-14")

        preprocess = R.ImagePreprocessor.from_image_processor(AutoProcessor.from_pretrained(clip_path).image_processor)
        pil_processor = AutoProcessor.from_pretrained(clip_path).image_processor
        on_device = time_call(lambda: preprocess(images), args.repeats)
        pil_path = time_call(lambda: pil_processor(images=to_pil(images), return_tensors="pt"), args.repeats)
        print(
            f"preprocessing alone: torch on device {on_device * 1000:.1f} ms, transformers PIL path {pil_path * 1000:.1f} ms"
        )
        server.shutdown()
        server.server_close()


if __name__ == "__main__":
    main()
