"""Named intermediates (qwen2np/inspection/tracing.py): every documented name with its documented shape, traced ==
untraced, and interventions that change exactly what they should."""

import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import qwen2np
from qwen2np import (DynamicCache, Qwen2Config, Qwen2ForCausalLM, Qwen2ForSequenceClassification, Qwen2ForTokenClassification,
                     Qwen2Model)
from qwen2np.errors import IntermediateNameError, TraceError
from qwen2np.inspection.edits import patch_from, zero_head
from qwen2np.inspection.names import intermediate_names
from qwen2np.inspection.tracing import Trace, tap, trace

DOC = Path(__file__).resolve().parents[2] / "docs" / "intermediates.md"
# layer 1 slides (max_window_layers=1) with a window of 3: a decode step sees fewer keys there
TINY = dict(vocab_size=40, hidden_size=24, intermediate_size=32, num_hidden_layers=2, num_attention_heads=6,
            num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, num_labels=3,
            use_sliding_window=True, sliding_window=3, max_window_layers=1, initializer_range=0.3)
HEADS = [Qwen2ForCausalLM, Qwen2ForSequenceClassification, Qwen2ForTokenClassification, Qwen2Model]


def documented():
    """[(name regex, [shape alternatives: list of dims, each a list of alternatives])] from the doc's table."""
    rows = []
    for line in DOC.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[0].startswith("`"):
            continue
        shapes = [[dim.split(" or ") for dim in s.split(", ")] for s in re.findall(r"\[([^\]]*)\]", cells[1])]
        for name in re.findall(r"`([^`]+)`", cells[0]):
            rows.append((re.escape(name).replace(r"\{l\}", r"\d+"), shapes))
    return rows


def evaluate(dim, sizes):
    """'H·HD' -> H * HD, with sizes {symbol: int}."""
    value = 1
    for factor in dim.split("·"):
        value *= int(factor) if factor.isdigit() else sizes[factor]
    return value


def shape_ok(shape, alternatives, sizes):
    return any(len(shape) == len(dims) and all(n in [evaluate(a, sizes) for a in dim] for n, dim in zip(shape, dims))
               for dims in alternatives)


def make(cls, dtype="float32", **overrides):
    return cls(Qwen2Config(**{**TINY, **overrides}), dtype=dtype, seed=3)


def ids(B=2, T=5, seed=0):
    return np.random.default_rng(seed).integers(1, TINY["vocab_size"], (B, T))


def test_the_doc_table_parses():
    rows = documented()
    assert len(rows) >= 24 and any(r[0] == r"model\.layers\.\d+\.self_attn\.probs" for r in rows)


@pytest.mark.parametrize("cache", [False, True], ids=["no cache", "prefill then a decode step"])
def test_every_documented_name_appears_with_its_documented_shape(cache):
    """For every head (and the bare model), with and without a cache, on a config with a sliding layer."""
    rows = documented()
    c = Qwen2Config(**TINY)
    B, T, past = 2, 1 if cache else 5, 5 if cache else 0
    seen = set()
    for cls in HEADS:
        model = make(cls)
        kv = None
        if cache:   # given explicitly: the token classifier's output has no cache, as in transformers
            kv = DynamicCache.from_config(model.config)
            model(ids(B, past), past_key_values=kv, use_cache=True)
        with trace(model) as t:
            model(ids(B, T, seed=1), past_key_values=kv, use_cache=cache)
        assert t.names() == model.intermediate_names(), cls.__name__   # all of them, in forward order
        for name in t.names():
            layer = re.search(r"layers\.(\d+)", name)
            sliding = layer is not None and c.layer_types[int(layer.group(1))] == "sliding_attention"
            S = (min(past, c.sliding_window - 1) if sliding else past) + T
            sizes = dict(B=B, T=T, S=S, D=c.hidden_size, H=c.num_attention_heads, KV=c.num_key_value_heads,
                         HD=c.head_dim, F=c.intermediate_size, V=c.vocab_size, C=c.num_labels)
            prefixed = name if cls is not Qwen2Model or name == "logits" else f"model.{name}"
            matches = [(i, shapes) for i, (pattern, shapes) in enumerate(rows) if re.fullmatch(pattern, prefixed)]
            assert matches, f"{name} is not documented in docs/intermediates.md"
            assert any(shape_ok(t[name].shape, shapes, sizes) for _, shapes in matches), \
                f"{cls.__name__}: {name} has shape {t[name].shape}, documented {[s for _, s in matches]} ({sizes})"
            seen.update(i for i, _ in matches)
    assert seen == set(range(len(rows))), f"documented but never produced: {[rows[i][0] for i in set(range(len(rows))) - seen]}"


def test_intermediate_names_is_the_models_list():
    model = make(Qwen2ForSequenceClassification)
    assert model.intermediate_names() == intermediate_names(2, head=("score", "logits"))
    assert make(Qwen2Model).intermediate_names() == intermediate_names(2, prefix="", head=())


def outputs(model, x, mask, steps):
    """Every array a forward pass returns: logits or hidden states, per-layer attentions and hidden states,
    and the cache, through a prefill and `steps` decode steps."""
    arrays = []
    cache = DynamicCache.from_config(model.config) if steps else None   # updated in place
    for start, end in [(0, x.shape[1] - steps)] + [(t, t + 1) for t in range(x.shape[1] - steps, x.shape[1])]:
        out = model(x[:, start:end], attention_mask=mask[:, :end], past_key_values=cache, use_cache=steps > 0,
                    output_attentions=True, output_hidden_states=True)
        main = out.logits if hasattr(out, "logits") else out.last_hidden_state
        arrays += [main, *out.attentions, *out.hidden_states]
    if cache is not None:
        arrays += [a for layer in cache.layers for a in (layer.keys, layer.values)]
    return arrays


@settings(max_examples=12)
@given(cls=st.sampled_from(HEADS), layers=st.integers(1, 3), kv=st.sampled_from([1, 2, 3]),
       sliding=st.booleans(), B=st.integers(1, 2), T=st.integers(2, 6), steps=st.integers(0, 2),
       dtype=st.sampled_from(["float32", "float64"]), seed=st.integers(0, 99))
def test_a_traced_forward_equals_an_untraced_one(cls, layers, kv, sliding, B, T, steps, dtype, seed):
    """Recording everything, and an identity edit of everything, change no bit of any output."""
    model = make(cls, dtype, num_hidden_layers=layers, num_key_value_heads=kv, use_sliding_window=sliding,
                 max_window_layers=layers // 2)
    x = ids(B, T, seed)
    mask = np.ones((B, T), dtype=np.int64)
    mask[0, :1] = 0   # a left-padded row (only row 0 when B = 1: its first position is padding)
    steps = min(steps, T - 1)
    plain = outputs(model, x, mask, steps)
    with trace(model, "*", edits={"*": lambda a: a}) as t:
        traced = outputs(model, x, mask, steps)
    assert len(plain) == len(traced)
    assert all(a.dtype == b.dtype and np.array_equal(a, b) for a, b in zip(plain, traced))
    assert len(t.history(model.intermediate_names()[-1])) == steps + 1   # one record per forward pass


def test_tap_is_free_without_a_trace():
    """Untraced, tap hands back the very same object (no copy, no name built); a trace left by an
    exception is removed."""
    x = np.ones(3, dtype=np.float32)
    assert tap("model.layers.0", "mlp.act", x) is x
    with pytest.raises(RuntimeError):
        with Trace(None, "*"):
            raise RuntimeError("inside")
    assert tap("a", "b", x) is x and not qwen2np.inspection.tracing._active.get()


def test_readme_example_shape():
    model = make(Qwen2ForCausalLM)
    with qwen2np.trace(model, "model.layers.1.self_attn.probs") as t:
        model(ids(1, 4))
    assert t["model.layers.1.self_attn.probs"].shape == (1, 6, 4, 4)   # [B, H, T, S]
    assert t.names() == ["model.layers.1.self_attn.probs"]


# -- interventions ------------------------------------------------------------------------------------


def full_trace(model, x, **kwargs):
    with trace(model, "*", **kwargs) as t:
        model(x)
    return t


def test_zeroing_a_head_changes_exactly_what_it_should():
    """Zero head 2's probs in layer 1: everything before is bit-identical, the probs are the baseline's with
    head 2 zeroed, the context is zero for head 2 and unchanged for the others, and what follows changes."""
    model = make(Qwen2ForCausalLM, num_hidden_layers=2, use_sliding_window=False)
    x = ids(2, 5)
    base = full_trace(model, x)
    edited_name = "model.layers.1.self_attn.probs"
    edited = full_trace(model, x, edits={edited_name: zero_head(2)})
    names = model.intermediate_names()
    at = names.index(edited_name)
    for name in names[:at]:
        assert np.array_equal(base[name], edited[name]), name
    expected = base[edited_name].copy()
    expected[:, 2] = 0
    assert np.array_equal(edited[edited_name], expected)
    HD = model.config.head_dim
    context, context0 = edited["model.layers.1.self_attn.context"], base["model.layers.1.self_attn.context"]
    assert not context[..., 2 * HD:3 * HD].any()
    others = np.r_[0:2 * HD, 3 * HD:context.shape[-1]]
    assert np.array_equal(context[..., others], context0[..., others])
    for name in ["model.layers.1.self_attn.o_proj", "model.layers.1", "model.norm", "logits"]:
        assert not np.allclose(base[name], edited[name]), f"{name} should change downstream of the edit"


def test_zero_head_on_merged_heads_and_on_every_layer():
    model = make(Qwen2ForCausalLM)
    x = ids(1, 4)
    HD = model.config.head_dim
    t = full_trace(model, x, edits={"model.layers.*.self_attn.context": zero_head(0, head_dim=HD)})
    for layer in range(2):
        assert not t[f"model.layers.{layer}.self_attn.context"][..., :HD].any()
        assert t[f"model.layers.{layer}.self_attn.context"][..., HD:].any()


def test_patching_a_layer_output_from_another_prompt():
    """Activation patching: record the residual stream after layer 0 for prompt A, substitute it while
    running prompt B. Before the patch, B's own values; from the patch on, exactly A's."""
    model = make(Qwen2ForCausalLM, use_sliding_window=False)
    a, b = ids(1, 5, seed=1), ids(1, 5, seed=2)
    run_a, run_b = full_trace(model, a), full_trace(model, b)
    patched = full_trace(model, b, edits=patch_from(run_a, ["model.layers.0"]))
    names = model.intermediate_names()
    at = names.index("model.layers.0")
    for name in names[:at]:
        assert np.array_equal(patched[name], run_b[name]), name
    for name in names[at:]:
        assert np.array_equal(patched[name], run_a[name]), name


def test_patching_one_position():
    model = make(Qwen2ForCausalLM, use_sliding_window=False)
    a, b = ids(1, 5, seed=1), ids(1, 5, seed=2)
    run_a, run_b = full_trace(model, a), full_trace(model, b)
    name = "model.layers.0.self_attn.probs"      # [B, H, T, S]: positions on axis 2
    patched = full_trace(model, b, edits=patch_from(run_a, name, positions=[4]))
    assert np.array_equal(patched[name][:, :, 4], run_a[name][:, :, 4])
    assert np.array_equal(patched[name][:, :, :4], run_b[name][:, :, :4])
    assert not np.array_equal(patched["logits"][:, 4], run_b["logits"][:, 4])


def test_edits_with_arrays_and_with_names():
    model = make(Qwen2ForCausalLM)
    x = ids(1, 3)
    base = full_trace(model, x)
    zeros = np.zeros_like(base["model.layers.0.mlp.act"])
    t = full_trace(model, x, edits={"model.layers.0.mlp.act": zeros})
    assert not t["model.layers.0.mlp.act"].any()
    kept = np.full_like(base["model.layers.0.mlp.act"], 0.5)   # the forward pass multiplies act in place
    scores = np.ones_like(base["model.layers.0.self_attn.scores"])   # … and adds the mask to the scores
    edits = {"model.layers.0.mlp.act": kept, "model.layers.0.self_attn.scores": lambda a: scores}
    runs = [full_trace(model, x, edits=edits)["logits"] for _ in range(2)]
    assert (kept == 0.5).all() and (scores == 1).all() and np.array_equal(*runs)   # given arrays stay as given
    seen = []
    with trace(model, edits={"*.mlp.act": lambda a, name: seen.append(name) or a}, pass_name=True):
        model(x)
    assert seen == ["model.layers.0.mlp.act", "model.layers.1.mlp.act"]


def test_misuse_is_explained():
    model = make(Qwen2ForCausalLM)
    x = ids(1, 3)
    with pytest.raises(IntermediateNameError, match="matches no intermediate") as e:
        trace(model, "model.layers.9.*")
    assert isinstance(e.value, KeyError) and "docs/intermediates.md" in str(e.value)
    with pytest.raises(TraceError, match="must keep shape"):
        with trace(model, edits={"model.norm": lambda a: a[:, :1]}):
            model(x)
    with pytest.raises(TraceError, match="must return an array"):
        with trace(model, edits={"model.norm": lambda a: a.tolist()}):
            model(x)
    with pytest.raises(TraceError, match="heads 0..5"):
        with trace(model, edits={"model.layers.0.self_attn.probs": zero_head(6)}):
            model(x)
    with pytest.raises(TraceError, match="head_dim"):
        with trace(model, edits={"model.layers.0.self_attn.context": zero_head(1)}):
            model(x)
    with trace(model, "logits") as t:
        model(x)
    with pytest.raises(IntermediateNameError, match="was not recorded; recorded: logits"):
        t["model.norm"]
    with pytest.raises(IntermediateNameError, match="matches nothing the source trace recorded"):
        patch_from(t, "model.norm")
    with pytest.raises(TraceError, match="same length"):
        with trace(model, edits=patch_from(t, "logits")):
            model(ids(1, 4))
    assert not qwen2np.inspection.tracing._active.get() and not qwen2np.inspection.tracing._running.get()   # every failed trace was left


def test_edits_apply_to_every_forward_pass():
    model = make(Qwen2ForCausalLM)
    x = ids(1, 4)
    with trace(model, "model.layers.0.self_attn.probs", edits={"model.layers.0.self_attn.probs": zero_head(1)}) as t:
        cache = model(x[:, :3]).past_key_values
        model(x[:, 3:], past_key_values=cache)
    assert [h.shape for h in t.history("model.layers.0.self_attn.probs")] == [(1, 6, 3, 3), (1, 6, 1, 4)]
    assert all(not h[:, 1].any() for h in t.history("model.layers.0.self_attn.probs"))


def test_patch_from_refuses_bad_positions_and_steps():
    """A position beyond the prompt, or a forward pass the source did not record: a TraceError, not an IndexError."""
    import numpy as np

    from qwen2np.errors import TraceError
    from qwen2np.inspection.edits import patch_from
    from qwen2np.inspection.tracing import Trace, tap

    with Trace(None, "demo.x") as source:
        tap("demo", "x", np.zeros((1, 2, 1)))
    with pytest.raises(TraceError, match="step is in"):
        patch_from(source, ["demo.x"], step=3)
    with pytest.raises(TraceError, match=r"positions \[9\] are outside its T axis of length 2"):
        with Trace(None, edits=patch_from(source, ["demo.x"], positions=[9])):
            tap("demo", "x", np.ones((1, 2, 1)))


# -- scope: a trace acts on its own model, in its own thread -----------------------------------------


def test_a_trace_acts_only_on_the_model_it_was_opened_on():
    """A trace with edits on model A leaves model B's forward pass (and B's records) alone; a trace on
    a head also sees its base model's intermediates, and one on the base model sees them when the head
    runs it."""
    a, b = make(Qwen2ForCausalLM), make(Qwen2ForCausalLM)
    x = ids(1, 4)
    clean = b(x).logits
    with trace(a, "logits", edits={"model.norm": lambda h: h * h.dtype.type(0)}) as t:
        assert np.array_equal(b(x).logits, clean)               # B: untouched, unrecorded
        assert "logits" not in t
        edited = a(x).logits
    assert not np.array_equal(edited, clean) and np.array_equal(t["logits"], edited)
    with trace(a.model, "model.norm") as base:
        a(x)
    assert base.names() == ["model.norm"]


def test_a_trace_entered_in_one_thread_does_not_touch_another_thread():
    """The forward passes of another thread, run while this thread's trace (with an edit) is open on the
    same model, give the untraced result and record nothing."""
    import threading

    model = make(Qwen2ForCausalLM)
    x = ids(2, 5)
    clean = model(x).logits
    entered, done = threading.Event(), threading.Event()
    results = []

    def other_thread():
        entered.wait(60)
        results.extend(model(x).logits for _ in range(3))
        done.set()

    worker = threading.Thread(target=other_thread)
    worker.start()
    with trace(model, "*", edits={"model.layers.*.mlp.act": lambda h: h * h.dtype.type(0)}) as t:
        entered.set()
        assert done.wait(120)
        edited = model(x).logits
    worker.join()
    assert len(results) == 3 and all(np.array_equal(r, clean) for r in results)
    assert len(t.history("logits")) == 1 and not np.array_equal(edited, clean)


def test_traces_in_concurrent_threads_keep_to_themselves():
    """Two threads, each with its own trace and edit on the same model, each see only their own."""
    import threading

    model = make(Qwen2ForCausalLM)
    x = ids(1, 4)
    barrier = threading.Barrier(2)
    out = {}

    def run(scale):
        with trace(model, "logits", edits={"model.norm": lambda h: h * h.dtype.type(scale)}) as t:
            barrier.wait(60)
            for _ in range(3):
                model(x)
            barrier.wait(60)
        out[scale] = t

    threads = [threading.Thread(target=run, args=(s,)) for s in (0.5, 2.0)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for scale in (0.5, 2.0):
        with trace(model, "logits", edits={"model.norm": lambda h: h * h.dtype.type(scale)}) as alone:
            model(x)
        history = out[scale].history("logits")
        assert len(history) == 3 and all(np.array_equal(h, alone["logits"]) for h in history)


def test_nested_traces_generators_and_generate_still_work():
    model = make(Qwen2ForCausalLM)
    x = ids(1, 4)
    with trace(model, "logits") as outer:
        with trace(model, "model.norm", edits={"model.norm": lambda h: h * h.dtype.type(2)}) as inner:
            model(x)
        model(x)
    assert len(outer.history("logits")) == 2 and len(inner.history("model.norm")) == 1
    assert not np.array_equal(*outer.history("logits"))

    def steps():          # a trace held open across yields, as a generator would
        with trace(model, "logits") as t:
            yield model(x).logits
            yield model(x).logits
        yield t

    first, second, t = list(steps())
    assert len(t.history("logits")) == 2 and np.array_equal(first, second)
    with trace(model, "logits") as g:
        model.generate(x, max_new_tokens=3, do_sample=False)
    assert len(g.history("logits")) == 3      # the prefill, then two decode steps


# -- a trace that keeps some positions -----------------------------------------------------------------


@pytest.mark.parametrize("padded", [False, True], ids=["causal", "left padding"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_a_trace_that_keeps_positions_leaves_attention_in_blocks(monkeypatch, padded, dtype):
    """A trace keeping positions (`positions=`) records those rows only, of every intermediate, and the
    long pass stays attended over in blocks: the [B, H, T, S] scores, mask and probabilities are made
    for the kept rows only (a traced 32k-token prompt needed 57 GB of them before issue 17). What it
    records equals those rows of a trace that keeps everything (attention made whole), within rounding;
    the logits of the kept rows too (float16: the rows that see no key are zero either way)."""
    import qwen2np.model.attention as attention

    monkeypatch.setattr(attention, "BLOCK_ROWS", 4)
    monkeypatch.setattr(attention, "SCORES_BUDGET_BYTES", 4 * 2 * 6 * 24 * np.dtype(dtype).itemsize)   # and with padding
    made = []
    whole = attention.attend

    def counting(q, *args, **kw):
        made.append(q.shape[2])
        return whole(q, *args, **kw)

    monkeypatch.setattr(attention, "attend", counting)
    model = make(Qwen2ForCausalLM, dtype)
    x = ids(2, 24)
    mask = np.ones_like(x)
    if padded:
        mask[1, :5] = 0
    kept = [0, 3, 7, 23]
    with trace(model, "*", positions=kept) as part:
        logits = model(x, attention_mask=mask).logits
    assert max(made) == 4 and made.count(4) >= 2 * 24 // 4          # every layer in blocks of 4 rows
    made.clear()
    with trace(model, "*") as full:
        reference = model(x, attention_mask=mask).logits
    assert max(made) == 24                                            # made whole for a trace of every row
    eps = float(np.finfo(dtype).eps)
    assert part.names() == full.names()
    for name in full.names():
        axis = qwen2np.inspection.names.position_axes(name, full[name].ndim)[0]
        expected = full[name] if axis is None else np.take(full[name], kept, axis=axis)
        got, want = np.asarray(part[name], np.float64), np.asarray(expected, np.float64)
        assert got.shape == want.shape, name
        assert np.allclose(got, want, rtol=16 * eps, atol=16 * eps * max(1.0, np.abs(want).max())), name
    assert part["model.layers.1.self_attn.probs"].shape == (2, 6, 4, 24)
    assert np.allclose(np.asarray(logits, np.float64), np.asarray(reference, np.float64), rtol=16 * eps,
                       atol=16 * eps * float(np.abs(np.asarray(reference, np.float64)).max()))


def test_trace_positions_are_checked_and_may_change_between_passes():
    model = make(Qwen2ForCausalLM)
    for bad in ([], [-1], [1.5], [True], "3"):
        with pytest.raises(TraceError, match="positions"):
            trace(model, "logits", positions=bad)
    with trace(model, "logits", "model.layers.0.self_attn.probs", positions=[1, 2, 99]) as t:
        out = model(ids(1, 5))
        t.positions = None
        model(ids(1, 1), past_key_values=out.past_key_values)
    first, step = t.history("model.layers.0.self_attn.probs")
    assert first.shape == (1, 6, 2, 5) and step.shape == (1, 6, 1, 6)
    assert t.history("logits")[0].shape == (1, 2, TINY["vocab_size"])
    with trace(model, "logits", positions=[4]) as t:                  # logits_to_keep: rows 3 and 4 only
        model(ids(1, 5), logits_to_keep=2)
    assert t["logits"].shape == (1, 1, TINY["vocab_size"])
