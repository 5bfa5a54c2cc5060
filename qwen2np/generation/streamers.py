"""Streamers: text out of `generate` as the tokens arrive, with transformers' `put(ids)` / `end()` protocol.

`generate` calls `streamer.put(prompt_ids)` once, then `streamer.put(new_ids)` after every step, then
`streamer.end()`. `TextStreamer` turns those ids into text through the tokenizer's UTF-8-safe
`IncrementalDecoder`: a character split across tokens (Chinese, emoji) is printed once it is complete,
never as U+FFFD halves, and the concatenation of everything printed equals `tokenizer.decode(ids)`.

Unlike transformers' TextStreamer, which holds text back until the next space, text is emitted as soon
as it is whole; the concatenated output is the same.

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

import queue

import numpy as np

from ..errors import GenerationError


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
        from ..tokenizer import IncrementalDecoder

        return IncrementalDecoder(self.tokenizer, skip_special_tokens=self.skip_special_tokens)

    def put(self, value):
        """Receive token ids ([1, n] or [n]) and emit the text they complete."""
        value = np.asarray(value)
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
        text = "".join(self._decoder.push(int(i)) for i in ids)
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
    """Put the text pieces in a queue, to be read by iterating (run `generate` in another thread)."""

    def __init__(self, tokenizer, skip_prompt=False, timeout=None, **decode_kwargs):
        super().__init__(tokenizer, skip_prompt, **decode_kwargs)
        self.text_queue = queue.Queue()
        self.stop_signal = None
        self.timeout = timeout

    def on_finalized_text(self, text, stream_end=False):
        self.text_queue.put(text, timeout=self.timeout)
        if stream_end:
            self.text_queue.put(self.stop_signal, timeout=self.timeout)

    def __iter__(self):
        return self

    def __next__(self):
        value = self.text_queue.get(timeout=self.timeout)
        if value is self.stop_signal:
            raise StopIteration
        return value
