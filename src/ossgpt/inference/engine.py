"""Continuous batching: requests join and leave one running batch between decode steps (what `ossgpt serve` runs).

    engine = Engine(model, max_batch=16, max_length=4096, prefill_tokens=2048)
    request_id = engine.submit(Request(prompt_ids, max_new_tokens=200, sampler=Sampler(...), stop_token_ids=(eos,)))
    while not engine.idle:
        for event in engine.step():          # Event(request_id, token, finish_reason, prompt_tokens)
            ...

Each `step` either admits or decodes. Admitting takes waiting requests into free rows of the batch KV cache and
prefills their prompts together, in one forward: left-padded to the longest (positions -1 on the padding, which no
query attends to), straight into their rows, then each row rolled left by its padding so that every sequence starts
at column 0 (see `_prefill`); each request's first token is sampled from its own last logits and returned at once.
Decoding runs all running rows together, tokens [n, 1], each written at its own cache column (KVCache.seen as a [n]
tensor), so the n requests share each read of the weights. A step that admitted does not decode, and the step after
it decodes without admitting: a new request's first token waits for one prefill only, never for a decode step, while
the running rows get a token every decode step, with at most one prefill between two of them. Every row is sampled
from its own logits with its own Sampler: what a request gets does not depend on the others in the batch, and greedy
decoding gives the tokens it gets decoded alone.

Prefill budget: one admission prefills at most `prefill_tokens` tokens, counted as the padded batch (requests x the
longest prompt), so a flood of long prompts delays the running rows' next token by one bounded prefill; the rest wait
for the next admission. A prompt longer than the budget is prefilled alone.

The running requests hold rows 0..n-1: when one finishes, the last running row moves into its place, so a decode
step runs on the first n rows only, and attends over the columns up to the longest running sequence only.

Memory: the batch cache is allocated once, in the model's dtype: keys and values of max_batch rows x max_length
columns for each full-attention layer, and of max_batch rows x the window for each sliding-window layer (a ring
buffer), that is 2 x max_batch x kv_heads x head_dim x (full layers x max_length + sliding layers x window)
elements (`cache_bytes`). max_length (default: the model's context) bounds prompt + max_new_tokens of each request:
choose it for the memory at hand.

Threads: `submit` and `cancel` may be called from any thread while `step` runs in another (the server's engine
thread): they only touch the waiting queue and the set of cancelled ids, under a lock. `run` is that thread's loop.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from ossgpt.inference.sampling import Sampler
from ossgpt.model.cache import KVCache


def cache_bytes(config, max_batch: int, max_length: int, dtype: torch.dtype) -> int:
    """Bytes of the batch KV cache an Engine(model of `config`, max_batch, max_length) allocates in `dtype`: keys and
    values, and the position of every slot (see the module doc)."""
    window = min(config.sliding_window, max_length)
    slots = max_batch * sum(window if kind == "sliding_attention" else max_length for kind in config.layer_types)
    return slots * (2 * config.num_key_value_heads * config.head_dim * dtype.itemsize + torch.int64.itemsize)


@dataclass
class Request:
    prompt: list[int]
    max_new_tokens: int
    sampler: Sampler = field(default_factory=Sampler)  # this request's own sampling (its seed, its generator)
    stop_token_ids: tuple[int, ...] = ()  # the request stops after generating one of these


@dataclass
class Event:
    request_id: int
    token: int | None  # the new token; None for a finish without one (cancelled)
    finish_reason: str | None  # None while running; "stop" (its token is the stop token), "length", "cancelled"
    prompt_tokens: int = 0  # the request's prompt length, for usage reports


@dataclass
class _Running:
    """A request that holds a row of the batch cache."""

    id: int
    request: Request
    length: int  # tokens in its cache row: the prompt, then every generated token but the last one sampled
    token: int  # the last token sampled, fed to the model at the next decode step
    generated: int = 1
    seen: torch.Tensor | None = None  # [1, vocab] tokens of the sequence, for a repetition penalty


class Engine:
    """Runs many requests on one model as one batch that requests join and leave between steps (see module doc)."""

    def __init__(self, model, max_batch: int = 16, max_length: int | None = None, prefill_tokens: int = 2048):
        """max_batch: rows decoded together; max_length: cache columns per row, the most prompt + max_new_tokens of
        any request (default: the model's context); prefill_tokens: the prefill budget of one admission, padding
        included (see the module doc). The model is put in eval mode."""
        context = model.config.max_position_embeddings
        max_length = context if max_length is None else max_length
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if not 1 < max_length <= context:
            raise ValueError(f"max_length must be in [2, {context}] (the model's context), got {max_length}")
        if prefill_tokens < 1:
            raise ValueError(f"prefill_tokens must be at least 1, got {prefill_tokens}")
        self.model = model.eval()
        self.max_batch = max_batch
        self.max_length = max_length
        self.prefill_tokens = prefill_tokens
        self.cache = KVCache(model.config, max_batch, max_length, device=model.device, dtype=model.dtype)
        self.rows: list[_Running] = []  # rows[i] holds cache row i
        self._waiting: deque[tuple[int, Request]] = deque()
        self._cancelled: set[int] = set()
        self._ids = itertools.count()
        self._lock = threading.Lock()  # guards _waiting, _cancelled and _ids: submit and cancel come from any thread
        self._work = threading.Event()  # set by submit and cancel: wakes `run` when idle
        self._admitted = False  # whether the last step admitted: then this one decodes, whoever waits

    # ---------------------------------------------------------------------------------- any thread
    def submit(self, request: Request) -> int:
        """Queue a request; returns its id. ValueError if its tokens or lengths do not fit."""
        prompt = list(request.prompt)
        vocab = self.model.config.vocab_size
        if not prompt:
            raise ValueError("the prompt is empty: give at least one token")
        if not all(0 <= token < vocab for token in prompt):
            raise ValueError(f"prompt token ids must be in [0, {vocab}), the model's vocabulary")
        if request.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {request.max_new_tokens}")
        if len(prompt) + request.max_new_tokens > self.max_length:
            raise ValueError(
                f"prompt ({len(prompt)} tokens) + max_new_tokens ({request.max_new_tokens}) exceeds the "
                f"{self.max_length} tokens a request may hold (the engine's max_length)"
            )
        sampler = request.sampler
        if sampler.seed is not None:  # a fresh generator from the seed: the same request samples the same tokens
            sampler = replace(sampler, generator=None)
        request = replace(request, prompt=prompt, sampler=sampler, stop_token_ids=tuple(request.stop_token_ids))
        with self._lock:
            request_id = next(self._ids)
            self._waiting.append((request_id, request))
        self._work.set()
        return request_id

    def cancel(self, request_id: int) -> None:
        """Stop a request at the next step (its row is freed) or drop it if still waiting; it ends with a
        "cancelled" event. Ids that have already finished are ignored."""
        with self._lock:
            self._cancelled.add(request_id)
        self._work.set()

    @property
    def idle(self) -> bool:
        """Nothing running and nothing waiting."""
        with self._lock:
            return not self.rows and not self._waiting

    # ---------------------------------------------------------------------------------- the engine thread
    @torch.no_grad()
    def step(self) -> list[Event]:
        """Apply cancellations, then either admit waiting requests into free rows (one prefill, their first tokens)
        or, after a step that admitted or when none can be admitted, one decode step for every running row. Returns
        this step's events, at most one per request."""
        events = self._apply_cancellations()
        admitted = [] if self._admitted else self._take_waiting()
        self._admitted = bool(admitted)
        if admitted:
            events += self._prefill(admitted)
        elif self.rows:
            events += self._decode()
        return events

    def run(self, stop: threading.Event, emit: Callable[[list[Event]], None], poll_s: float = 0.1) -> None:
        """Step until `stop` is set, handing each step's events to `emit`; while idle, wait for submit or cancel
        (checking `stop` every poll_s seconds)."""
        while not stop.is_set():
            self._work.clear()  # before looking at the queue, so a submit from now on wakes the wait below
            if self.idle:
                self._work.wait(poll_s)
                continue
            events = self.step()
            if events:
                emit(events)

    def _apply_cancellations(self) -> list[Event]:
        with self._lock:
            cancelled, self._cancelled = self._cancelled, set()
            dropped = [(i, r) for i, r in self._waiting if i in cancelled]
            self._waiting = deque((i, r) for i, r in self._waiting if i not in cancelled)
        events = [Event(i, None, "cancelled", len(r.prompt)) for i, r in dropped]
        stopped = [row for row, running in enumerate(self.rows) if running.id in cancelled]
        events += [Event(self.rows[row].id, None, "cancelled", len(self.rows[row].request.prompt)) for row in stopped]
        self._free(stopped)
        return events

    def _take_waiting(self) -> list[tuple[int, Request]]:
        """The waiting requests, first come first, that fit in the free rows and in the prefill budget (at least one,
        when a row is free)."""
        taken: list[tuple[int, Request]] = []
        width = 0  # the longest prompt taken: the padded prefill is len(taken) x width tokens
        with self._lock:
            while self._waiting and len(self.rows) + len(taken) < self.max_batch:
                wider = max(width, len(self._waiting[0][1].prompt))
                if taken and (len(taken) + 1) * wider > self.prefill_tokens:
                    break
                taken.append(self._waiting.popleft())
                width = wider
        return taken

    def _prefill(self, admitted: list[tuple[int, Request]]) -> list[Event]:
        """Prefill the admitted prompts together into the next free rows and sample each one's first token."""
        device = self.model.device
        first, count = len(self.rows), len(admitted)
        prompts = [request.prompt for _, request in admitted]
        width = max(len(prompt) for prompt in prompts)
        pad = torch.tensor([width - len(prompt) for prompt in prompts], device=device)  # [count]
        ids = torch.zeros(count, width, dtype=torch.long, device=device)
        positions = torch.full_like(ids, -1)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt) :] = torch.tensor(prompt, device=device)
            positions[row, width - len(prompt) :] = torch.arange(len(prompt), device=device)
        for layer in self.cache.layers:  # forget the rows' previous requests
            layer.positions[first : first + count] = -1
        view = self.cache.narrow(first, count, columns=width)
        view.seen = 0
        logits = self.model(ids, positions=positions, cache=view, logits_to_keep=1).logits[:, -1]  # [count, vocab]
        for layer in view.layers:
            # Row i's prompt sits at columns pad_i..width-1; the engine keeps a sequence at columns 0..length-1.
            # Slot s takes slot (s + pad_i) % capacity: in a plain buffer (the first `width` columns) the prompt
            # moves to the front and the padding, position -1, to the end; a ring buffer holds column c in slot
            # c % window, so the same roll puts it in slot (c - pad_i) % window.
            slots = (torch.arange(layer.capacity, device=device) + pad[:, None]) % layer.capacity  # [count, capacity]
            columns = slots[:, None, :, None].expand_as(layer.keys)
            layer.keys.copy_(layer.keys.gather(2, columns))
            layer.values.copy_(layer.values.gather(2, columns))
            layer.positions.copy_(layer.positions.gather(1, slots))
        events, finished = [], []
        for row, ((request_id, request), prompt) in enumerate(zip(admitted, prompts)):
            seen = None
            if request.sampler.tracks_history:  # the repetition penalty looks at the prompt too
                seen = torch.zeros_like(logits[:1], dtype=torch.bool)
                seen[0, prompt] = True
            token = int(request.sampler(logits[row : row + 1], seen)[0])
            running = _Running(request_id, request, length=len(prompt), token=token, seen=seen)
            self.rows.append(running)
            events.append(self._event(running))
            if events[-1].finish_reason is not None:
                finished.append(first + row)
        self._free(finished)
        return events

    def _decode(self) -> list[Event]:
        """Feed every running row its last token, each at its own column, and sample each row's next one."""
        device = self.model.device
        for running in self.rows:
            if running.seen is not None:
                running.seen[0, running.token] = True
        tokens = torch.tensor([[running.token] for running in self.rows], device=device)  # [n, 1]
        columns = torch.tensor([running.length for running in self.rows], device=device)  # [n], = positions
        view = self.cache.narrow(0, len(self.rows), columns=max(running.length for running in self.rows) + 1)
        view.seen = columns
        logits = self.model(tokens, positions=columns[:, None], cache=view).logits[:, -1]  # [n, vocab]
        sampled = [running.request.sampler(logits[i : i + 1], running.seen) for i, running in enumerate(self.rows)]
        events, finished = [], []
        for row, (running, token) in enumerate(zip(self.rows, torch.cat(sampled).tolist())):
            running.length += 1
            running.token = token
            running.generated += 1
            events.append(self._event(running))
            if events[-1].finish_reason is not None:
                finished.append(row)
        self._free(finished)
        return events

    @staticmethod
    def _event(running: _Running) -> Event:
        """The event of a request's newest token, finishing it at a stop token or at max_new_tokens."""
        request = running.request
        reason = None
        if running.token in request.stop_token_ids:
            reason = "stop"
        elif running.generated == request.max_new_tokens:
            reason = "length"
        return Event(running.id, running.token, reason, len(request.prompt))

    def _free(self, rows: list[int]) -> None:
        """Release these cache rows; the last running rows move into the gaps, so rows 0..n-1 stay the running."""
        for row in sorted(rows, reverse=True):
            last = len(self.rows) - 1
            if row != last:
                moved = self.rows[last]
                for layer in self.cache.layers:
                    # Same buffers, same slots: a sequence of `length` tokens fills the first min(length, capacity)
                    # slots (ring buffers wrap), and its positions row marks the rest empty.
                    used = min(moved.length, layer.capacity)
                    layer.keys[row, :, :used] = layer.keys[last, :, :used]
                    layer.values[row, :, :used] = layer.values[last, :, :used]
                    layer.positions[row] = layer.positions[last]
                self.rows[row] = moved
            self.rows.pop()
