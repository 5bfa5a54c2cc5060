"""Streamers: the text streamed equals the decoded ids, characters are never split, the protocol is
transformers' (put the prompt, put each step, end)."""

import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen2np import Qwen2Tokenizer
from qwen2np.errors import GenerationError
from qwen2np.generation import TextIteratorStreamer, TextStreamer
from qwen2np.generation.testing import TinyCountingLM


@pytest.fixture(scope="module")
def tok():
    return Qwen2Tokenizer.from_pretrained()


TEXTS = st.lists(st.sampled_from(list("ab ,\n") + ["你", "好", "😀", "é", "🇫🇷", "<|im_end|>", "ไทย"]),
                 max_size=30).map("".join)


@settings(max_examples=60)
@given(prompt=TEXTS, answer=TEXTS, skip=st.booleans())
def test_streamed_text_is_the_decoded_text(tok, prompt, answer, skip):
    prompt_ids, answer_ids = tok.encode(prompt), tok.encode(answer)
    pieces = []
    streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=skip, on_text=pieces.append)
    streamer.put(np.array([prompt_ids], dtype=np.int64))
    for i in answer_ids:  # one token per step, as generate puts them: [B] with B = 1
        streamer.put(np.array([i], dtype=np.int64))
    streamer.end()
    assert "".join(pieces) == tok.decode(answer_ids, skip_special_tokens=skip)
    if "\ufffd" not in tok.decode(answer_ids):
        assert not any("\ufffd" in p for p in pieces)  # a character split over tokens is never halved


def test_prompt_is_streamed_unless_skipped_and_stdout_gets_a_newline(tok, capsys):
    streamer = TextStreamer(tok)
    streamer.put(np.array([tok.encode("Hello")]))
    streamer.put(np.array([1879]))
    streamer.end()
    assert capsys.readouterr().out == "Hello world\n"
    # the streamer is ready for another generate call: the next first put is a prompt again
    quiet = TextStreamer(tok, skip_prompt=True)
    for _ in range(2):
        quiet.put(np.array([tok.encode("Hello")]))
        quiet.put(np.array([1879]))
        quiet.end()
    assert capsys.readouterr().out == " world\n world\n"


def test_batches_are_refused(tok):
    with pytest.raises(GenerationError, match="batch size 1, found 2 rows"):
        TextStreamer(tok).put(np.zeros((2, 3), dtype=np.int64))
    with pytest.raises(TypeError, match="unsupported decode arguments"):
        TextStreamer(tok, spaces_between_special_tokens=True)


def test_generate_drives_the_streamer_protocol():
    calls = []

    class Recorder:
        def put(self, value):
            calls.append(("put", np.asarray(value).tolist()))

        def end(self):
            calls.append(("end",))

    TinyCountingLM().generate([[1, 2]], max_new_tokens=3, streamer=Recorder())
    assert calls == [("put", [[1, 2]]), ("put", [3]), ("put", [4]), ("put", [5]), ("end",)]


def test_iterator_streamer_across_threads(tok):
    streamer = TextIteratorStreamer(tok, skip_prompt=True, timeout=30)
    ids = tok.encode(" one two three")

    def produce():
        streamer.put(np.array([[9707]]))
        for i in ids:
            streamer.put(np.array([i]))
        streamer.end()

    thread = threading.Thread(target=produce)
    thread.start()
    text = "".join(streamer)
    thread.join()
    assert text == " one two three"


# -- a consumer is never left waiting ----------------------------------------------------------------------


class FailingLM(TinyCountingLM):
    """Fails on its `fail_at`-th forward call (0: the prefill), after generate has started streaming."""

    def __init__(self, fail_at):
        super().__init__()
        self.fail_at = fail_at

    def __call__(self, *args, **kwargs):
        if len(self.calls) == self.fail_at:
            raise MemoryError("no memory for this step")
        return super().__call__(*args, **kwargs)


def _in_thread(target):
    """Run `target` in a thread that swallows what it raises (the consumer is the one to be told)."""
    def quiet():
        try:
            target()
        except BaseException:  # noqa: BLE001  (the test checks what the consumer sees)
            pass

    thread = threading.Thread(target=quiet)
    thread.start()
    return thread


def test_the_consumer_gets_the_error_of_a_generate_that_fails_before_streaming(tok):
    # timeout=60 only keeps a broken streamer from hanging the suite: it would end in queue.Empty instead
    streamer = TextIteratorStreamer(tok, skip_prompt=True, timeout=60)
    thread = _in_thread(lambda: TinyCountingLM().generate([[1, 2]], max_new_tokens=0, streamer=streamer))
    with pytest.raises(GenerationError, match="max_new_tokens must be an integer >= 1, found 0"):
        list(streamer)
    thread.join()
    # the streamer is ready for the next generate
    thread = _in_thread(lambda: TinyCountingLM().generate([[1, 2]], max_new_tokens=3, streamer=streamer))
    assert "".join(streamer) == tok.decode([3, 4, 5])
    thread.join()


def test_the_consumer_gets_the_pieces_then_the_error_of_a_generate_that_fails_midway(tok):
    streamer = TextIteratorStreamer(tok, skip_prompt=True, timeout=60)
    thread = _in_thread(lambda: FailingLM(fail_at=3).generate([[1]], max_new_tokens=8, streamer=streamer))
    pieces = []
    with pytest.raises(MemoryError, match="no memory for this step"):  # the same error, re-raised
        for piece in streamer:
            pieces.append(piece)
    thread.join()
    assert "".join(pieces) == tok.decode([2, 3, 4])  # the three tokens streamed before the failure


def test_a_producer_thread_that_dies_without_end_is_noticed(tok):
    """A generate that does not call on_error (not qwen2np's) still does not leave the consumer waiting."""
    streamer = TextIteratorStreamer(tok, skip_prompt=True, timeout=60)

    def produce():
        streamer.put(np.array([[9707]]))
        streamer.put(np.array([1879]))
        raise RuntimeError("a generate of another library failed")

    thread = _in_thread(produce)
    assert next(streamer) == " world"
    with pytest.raises(GenerationError, match="ended without end\\(\\)"):
        next(streamer)
    thread.join()


def test_the_timeout_raises_queue_empty_as_in_transformers(tok):
    import queue

    streamer = TextIteratorStreamer(tok, timeout=0.2)
    with pytest.raises(queue.Empty):
        next(streamer)


def test_a_streamer_without_on_error_is_left_alone():
    """transformers' streamers have only put/end: a failing generate just raises, as before."""
    calls = []

    class Recorder:
        def put(self, value):
            calls.append("put")

        def end(self):
            calls.append("end")

    with pytest.raises(MemoryError):
        FailingLM(fail_at=2).generate([[1]], max_new_tokens=5, streamer=Recorder())
    assert calls == ["put", "put", "put"]


@pytest.mark.parametrize("value", ["abc", None, np.array([1.5]), [True], [[[1]]], 2**70, [[1], [2, 3]]])
def test_what_is_not_token_ids_is_refused(tok, value):
    streamer = TextStreamer(tok, on_text=lambda text: None)
    with pytest.raises(GenerationError, match="TextStreamer.put: expected"):
        streamer.put(value)


def test_a_put_with_a_bad_id_changes_nothing():
    """All or nothing: the ids before a bad one are not consumed (their text would be lost)."""
    from qwen2np import Qwen2Tokenizer
    from qwen2np.generation import TextStreamer

    tok = Qwen2Tokenizer.from_pretrained()
    pieces = []
    streamer = TextStreamer(tok, on_text=pieces.append)
    emoji = tok.encode("🤖")                      # several byte-level tokens for one character
    streamer.put([emoji[0]])
    from qwen2np.errors import Qwen2npError

    with pytest.raises(Qwen2npError):
        streamer.put([9707, 10 ** 9])            # "Hello", then an id outside the vocabulary
    streamer.put(emoji[1:] + [9707])
    streamer.end()
    assert "".join(pieces) == "🤖Hello"
