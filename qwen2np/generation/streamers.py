"""Streamers: text out of `generate` as the tokens arrive, with transformers' `put(ids)` / `end()` protocol.

`generate` calls `streamer.put(prompt_ids)` once, then `streamer.put(new_ids)` after every step, then
`streamer.end()`. `TextStreamer` turns those ids into text through the tokenizer's UTF-8-safe
`IncrementalDecoder`: a character split across tokens (Chinese, emoji) is printed once it is complete,
never as U+FFFD halves, and the concatenation of everything printed equals `tokenizer.decode(ids)`.

Unlike transformers' TextStreamer, which holds text back until the next space, text is emitted as soon
as it is whole; the concatenated output is the same. Unlike transformers' TextIteratorStreamer, a
consumer is told when `generate` fails in its thread (see `on_error`) instead of waiting for ever.

>>> import numpy as np
>>> from qwen2np import Qwen2Tokenizer
>>> tok = Qwen2Tokenizer.from_pretrained()
>>> pieces = []
>>> streamer = TextStreamer(tok, skip_prompt=True, on_text=pieces.append)
>>> streamer.put(np.array([[9707]]))      # the prompt: skipped
>>> streamer.put(np.array([1879])); streamer.end()
>>> pieces
[' world', '']
"""

import functools
import inspect
import queue
import threading
import time

import numpy as np

from ..errors import GenerationError
from ..tokenizer import IncrementalDecoder


class BaseStreamer:
    """What `generate` needs from a streamer."""

    def put(self, value):
        raise NotImplementedError

    def end(self):
        raise NotImplementedError


class TextStreamer(BaseStreamer):
    """Print (or hand to `on_text`) the decoded text of one sequence as it is generated.

    `skip_prompt` drops the first `put` (the prompt). `decode_kwargs` accepts `skip_special_tokens`.
    `on_text(text)` replaces printing to stdout; `end()` prints a newline when printing.
    """

    def __init__(self, tokenizer, skip_prompt=False, on_text=None, **decode_kwargs):
        skip_special_tokens = decode_kwargs.pop("skip_special_tokens", False)
        decode_kwargs.pop("clean_up_tokenization_spaces", None)  # False for Qwen2; nothing to clean while streaming
        if decode_kwargs:
            raise TypeError(f"TextStreamer: unsupported decode arguments {sorted(decode_kwargs)}")
        self.tokenizer = tokenizer
        self.skip_prompt = skip_prompt
        self.skip_special_tokens = skip_special_tokens
        self.on_text = on_text
        self.next_tokens_are_prompt = True
        self._decoder = None

    def _decoder_for_new_stream(self):
        return IncrementalDecoder(self.tokenizer, skip_special_tokens=self.skip_special_tokens)

    def put(self, value):
        """Receive token ids ([1, n] or [n]) and emit the text they complete."""
        try:
            value = np.asarray(value)
        except (ValueError, TypeError) as e:  # ragged lists
            raise GenerationError(f"TextStreamer.put: expected token ids ([1, n] or [n]), found {e}") from None
        if value.dtype.kind not in "iu" or value.ndim > 2:
            raise GenerationError(f"TextStreamer.put: expected integer token ids of shape [1, n] or [n], found "
                                  f"{value.dtype.name} of shape {list(value.shape)}")
        if value.ndim > 1 and value.shape[0] > 1:
            raise GenerationError(
                f"TextStreamer streams one sequence: expected batch size 1, found {value.shape[0]} rows"
            )
        ids = value.reshape(-1)
        if self.skip_prompt and self.next_tokens_are_prompt:
            self.next_tokens_are_prompt = False
            return
        self.next_tokens_are_prompt = False
        if self._decoder is None:
            self._decoder = self._decoder_for_new_stream()
        text = self._decoder.push_all(int(i) for i in ids)   # all or nothing: a bad id changes no state
        if text:
            self.on_finalized_text(text)

    def end(self):
        """Flush what the decoder still holds and close the stream (ready for the next `generate`)."""
        text = self._decoder.flush() if self._decoder is not None else ""
        self._decoder = None
        self.next_tokens_are_prompt = True
        self.on_finalized_text(text, stream_end=True)

    def on_finalized_text(self, text, stream_end=False):
        if self.on_text is not None:
            self.on_text(text)
        else:
            print(text, flush=True, end="\n" if stream_end else "")


class TextIteratorStreamer(TextStreamer):
    """Put the text pieces in a queue, to be read by iterating (run `generate` in another thread).

    As in transformers, `timeout` (seconds; None waits for ever) bounds the wait for each piece:
    iterating raises `queue.Empty` when it passes. Unlike transformers, whose consumer waits for ever
    when `generate` fails in its thread, the consumer is told:

    * `generate` calls `on_error(error)` on its streamer when it raises (before or during the loop);
      iterating then raises that same error, once the pieces before it have been read;
    * a thread that fed the streamer and ended without `end()` or `on_error` (another `generate`)
      makes iterating raise a `GenerationError`.

    After either, the streamer is ready for the next `generate`, as after `end()`.

    >>> import threading
    >>> from qwen2np import Qwen2Tokenizer
    >>> from qwen2np.generation.testing import TinyCountingLM
    >>> streamer = TextIteratorStreamer(Qwen2Tokenizer.from_pretrained(), skip_prompt=True, timeout=60)
    >>> def produce():
    ...     try:
    ...         TinyCountingLM().generate([[1]], max_new_tokens=0, streamer=streamer)
    ...     except ValueError:
    ...         pass  # the consumer is told
    >>> threading.Thread(target=produce).start()
    >>> list(streamer)
    Traceback (most recent call last):
    ...
    qwen2np.errors.GenerationError: max_new_tokens must be an integer >= 1, found 0
    """

    # how often a waiting consumer checks on the thread feeding it (seconds)
    POLL_S = 0.1

    def __init__(self, tokenizer, skip_prompt=False, timeout=None, **decode_kwargs):
        super().__init__(tokenizer, skip_prompt, **decode_kwargs)
        self.text_queue = queue.Queue()
        self.stop_signal = None
        self.timeout = timeout
        self._producer = None  # the thread feeding the current stream, from its first put to end/on_error

    def put(self, value):
        self._producer = threading.current_thread()
        super().put(value)

    def end(self):
        try:
            super().end()
        finally:
            self._producer = None

    def on_error(self, error):
        """`generate` failed with `error`: the consumer's iteration raises it; the stream is reset."""
        self._decoder = None
        self.next_tokens_are_prompt = True
        self._producer = None
        self.text_queue.put(_Failure(error))

    def on_finalized_text(self, text, stream_end=False):
        self.text_queue.put(text, timeout=self.timeout)
        if stream_end:
            self.text_queue.put(self.stop_signal, timeout=self.timeout)

    def __iter__(self):
        return self

    def __next__(self):
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        while True:
            wait = self.POLL_S if deadline is None else max(0.0, min(self.POLL_S, deadline - time.monotonic()))
            try:
                value = self.text_queue.get(timeout=wait)
                break
            except queue.Empty:
                producer = self._producer
                # subtle: a producer puts everything before it dies, so a dead producer and an empty
                # queue mean that no end() is coming
                if producer is not None and not producer.is_alive() and self.text_queue.empty():
                    self._producer, self._decoder, self.next_tokens_are_prompt = None, None, True
                    raise GenerationError(
                        f"the thread feeding this streamer ({producer.name}) ended without end(): the "
                        f"generation failed in it (its error was printed by that thread)") from None
                if deadline is not None and time.monotonic() >= deadline:
                    raise
        if isinstance(value, _Failure):
            if isinstance(value.error, Exception):
                raise value.error
            raise GenerationError(f"generate was stopped in its thread by {type(value.error).__name__}") \
                from value.error
        if value is self.stop_signal:
            raise StopIteration
        return value


class _Failure:
    """In the queue: `generate` raised `error`."""

    def __init__(self, error):
        self.error = error


def tells_streamer_on_error(generate):
    """Decorator of `generate(self, ..., streamer=None, ...)`: when it raises, it first calls
    `streamer.on_error(error)` if the streamer has that method (transformers' streamers do not: they
    are left as they are), so that a consumer in another thread is not left waiting."""
    position = list(inspect.signature(generate).parameters).index("streamer")

    @functools.wraps(generate)
    def wrapper(*args, **kwargs):
        try:
            return generate(*args, **kwargs)
        except BaseException as error:
            streamer = kwargs.get("streamer", args[position] if len(args) > position else None)
            notify = getattr(streamer, "on_error", None)
            if callable(notify):
                notify(error)
            raise

    return wrapper
