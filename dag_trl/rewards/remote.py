"""Rewards computed by a user's HTTP scoring server."""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import ssl
import threading
import urllib.parse
from collections.abc import Mapping
from typing import Any

import anyio
import anyio.from_thread
import httpx
import tenacity
import torch
from PIL import Image

from .base import FLOAT32_MAX, RewardFunction, RewardOutput, score_problem, to_uint8_hwc


class _RetryableAnswer(Exception):
    """An attempt that failed in a way worth retrying: no connection, the deadline passed, or HTTP 5xx."""


def _describe(error: BaseException) -> str:
    """``Type: message`` of ``error``, followed by its root cause's in brackets: httpx wraps the operating system's
    reason (``ConnectionRefusedError: ...``) in a ``ConnectError: All connection attempts failed``."""
    cause = error
    while cause.__cause__ is not None or cause.__context__ is not None:
        cause = cause.__cause__ or cause.__context__
    description = f"{type(error).__name__}: {error}"
    return description if cause is error else f"{description} ({type(cause).__name__}: {cause})"


class RemoteReward(RewardFunction):
    """Scores a batch on a user's HTTP server: for rewards that live in another environment (e.g. the VLM scorers
    of DDPO and Flow-GRPO, which run in their own processes).

    Request: ``POST url`` with a JSON body ``{"prompts": [...], "metadata": [...], "image_format": "png" | "uint8",
    "images": [base64, ...], "shape": [H, W, 3]}``: each image is a base64 PNG, or base64 raw uint8 bytes in HWC
    order (``shape`` gives their layout). Metadata values that are not JSON types are sent as their ``str``.
    Response: JSON ``{"scores": [B numbers], "info": {...}}`` (``info`` optional). ``headers`` are sent with every
    request, after ``Content-Type: application/json`` (e.g. ``{"Authorization": "Bearer <token>"}``).

    Connection failures, timeouts and HTTP 5xx answers are retried up to ``max_retries`` times with exponential
    backoff; anything else that is not a well-formed answer raises a ``RuntimeError`` naming the URL and what came
    back. ``timeout`` is a total deadline per attempt, for connecting, sending and receiving the whole answer, not a
    limit per socket read. Scores must be finite numbers within float32's range (1e308 would become inf). No score is
    ever filled in.
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
        # The calls in flight (they may run in the trainer's reward threads), to cancel; the event loop that runs
        # them is started by the first call to enter the provider and stopped by the last one to leave it.
        self._in_flight: set[concurrent.futures.Future] = set()
        self._in_flight_lock = threading.Lock()
        self._portal = anyio.from_thread.BlockingPortalProvider()
        # httpx's default certificate store, loaded at the first call (it takes a tenth of a second or more, which
        # must not count against a deadline) and shared by every client of this reward.
        self._ssl_context: ssl.SSLContext | None = None

    def cancel(self) -> None:
        """End every call in flight now and retry none of them: each such call raises ``RuntimeError`` saying it
        was cancelled. The trainer calls it when training is interrupted, so that the process does not wait for a
        slow server; later calls work as before."""
        with self._in_flight_lock:
            in_flight = list(self._in_flight)
        for future in in_flight:
            future.cancel()

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
        """POST ``body`` and return the answer's body. The request runs as a task of an anyio event loop in a thread
        of its own (``BlockingPortalProvider``): its deadline is a cancel scope that ends connecting, sending and
        reading alike, and :meth:`cancel` (or Ctrl-C in the waiting thread) cancels the task from any thread. A
        plain ``httpx.Client`` bounds each socket operation only, and cannot be interrupted from another thread."""
        if self._ssl_context is None:
            self._ssl_context = httpx.create_ssl_context()
        with self._portal as portal:
            future = portal.start_task_soon(self._post_with_retries, body)
            with self._in_flight_lock:
                self._in_flight.add(future)
            try:
                return future.result()
            except concurrent.futures.CancelledError:
                raise RuntimeError(f"remote reward at {self.url} was cancelled (training was interrupted).") from None
            finally:
                future.cancel()  # a no-op once done; else (an exception in this thread) the request ends too
                with self._in_flight_lock:
                    self._in_flight.discard(future)

    async def _post_with_retries(self, body: bytes) -> bytes:
        """Up to ``max_retries + 1`` attempts, ``backoff * 2 ** (k - 1)`` seconds after the ``k``-th failure."""
        errors: list[str] = []
        retrying = tenacity.AsyncRetrying(
            stop=tenacity.stop_after_attempt(self.max_retries + 1),
            wait=tenacity.wait_exponential(multiplier=self.backoff),
            retry=tenacity.retry_if_exception_type(_RetryableAnswer),
            sleep=anyio.sleep,
        )
        try:
            async with httpx.AsyncClient(verify=self._ssl_context, timeout=None, follow_redirects=True) as client:
                return await retrying(self._attempt, client, body, errors)
        except tenacity.RetryError as error:
            raise RuntimeError(
                f"remote reward at {self.url} failed after {self.max_retries + 1} attempts (deadline {self.timeout}s "
                "each): " + "; ".join(errors)
            ) from error.last_attempt.exception()

    async def _attempt(self, client: httpx.AsyncClient, body: bytes, errors: list[str]) -> bytes:
        """One request within the deadline; a failure worth retrying is described in ``errors`` and raised as
        ``_RetryableAnswer``, an HTTP 4xx raises ``RuntimeError`` at once."""
        try:
            with anyio.fail_after(self.timeout):
                response = await client.post(self.url, content=body, headers=self.headers)
        except TimeoutError as error:
            errors.append(f"TimeoutError: timed out, no complete answer within the {self.timeout}s deadline")
            raise _RetryableAnswer from error
        except httpx.TransportError as error:  # refused, reset, an answer cut short, a malformed status line
            errors.append(_describe(error))
            raise _RetryableAnswer from error
        if response.is_success:
            return response.content
        detail = response.content[:200].decode("utf-8", "replace")
        answer = f"HTTP {response.status_code} {response.reason_phrase}: {detail!r}"
        if response.status_code >= 500:
            errors.append(answer)
            raise _RetryableAnswer(answer)
        raise RuntimeError(f"remote reward at {self.url} answered {answer}")

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
        problems = [f"scores[{i}]: {problem}" for i, s in enumerate(scores) if (problem := score_problem(s))]
        if problems:
            raise RuntimeError(
                f"remote reward at {self.url} answered non-numeric or non-finite scores ({'; '.join(problems[:5])}"
                f"{' ...' if len(problems) > 5 else ''}): each must be a finite number within float32's range "
                f"(|score| <= {FLOAT32_MAX:.3g}): {excerpt!r}"
            )
        info = answer.get("info", {})
        if not isinstance(info, dict):
            raise RuntimeError(f"remote reward at {self.url} answered an 'info' that is not an object: {excerpt!r}")
        return [float(s) for s in scores], info

    def score(self, images: torch.Tensor, prompts: list[str], metadata: list[dict[str, Any]]) -> RewardOutput:
        raw = self._post(self.encode_request(images, prompts, metadata))
        scores, info = self.decode_response(raw, images.shape[0])
        return torch.tensor(scores, dtype=torch.float32), info
