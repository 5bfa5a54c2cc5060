"""`qwen2np generate` and `qwen2np chat` end to end, in subprocesses, on the real checkpoint: the streamed
answers are the library's greedy answers, the chat keeps its history, and bad input gives one line and
status 2, never a traceback.
"""

import os
import subprocess
import sys

import pytest

NEW = 8  # new tokens per answer: enough to compare, short enough to be quick


def run_cli(*args, stdin=None, env_extra=None, timeout=600):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "qwen2np", *args], input=stdin, capture_output=True,
                          text=True, encoding="utf-8", env=env, timeout=timeout)


@pytest.fixture(scope="module")
def checkpoint_env(test_gguf):
    return {"QWEN2NP_TEST_CHECKPOINT": str(test_gguf)}


@pytest.fixture(scope="module")
def library(real_model, real_tokenizer):
    """The library's greedy answer to a conversation, as the CLI should print it."""
    model, tokenizer = real_model, real_tokenizer

    def answer(messages=None, raw=None):
        if messages is not None:
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="np")["input_ids"]
        else:
            ids = tokenizer([raw], return_tensors="np")["input_ids"]
        out = model.generate(ids, max_new_tokens=NEW, do_sample=False)
        return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    return answer


@pytest.mark.slow
@pytest.mark.checkpoint
def test_generate_streams_the_greedy_answer(checkpoint_env, library):
    r = run_cli("generate", "--model", "test", "--max-new-tokens", str(NEW), "--greedy",
                "--system", "Be brief.", "Name a prime number.", env_extra=checkpoint_env)
    assert r.returncode == 0, r.stderr
    want = library([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a prime number."}])
    assert r.stdout == want + "\n"
    assert "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert "prompt tokens at" in last and "new tokens" in last and "tok/s" in last

    raw = run_cli("generate", "--model", "test", "--max-new-tokens", str(NEW), "--no-chat", "def add(a, b):",
                  env_extra=checkpoint_env)
    assert raw.returncode == 0, raw.stderr
    assert raw.stdout == library(raw="def add(a, b):") + "\n"


@pytest.mark.slow
@pytest.mark.checkpoint
def test_chat_session_keeps_history_and_resets(checkpoint_env, library):
    turns = "My name is Ada.\nWhat is my name?\n/reset\nWhat is my name?\n"
    r = run_cli("chat", "--model", "test", "--max-new-tokens", str(NEW), stdin=turns, env_extra=checkpoint_env)
    assert r.returncode == 0, r.stderr  # EOF ends the session cleanly
    assert "Traceback" not in r.stderr and "(conversation reset)" in r.stderr
    first = library([{"role": "user", "content": "My name is Ada."}])
    second = library([{"role": "user", "content": "My name is Ada."}, {"role": "assistant", "content": first},
                      {"role": "user", "content": "What is my name?"}])
    fresh = library([{"role": "user", "content": "What is my name?"}])
    assert r.stdout == f"{first}\n{second}\n{fresh}\n"
    assert r.stderr.count("prompt tokens at") == 3


@pytest.mark.slow
@pytest.mark.checkpoint
def test_chat_exit_command(checkpoint_env):
    r = run_cli("chat", "--model", "test", "--max-new-tokens", "1", stdin="/exit\nnever read\n",
                env_extra=checkpoint_env)
    assert r.returncode == 0 and r.stdout == "", r.stderr


@pytest.mark.slow
@pytest.mark.checkpoint
def test_chat_ctrl_c_stops_the_answer_only(checkpoint_env):
    import signal

    # subtle: a shell without job control starts background jobs (`.ci/run ... &`) with SIGINT ignored,
    # children inherit that, and Python then installs no KeyboardInterrupt handler: restore the default
    proc = subprocess.Popen([sys.executable, "-m", "qwen2np", "chat", "--model", "test", "--max-new-tokens", "400"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, **checkpoint_env},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        proc.stdin.write(b"Write a long story about a robot.\n")
        proc.stdin.flush()
        first = proc.stdout.read(1)  # the answer has started streaming
        assert first
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(b"/exit\n", timeout=600)
    finally:
        proc.kill()
    err = err.decode()
    assert proc.returncode == 0, err
    assert "(answer stopped)" in err and "Traceback" not in err
    assert len((first + out).decode()) > 0


@pytest.mark.parametrize("args, message", [
    (["generate", "--max-new-tokens", "0", "hi"], "max_new_tokens must be an integer >= 1, found 0"),
    (["generate", "--temperature", "0", "hi"], "temperature must be a number > 0 when sampling"),
    (["generate", "--top-p", "1.5", "hi"], r"top_p must be a number in (0, 1], found 1.5"),
    (["generate", "--top-p", "0", "hi"], r"top_p must be a number in (0, 1], found 0.0"),
    (["generate", "--top-k", "-2", "hi"], "top_k must be an integer >= 0"),
    (["generate", "--greedy", "--seed", "3", "hi"], "--greedy contradicts"),
    (["generate", "--top-p", "high", "hi"], "argument --top-p: invalid float value: 'high'"),
    (["generate", "--bogus", "hi"], "unrecognized arguments: --bogus"),
    (["generate", "--model", "/no/such/model.gguf", "hi"], "no such file or folder: /no/such/model.gguf"),
    (["chat", "--seed", "-1"], "seed must be in [0, 2**64)"),
    (["generate", "--no-chat", ""], "the prompt is empty: with --no-chat there is no text to continue"),
])
def test_bad_input_is_one_line(args, message):
    r = run_cli(*args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert message in lines[0] and lines[0].startswith(f"qwen2np {args[0]}")
    assert r.stdout == ""


def test_corrupt_checkpoint_is_one_line(tmp_path, test_gguf):
    broken = tmp_path / "broken.gguf"
    with open(test_gguf, "rb") as f:
        broken.write_bytes(f.read(1 << 20))  # a truncated copy: the header is fine, the tensors are missing
    r = run_cli("generate", "--model", str(broken), "--max-new-tokens", "2", "hi")
    assert r.returncode == 2
    lines = [line for line in r.stderr.strip().splitlines() if not line.startswith("[")]  # progress bar
    assert len(lines) == 1 and lines[0].startswith("qwen2np generate: error:"), r.stderr
    assert str(broken) in lines[0] or "broken.gguf" in lines[0]


@pytest.mark.slow
@pytest.mark.checkpoint
def test_prompt_too_long_is_one_line(checkpoint_env, tmp_path):
    r = run_cli("generate", "--model", "test", "--max-new-tokens", "32760", "hi", env_extra=checkpoint_env)
    assert r.returncode == 2
    errors = [line for line in r.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "exceeds the model's max_position_embeddings=32768" in errors[0], r.stderr
    assert "Traceback" not in r.stderr


# -- a failed chat turn: one line, and the session goes on (a tiny random model, no checkpoint needed) -----

TINY_TEMPLATE = ("{% for m in messages %}{% if 'boom' in m.content %}{{ raise_exception('boom in the template') }}"
                 "{% endif %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def tiny_chat(tmp_path_factory):
    """A folder with a random one-layer model over the real vocabulary (64 positions) and a chat template
    that fails on messages containing "boom"; returns (folder, model, tokenizer)."""
    from qwen2np import Qwen2Config, Qwen2ForCausalLM, Qwen2Tokenizer

    folder = tmp_path_factory.mktemp("tiny_chat")
    tokenizer = Qwen2Tokenizer.from_pretrained()
    tokenizer.chat_template = TINY_TEMPLATE
    config = Qwen2Config(vocab_size=151936, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    model = Qwen2ForCausalLM(config, seed=3)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, Qwen2ForCausalLM.from_pretrained(folder), Qwen2Tokenizer.from_pretrained(folder)


def test_a_failed_chat_turn_is_one_line_and_the_session_goes_on(tiny_chat):
    folder, model, tokenizer = tiny_chat

    def answer(messages):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="np")["input_ids"]
        out = model.generate(ids, max_new_tokens=2, do_sample=False)
        return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    lines = [b"hello", b"bad \xff line", b"a boom here", b"x " * 80, b"again", b""]
    r = subprocess.run([sys.executable, "-m", "qwen2np", "chat", "--model", str(folder), "--max-new-tokens", "2",
                        "--greedy"], input=b"\n".join(lines), capture_output=True, timeout=300)
    err = r.stderr.decode()
    assert r.returncode == 0, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("qwen2np chat: error:")]
    assert len(errors) == 3, err
    assert "line 2 is not valid UTF-8: byte 0xff at character 4" in errors[0]
    assert "chat template raised an error: boom in the template" in errors[1]
    assert "max_position_embeddings=64" in errors[2]
    first = answer([{"role": "user", "content": "hello"}])
    # the failed turns left no trace in the history
    second = answer([{"role": "user", "content": "hello"}, {"role": "assistant", "content": first},
                     {"role": "user", "content": "again"}])
    assert r.stdout.decode() == f"{first}\n{second}\n"
    assert err.count("prompt tokens") == 2
