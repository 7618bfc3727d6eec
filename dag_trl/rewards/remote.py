"""Rewards computed by a user's HTTP scoring server."""

from __future__ import annotations

import base64
import contextlib
import functools
import http.client
import io
import json
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from PIL import Image

from .base import FLOAT32_MAX, RewardFunction, RewardOutput, score_problem, to_uint8_hwc


class _Deadline:
    """A total time limit for one HTTP exchange. A socket timeout bounds each read only, so a server that trickles a
    byte at a time could hold a request (and the epoch waiting on it) for as long as it likes; when the deadline
    passes, the connection's socket is shut down, which ends any read or write blocked on it.
    """

    def __init__(self, seconds: float) -> None:
        self.expired = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def __enter__(self) -> _Deadline:
        self._timer.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._timer.cancel()

    def register(self, sock: socket.socket) -> None:
        """Watch a connected socket (shut at once if the deadline has passed already, e.g. during a slow connect)."""
        with self._lock:
            self._sockets.append(sock)
            if self.expired:
                self._shut(sock)

    def expire(self) -> None:
        """End the exchange now, as if the deadline had passed (:meth:`RemoteReward.cancel`)."""
        self._timer.cancel()
        self._expire()

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._sockets:
                self._shut(sock)

    @staticmethod
    def _shut(sock: socket.socket) -> None:
        with contextlib.suppress(OSError):  # already closed by the client
            sock.shutdown(socket.SHUT_RDWR)


class _DeadlineConnection:
    """Mixed into an ``http.client`` connection: its socket is registered with the request's deadline."""

    def __init__(self, *args: Any, deadline: _Deadline, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.deadline = deadline

    def connect(self) -> None:
        super().connect()
        self.deadline.register(self.sock)


class _HTTPConnection(_DeadlineConnection, http.client.HTTPConnection):
    pass


class _HTTPSConnection(_DeadlineConnection, http.client.HTTPSConnection):
    pass


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, deadline: _Deadline) -> None:
        super().__init__()
        self.deadline = deadline

    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(functools.partial(_HTTPConnection, deadline=self.deadline), req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, deadline: _Deadline) -> None:
        super().__init__()
        self.deadline = deadline

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(functools.partial(_HTTPSConnection, deadline=self.deadline), req, context=self._context)


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
        # The exchanges in flight (calls may run in the trainer's reward threads) and a count of cancel() calls.
        self._in_flight: set[_Deadline] = set()
        self._in_flight_lock = threading.Lock()
        self._cancellations = 0

    def cancel(self) -> None:
        """End every request in flight now and retry none of them: each such call raises ``RuntimeError`` saying it
        was cancelled. The trainer calls it when training is interrupted, so that the process does not wait for a
        slow server; later calls work as before."""
        with self._in_flight_lock:
            self._cancellations += 1
            in_flight = list(self._in_flight)
        for deadline in in_flight:
            deadline.expire()

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
        cancellations = self._cancellations
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            request = urllib.request.Request(self.url, data=body, headers=self.headers, method="POST")
            with _Deadline(self.timeout) as deadline, self._tracked(deadline):
                if self._cancellations != cancellations:
                    raise RuntimeError(f"remote reward at {self.url} was cancelled (training was interrupted).")
                opener = urllib.request.build_opener(_HTTPHandler(deadline), _HTTPSHandler(deadline))
                try:
                    with opener.open(request, timeout=self.timeout) as response:
                        raw = response.read()
                    if not deadline.expired:
                        return raw
                    errors.append(self._timed_out())  # the answer was cut short
                except urllib.error.HTTPError as error:
                    detail = self._read_detail(error)
                    if error.code < 500:
                        raise RuntimeError(
                            f"remote reward at {self.url} answered HTTP {error.code} {error.reason}: {detail!r}"
                        ) from error
                    errors.append(f"HTTP {error.code} {error.reason}: {detail!r}")
                except (OSError, http.client.HTTPException) as error:  # URLError, timeouts, resets, cut answers
                    reason = getattr(error, "reason", error)
                    errors.append(self._timed_out() if deadline.expired else f"{type(reason).__name__}: {reason}")
                if self._cancellations != cancellations:
                    raise RuntimeError(f"remote reward at {self.url} was cancelled (training was interrupted).")
        raise RuntimeError(
            f"remote reward at {self.url} failed after {self.max_retries + 1} attempts (deadline {self.timeout}s "
            "each): " + "; ".join(errors)
        )

    @contextlib.contextmanager
    def _tracked(self, deadline: _Deadline) -> Iterator[None]:
        """Within the context, :meth:`cancel` can end ``deadline``'s exchange."""
        with self._in_flight_lock:
            self._in_flight.add(deadline)
        try:
            yield
        finally:
            with self._in_flight_lock:
                self._in_flight.discard(deadline)

    def _timed_out(self) -> str:
        return f"TimeoutError: timed out, no complete answer within the {self.timeout}s deadline"

    @staticmethod
    def _read_detail(error: urllib.error.HTTPError) -> str:
        """The start of an HTTP error's body; "" if it cannot be read (e.g. cut off by the deadline)."""
        try:
            return error.read()[:200].decode("utf-8", "replace")
        except (OSError, http.client.HTTPException):
            return ""

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
