"""The LitServe API of ``mtl serve``: decode a request, batch rows across requests, predict, answer per task.

LitServe's batched loop fails every request of a batch when one of its calls raises. So nothing here raises for
a bad request: :meth:`MultiTaskAPI.decode_request` returns an :class:`~mtl_lightning.serve.payloads.Invalid`, the
batch runs the valid requests' rows through the model in one call, and :meth:`MultiTaskAPI.encode_response`
answers the invalid ones with their 4xx status, so a bad request never costs the others their answer.
"""

# No `from __future__ import annotations`: LitServe compares decode_request's annotation with the Request class
# itself, and a string annotation would make it hand the worker the unparsed request.
import logging
from typing import Any

import litserve as ls
import numpy as np
from starlette.requests import Request
from starlette.responses import JSONResponse

from mtl_lightning.serve.models import ServedModel, load_served_model
from mtl_lightning.serve.payloads import Invalid, Rows, answer, decode, split_rows
from mtl_lightning.serve.state import ModelState

logger = logging.getLogger(__name__)
VERSION_HEADER = "x-model-version"
BATCH_HEADER = "x-batch-rows"  # rows of the model call that answered: what the dynamic batching formed


class _Payload:
    """A request's parsed JSON body, as LitServe hands it to the worker."""

    def __init__(self, body: Any) -> None:
        self.body = body


class _Answer:
    """One request's predictions (or its refusal) and the model version that made them."""

    def __init__(self, body: dict[str, Any] | Invalid, version: int, batch_rows: int = 0) -> None:
        self.body = body
        self.version = version
        self.batch_rows = batch_rows


class MultiTaskAPI(ls.LitAPI):
    """Serves the model recorded in ``state_folder`` (:class:`~mtl_lightning.serve.state.ModelState`)."""

    def __init__(
        self,
        state_folder: str,
        max_batch_size: int = 32,
        batch_timeout: float = 0.005,
        max_rows: int = 1024,
        threshold: float = 0.5,
        strict_categories: bool = False,
        threads: int | None = None,
    ) -> None:
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout)
        self.state_folder = state_folder
        self.max_rows = max_rows
        self.threshold = threshold
        self.strict_categories = strict_categories
        self.threads = threads

    # ----------------------------------------------------------------------------------------------- the model
    def setup(self, device: str) -> None:
        if self.threads is not None:  # this worker process's intra-op threads (PyTorch; ONNX Runtime per session)
            import torch

            torch.set_num_threads(self.threads)
        self._device = device
        self._state = ModelState(self.state_folder)
        self._stamp = self._state.stamp()
        record = self._state.read()
        self.model: ServedModel = load_served_model(record["path"], device=device, threads=self.threads)
        self.version: int = record["version"]

    def _refresh(self) -> None:
        """Load a newer recorded model before the next batch (a stat per batch when nothing changed)."""
        stamp = self._state.stamp()
        if stamp == self._stamp:
            return
        self._stamp = stamp
        record = self._state.read()
        if record["version"] <= self.version:
            return
        try:
            self.model = load_served_model(record["path"], device=self._device, threads=self.threads)
        except Exception:  # checked when it was published; keep serving the old one if the file changed since
            logger.exception("could not load model version %s from %s", record["version"], record["path"])
            return
        self.version = record["version"]

    # -------------------------------------------------------------------------------------------- the requests
    def decode_request(self, request: Request, **kwargs: Any) -> _Payload:
        # LitServe reads the annotation: Request means "the JSON body, parsed"; what arrives here is that body.
        # Encoded in predict, after the model check: a reload brings its own statistics and categories. Wrapped,
        # so that predict tells a batch (a list) from one request whose body is a JSON array.
        return _Payload(request)

    def batch(self, inputs: list[Any]) -> list[Any]:
        return inputs  # rows are joined in predict, after the invalid requests are set aside

    def predict(self, x: Any, **kwargs: Any) -> Any:
        self._refresh()
        payloads: list[_Payload] = x if isinstance(x, list) else [x]
        requests = [decode(p.body, self.model, self.max_rows, self.strict_categories) for p in payloads]
        valid = [r for r in requests if isinstance(r, Rows)]
        parts: list[dict[str, np.ndarray]] = []
        rows = 0
        if valid:
            joined = valid[0].inputs if len(valid) == 1 else np.concatenate([r.inputs for r in valid])
            rows = len(joined)
            parts = split_rows(self.model.predict(joined), [len(r.inputs) for r in valid])
        answers, it = [], iter(parts)
        for request in requests:
            body = request if isinstance(request, Invalid) else answer(self.model, next(it), self.threshold)
            answers.append(_Answer(body, self.version, rows))
        return answers if isinstance(x, list) else answers[0]

    def unbatch(self, output: list[_Answer]) -> list[_Answer]:
        return output

    def encode_response(self, output: _Answer, **kwargs: Any) -> JSONResponse:
        headers = {VERSION_HEADER: str(output.version), BATCH_HEADER: str(output.batch_rows)}
        if isinstance(output.body, Invalid):
            return JSONResponse({"error": output.body.message}, status_code=output.body.status, headers=headers)
        return JSONResponse(output.body, headers=headers)
