"""Rewards computed by a user's HTTP scoring server."""

from __future__ import annotations

import base64
import io
import json
import math
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from typing import Any

import torch
from PIL import Image

from .base import RewardFunction, RewardOutput, to_uint8_hwc


class RemoteReward(RewardFunction):
    """Scores a batch on a user's HTTP server: for rewards that live in another environment (e.g. the VLM scorers
    of DDPO and Flow-GRPO, which run in their own processes).

    Request: ``POST url`` with a JSON body ``{"prompts": [...], "metadata": [...], "image_format": "png" | "uint8",
    "images": [base64, ...], "shape": [H, W, 3]}``: each image is a base64 PNG, or base64 raw uint8 bytes in HWC
    order (``shape`` gives their layout). Metadata values that are not JSON types are sent as their ``str``.
    Response: JSON ``{"scores": [B numbers], "info": {...}}`` (``info`` optional). ``headers`` are sent with every
    request, after ``Content-Type: application/json`` (e.g. ``{"Authorization": "Bearer <token>"}``).

    Connection failures, timeouts (``timeout`` seconds per attempt) and HTTP 5xx answers are retried up to
    ``max_retries`` times with exponential backoff; anything else that is not a well-formed answer raises a
    ``RuntimeError`` naming the URL and what came back. No score is ever filled in.
    """

    name = "remote"

    def __init__(
        self,
        url: str,
        timeout: float = 60.0,
        max_retries: int = 2,
        backoff: float = 0.5,
        image_format: str = "png",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        scheme = urllib.parse.urlparse(url).scheme
        if scheme not in ("http", "https"):
            raise ValueError(f"url must be an http:// or https:// URL; got {url!r}")
        if image_format not in ("png", "uint8"):
            raise ValueError(f"image_format must be 'png' or 'uint8'; got {image_format!r}")
        if timeout <= 0 or max_retries < 0 or backoff < 0:
            raise ValueError(
                f"need timeout > 0, max_retries >= 0 and backoff >= 0; got {timeout}, {max_retries}, {backoff}"
            )
        self.url = url
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)
        self.backoff = float(backoff)
        self.image_format = image_format
        self.headers = {"Content-Type": "application/json", **(headers or {})}

    def encode_request(self, images: torch.Tensor, prompts: list[str], metadata: list[dict[str, Any]]) -> bytes:
        """The JSON request body for a batch."""
        arrays = to_uint8_hwc(images)
        if self.image_format == "png":
            encoded = []
            for array in arrays:
                buffer = io.BytesIO()
                Image.fromarray(array).save(buffer, format="PNG")
                encoded.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
        else:
            encoded = [base64.b64encode(array.tobytes()).decode("ascii") for array in arrays]
        body = {
            "prompts": prompts,
            "metadata": metadata,
            "image_format": self.image_format,
            "shape": list(arrays.shape[1:]),
            "images": encoded,
        }
        return json.dumps(body, default=str).encode("utf-8")

    def _post(self, body: bytes) -> bytes:
        errors = []
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            request = urllib.request.Request(self.url, data=body, headers=self.headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return response.read()
            except urllib.error.HTTPError as error:
                detail = error.read()[:200].decode("utf-8", "replace")
                if error.code < 500:
                    raise RuntimeError(
                        f"remote reward at {self.url} answered HTTP {error.code} {error.reason}: {detail!r}"
                    ) from error
                errors.append(f"HTTP {error.code} {error.reason}: {detail!r}")
            except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
                reason = getattr(error, "reason", error)
                errors.append(f"{type(reason).__name__}: {reason}")
        raise RuntimeError(
            f"remote reward at {self.url} failed after {self.max_retries + 1} attempts (timeout {self.timeout}s): "
            + "; ".join(errors)
        )

    def decode_response(self, raw: bytes, batch_size: int) -> tuple[list[float], dict[str, Any]]:
        """Parse and check a server answer; raises ``RuntimeError`` naming the URL and the answer if malformed."""
        excerpt = raw[:200].decode("utf-8", "replace")
        try:
            answer = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise RuntimeError(f"remote reward at {self.url} answered non-JSON ({error}): {excerpt!r}") from error
        scores = answer.get("scores") if isinstance(answer, dict) else None
        if not isinstance(scores, list):
            raise RuntimeError(
                f"remote reward at {self.url} answered without a 'scores' list (expected "
                f'{{"scores": [{batch_size} numbers]}}): {excerpt!r}'
            )
        if len(scores) != batch_size:
            raise RuntimeError(
                f"remote reward at {self.url} answered {len(scores)} scores for a batch of {batch_size}: {excerpt!r}"
            )
        if not all(isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s) for s in scores):
            raise RuntimeError(f"remote reward at {self.url} answered non-numeric or non-finite scores: {excerpt!r}")
        info = answer.get("info", {})
        if not isinstance(info, dict):
            raise RuntimeError(f"remote reward at {self.url} answered an 'info' that is not an object: {excerpt!r}")
        return [float(s) for s in scores], info

    def score(self, images: torch.Tensor, prompts: list[str], metadata: list[dict[str, Any]]) -> RewardOutput:
        raw = self._post(self.encode_request(images, prompts, metadata))
        scores, info = self.decode_response(raw, images.shape[0])
        return torch.tensor(scores, dtype=torch.float32), info
