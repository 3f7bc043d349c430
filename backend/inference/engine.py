"""The embedded inference engine: transformers + PEFT, one base per (model, bit width), adapters in an LRU.

Every load and every generation runs on one engine thread, one request at a time, so the PEFT model's active
adapter never changes under a running generation; requests wait in a bounded queue (Busy past it, the server's
429). Tokens go back to the asyncio side as they are made, through `Sink`.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, GenerationConfig, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from backend.config import Settings
from backend.inference.protocol import GenerationRequest, Limits
from backend.inference.rendering import RenderError, chat_prompt, completion_prompt, prompt_ids
from backend.services.base_models import resolve_base_model
from backend.services.errors import InvalidRequest, NotFound, ServiceError
from backend.training.manifest import MANIFEST_FILENAME
from backend.training.modeling import build_quantization_config, compute_dtype, load_tokenizer
from backend.training.options import TrainingOptions

log = logging.getLogger(__name__)

QUANTIZATIONS = ("4bit", "8bit")


class Busy(ServiceError):
    """The queue is full (429): the client should retry shortly."""

    status = 429
    error_type = "rate_limit_error"

    def __init__(self, message: str) -> None:
        super().__init__(message, code="engine_overloaded")


@dataclass(frozen=True)
class AdapterSpec:
    """A registered adapter: its folder (adapter_config.json + weights), its base and the base's bit width."""

    name: str
    path: Path
    base_model: str
    quantization: str | None = None
    dtype: str | None = None


@dataclass
class LoadedBase:
    """A base model in memory, its tokenizer, and the adapters loaded into it (internal name by adapter name)."""

    model: Any
    tokenizer: Any
    context: int
    peft: Any | None = None
    adapters: OrderedDict[str, str] = field(default_factory=OrderedDict)
    next_slot: int = 0


@dataclass
class Choice:
    """One sequence being generated: its tokens, the text already sent, and how it ended."""

    ids: list[int] = field(default_factory=list)
    sent: str = ""
    finish_reason: str | None = None


class Sink:
    """Where a generation reports: `start(prompt_tokens)`, then `delta(index, text)` and `finish(index, reason, n)`."""

    def start(self, prompt_tokens: int) -> None: ...
    def delta(self, index: int, text: str) -> None: ...
    def finish(self, index: int, reason: str, completion_tokens: int) -> None: ...
    def cancelled(self) -> bool:
        return False


def context_length(model: Any, tokenizer: Any) -> int:
    """The longest sequence the model takes (prompt plus answer)."""
    config = model.config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return int(min(getattr(tokenizer, "model_max_length", 2048), 1 << 20))


def eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every token that ends an answer (the generation config's eos list, the tokenizer's eos)."""
    found: list[int] = []
    for value in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, int) and item not in found:
                found.append(item)
    return found


class _TokenStreamer(BaseStreamer):
    """Hands each step's new tokens (one per sequence) to `on_step`; the first put is the prompt and is skipped."""

    def __init__(self, on_step: Callable[[list[int]], None]) -> None:
        self.on_step = on_step
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.on_step(value.reshape(-1).tolist())

    def end(self) -> None:
        return None


class _Finished(StoppingCriteria):
    """Per sequence: stopped once its choice has a finish reason; all of them once the client went away."""

    def __init__(self, choices: list[Choice], sink: Sink) -> None:
        self.choices = choices
        self.sink = sink

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.BoolTensor:
        if self.sink.cancelled():
            return torch.ones(len(self.choices), dtype=torch.bool, device=input_ids.device)  # type: ignore[return-value]
        done = [choice.finish_reason is not None for choice in self.choices]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)  # type: ignore[return-value]


class _Decoder:
    """Turns each step's tokens into text deltas per choice, holding back what may be the start of a stop string."""

    def __init__(self, tokenizer: Any, choices: list[Choice], sink: Sink, *, stop: list[str], eos: list[int],
                 max_tokens: int) -> None:
        self.tokenizer, self.choices, self.sink = tokenizer, choices, sink
        self.stop, self.eos, self.max_tokens = stop, set(eos), max_tokens
        self.hold = max((len(item) for item in stop), default=1) - 1

    def step(self, tokens: list[int]) -> None:
        for index, (choice, token) in enumerate(zip(self.choices, tokens, strict=True)):
            if choice.finish_reason is None:
                self._advance(index, choice, token)

    def _advance(self, index: int, choice: Choice, token: int) -> None:
        choice.ids.append(token)
        if token in self.eos:
            self._end(index, choice, choice.sent, "stop")
            return
        text = self.tokenizer.decode(choice.ids, skip_special_tokens=True)
        for item in self.stop:
            found = text.find(item, max(0, len(choice.sent) - len(item)))
            if found >= 0:
                self._end(index, choice, text[:found], "stop")
                return
        if len(choice.ids) >= self.max_tokens:
            self._end(index, choice, text, "length")
            return
        # Hold back an unfinished multi-byte character and whatever could begin a stop string.
        ready = len(text) - self.hold if self.stop else len(text)
        while ready > len(choice.sent) and text[ready - 1] == "\ufffd":
            ready -= 1
        if ready > len(choice.sent):
            self.sink.delta(index, text[len(choice.sent):ready])
            choice.sent = text[:ready]

    def _end(self, index: int, choice: Choice, text: str, reason: str) -> None:
        if len(text) > len(choice.sent):
            self.sink.delta(index, text[len(choice.sent):])
        choice.sent = text
        choice.finish_reason = reason
        self.sink.finish(index, reason, len(choice.ids))

    def close(self) -> None:
        """Choices the generation left unfinished (the client went away) end as `length`."""
        for index, choice in enumerate(self.choices):
            if choice.finish_reason is None:
                self._end(index, choice, self.tokenizer.decode(choice.ids, skip_special_tokens=True), "length")


class Engine:
    """Bases loaded once, adapters on first use (LRU), one generation at a time, a bounded queue."""

    def __init__(self, settings: Settings, *, device: str = "cpu") -> None:
        self.settings = settings
        self.device = device
        self.limits = Limits(max_tokens=settings.inference_max_tokens, max_n=settings.inference_max_n)
        self.queue_size = settings.inference_queue_size
        self.adapter_cache = settings.inference_adapter_cache
        self.adapters: dict[str, AdapterSpec] = {}
        self.bases: dict[tuple[str, str | None, str | None], LoadedBase] = {}
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="safetrain-engine")
        self.waiting = 0
        self.lock = threading.Lock()

    # Admission.

    def admit(self) -> None:
        """Count a request in, or Busy when `queue_size` are already waiting or running."""
        with self.lock:
            if self.waiting >= self.queue_size:
                raise Busy(f"The engine has {self.queue_size} requests in hand; retry shortly.")
            self.waiting += 1

    def leave(self) -> None:
        """Count a request out."""
        with self.lock:
            self.waiting -= 1

    # Adapters.

    def register(self, spec: AdapterSpec) -> None:
        """Make `spec.name` servable; it loads on its first request."""
        # Only adapters the service stored (under the data folder), only safetensors: never a pickle from elsewhere.
        if not spec.path.resolve().is_relative_to(self.settings.data_dir.resolve()):
            raise InvalidRequest("lora_path must be a folder under the data directory.", param="lora_path")
        if not (spec.path / "adapter_config.json").is_file() or not (spec.path / "adapter_model.safetensors").is_file():
            raise InvalidRequest(f"{spec.path} holds no safetensors adapter.", param="lora_path")
        if spec.quantization not in (None, *QUANTIZATIONS):
            raise InvalidRequest("quantization must be 4bit, 8bit or null.", param="quantization")
        self.adapters[spec.name] = spec

    def unregister(self, name: str) -> bool:
        """Forget an adapter (and drop it from memory on the engine thread); False when it was unknown."""
        spec = self.adapters.pop(name, None)
        if spec is not None:
            self.executor.submit(self._drop, spec)
        return spec is not None

    @staticmethod
    def spec_from_request(body: dict[str, Any]) -> AdapterSpec:
        """vLLM's /v1/load_lora_adapter body plus safetrain's base_model, quantization and dtype."""
        name, path = body.get("lora_name"), body.get("lora_path")
        if not isinstance(name, str) or not name or not isinstance(path, str) or not path:
            raise InvalidRequest("lora_name and lora_path are required strings.", param="lora_name")
        folder = Path(path)
        base = body.get("base_model")
        manifest = folder / MANIFEST_FILENAME
        if not base and manifest.is_file():
            base = json.loads(manifest.read_text(encoding="utf-8")).get("base_model_name")
        if not isinstance(base, str) or not base:
            raise InvalidRequest("base_model is required (the adapter's base model name).", param="base_model")
        return AdapterSpec(name=name, path=folder, base_model=base, quantization=body.get("quantization"),
                           dtype=body.get("dtype"))

    # Loading (engine thread only).

    def _options(self, base_model: str, quantization: str | None, dtype: str | None) -> TrainingOptions:
        return TrainingOptions.model_validate({
            "model": base_model, "use_lora": True, "use_4bit": quantization == "4bit",
            "use_8bit": quantization == "8bit", "bf16": dtype == "bfloat16",
            "fp16": dtype == "float16" and self.device.startswith("cuda"),
        })

    def _base(self, name: str, quantization: str | None = None, dtype: str | None = None) -> LoadedBase:
        key = (name, quantization, dtype)
        loaded = self.bases.get(key)
        if loaded is None:
            loaded = self.bases[key] = self._load_base(name, quantization, dtype)
        return loaded

    def _load_base(self, name: str, quantization: str | None, dtype: str | None) -> LoadedBase:
        try:
            ref = resolve_base_model(name, settings=self.settings)
        except InvalidRequest:
            raise NotFound(f"The model {name[:200]!r} does not exist.", param="model", code="model_not_found") from None
        source = str(ref.path or ref.name)
        options = self._options(source, quantization, dtype)
        quantized = build_quantization_config(options) if quantization else None
        log.info("loading base model %s (%s, %s) on %s", name, quantization or "unquantized", dtype, self.device)
        model = AutoModelForCausalLM.from_pretrained(
            source, quantization_config=quantized, device_map={"": self.device}, dtype=compute_dtype(options),
            trust_remote_code=False, use_safetensors=True, local_files_only=True,
        )
        model.eval()
        tokenizer = load_tokenizer(source)
        return LoadedBase(model=model, tokenizer=tokenizer, context=context_length(model, tokenizer))

    def _with_adapter(self, spec: AdapterSpec) -> tuple[LoadedBase, Any]:
        """The base with `spec` loaded (first use) and active; the LRU drops the least recently used past the cap."""
        from peft import PeftModel

        base = self._base(spec.base_model, spec.quantization, spec.dtype)
        slot = base.adapters.get(spec.name)
        if slot is None:
            slot = f"adapter{base.next_slot}"
            base.next_slot += 1
            log.info("loading adapter %s from %s", spec.name, spec.path)
            if base.peft is None:
                base.peft = PeftModel.from_pretrained(base.model, str(spec.path), adapter_name=slot)
            else:
                base.peft.load_adapter(str(spec.path), adapter_name=slot)
            base.adapters[spec.name] = slot
            while len(base.adapters) > self.adapter_cache:
                _, oldest = base.adapters.popitem(last=False)
                base.peft.delete_adapter(oldest)
        peft = base.peft
        assert peft is not None
        base.adapters.move_to_end(spec.name)
        peft.set_adapter(slot)
        peft.eval()
        return base, peft

    def _drop(self, spec: AdapterSpec) -> None:
        for (name, _, _), base in self.bases.items():
            slot = base.adapters.get(spec.name) if name == spec.base_model else None
            if slot is not None and base.peft is not None and len(base.adapters) > 1:
                del base.adapters[spec.name]
                base.peft.delete_adapter(slot)
                base.peft.set_adapter(next(iter(base.adapters.values())))

    def loaded_adapters(self) -> list[str]:
        """Names of the adapters in memory now."""
        return [name for base in self.bases.values() for name in base.adapters]

    # Generation (engine thread only).

    def generate(self, request: GenerationRequest, sink: Sink) -> None:
        """Load what the request needs, render and check it, then generate into `sink`."""
        base, model = self._model_for(request.model)
        tokenizer = base.tokenizer
        try:
            text = (chat_prompt(request.messages or [], tokenizer, request.tools) if request.kind == "chat"
                    else completion_prompt(request.prompt or "", tokenizer))
        except RenderError as error:
            raise InvalidRequest(str(error), param=request.input_param) from None
        ids = prompt_ids(text, tokenizer)
        max_new = self._room(request, len(ids), base.context)
        sink.start(len(ids))
        if base.peft is not None and model is base.model:
            with base.peft.disable_adapter():  # a base request on a base that adapters were loaded into
                self._run(model, tokenizer, ids, max_new, request, sink)
        else:
            self._run(model, tokenizer, ids, max_new, request, sink)

    def _model_for(self, name: str) -> tuple[LoadedBase, Any]:
        spec = self.adapters.get(name)
        if spec is not None:
            return self._with_adapter(spec)
        base = self._base(name)
        return base, base.model

    def _room(self, request: GenerationRequest, prompt_tokens: int, context: int) -> int:
        sampling = request.sampling
        if prompt_tokens >= context:
            raise InvalidRequest(
                f"The prompt is {prompt_tokens} tokens; this model's context is {context} tokens.",
                param=request.input_param, code="context_length_exceeded")
        room = context - prompt_tokens
        if sampling.max_tokens is None:
            return min(room, self.limits.max_tokens)
        if sampling.max_tokens > room:
            raise InvalidRequest(
                f"{sampling.max_tokens_param}={sampling.max_tokens} with a {prompt_tokens}-token prompt passes this "
                f"model's context of {context} tokens (at most {room}).",
                param=sampling.max_tokens_param, code="context_length_exceeded")
        return sampling.max_tokens

    def _run(self, model: Any, tokenizer: Any, ids: list[int], max_new: int, request: GenerationRequest,
             sink: Sink) -> None:
        sampling = request.sampling
        choices = [Choice() for _ in range(sampling.n)]
        eos = eos_ids(model, tokenizer)
        decoder = _Decoder(tokenizer, choices, sink, stop=sampling.stop, eos=eos, max_tokens=max_new)
        device = next(model.parameters()).device
        inputs = torch.tensor([ids] * sampling.n, dtype=torch.long, device=device)
        greedy = sampling.temperature == 0
        config = GenerationConfig(
            max_new_tokens=max_new, do_sample=not greedy, temperature=None if greedy else sampling.temperature,
            top_p=None if greedy else sampling.top_p, top_k=0 if not greedy else None, eos_token_id=eos,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or [0])[0],
        )
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        with torch.inference_mode():
            model.generate(
                input_ids=inputs, attention_mask=torch.ones_like(inputs), generation_config=config,
                streamer=_TokenStreamer(decoder.step),
                stopping_criteria=StoppingCriteriaList([_Finished(choices, sink)]),
            )
        decoder.close()

    def close(self) -> None:
        """Stop taking work; the running generation finishes."""
        self.executor.shutdown(wait=False, cancel_futures=True)
