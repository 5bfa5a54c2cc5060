"""The dump format (qwen2np/golden/dump.py), qwen2np's recorder (record.py), fingerprints, and `qwen2np dump`."""

import json
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen2np import Qwen2Config, Qwen2ForCausalLM
from qwen2np.errors import DumpError, OutputExistsError
from qwen2np.golden.dump import DumpWriter, new_dump, plan_passes, read_dump, write_dump
from qwen2np.golden.manifest import MANIFEST, TENSORS, tensor_key
from qwen2np.golden.tensor_file import DumpTensor
from qwen2np.golden.fingerprint import config_fingerprint, differing_weights, weight_digest, weights_fingerprint
from qwen2np.golden.metrics import blocks
from qwen2np.golden.record import record_dump
from qwen2np.inspection.tracing import trace

TINY = dict(vocab_size=48, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, initializer_range=0.3)


@pytest.fixture(scope="module")
def model():
    return Qwen2ForCausalLM(Qwen2Config(**TINY), seed=5)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, model):
    folder = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(folder)
    return folder


@st.composite
def dumps(draw):
    B, N = draw(st.integers(1, 3)), draw(st.integers(1, 6))
    steps = draw(st.integers(0, N - 1))
    dtype = draw(st.sampled_from(["float32", "float64"]))
    names = draw(st.lists(st.from_regex(r"[a-z][a-z0-9_.]{0,20}", fullmatch=True), min_size=1, max_size=4, unique=True))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    passes = []
    for start, length in plan_passes(N, steps):
        kept = None if start else draw(st.none() | st.lists(st.integers(0, length - 1), min_size=1, unique=True)
                                       .map(sorted))      # the positions the prefill kept, or all
        T = length if kept is None else len(kept)
        tensors = [(n, rng.standard_normal((B, T, draw(st.integers(0, 3)))).astype(dtype)) for n in names]
        passes.append({"start": start, "length": length, "positions": kept, "tensors": tensors})
    mask = draw(st.none() | st.just(rng.integers(0, 2, (B, N))))
    prompt = draw(st.none() | st.text(max_size=20))
    return new_dump(producer="hypothesis", dtype=dtype, input_ids=rng.integers(0, 1000, (B, N)), passes=passes,
                    attention_mask=mask, prompt=prompt, options={"decode_steps": steps})


@settings(max_examples=25)
@given(dump=dumps())
def test_a_dump_round_trips(dump, tmp_path_factory):
    """write, read: the same manifest (the positions a pass kept too) and the same arrays, bit for bit, in the
    same dtypes; read a block at a time from the file, the same arrays again."""
    folder = write_dump(dump, tmp_path_factory.mktemp("dump"))
    again = read_dump(folder)
    assert again.manifest == json.loads(json.dumps(dump.manifest))
    assert again.manifest == dump.manifest
    assert set(again.tensors) == set(dump.tensors)
    for key, array in dump.tensors.items():
        assert again[key].dtype == array.dtype and np.array_equal(again[key], array)
        stored = again.stored(key)
        assert isinstance(stored, DumpTensor) and stored.shape == array.shape and stored.dtype == array.dtype
        for index in blocks(array.shape, 5):
            assert np.array_equal(stored[index], array[index])
    assert [e["key"] for _, e in again.entries()] == [e["key"] for _, e in dump.entries()]


def test_keys_and_passes():
    assert tensor_key("model.norm", 0) == "model.norm" and tensor_key("model.norm", 3) == "model.norm@3"
    assert plan_passes(4, 3) == [(0, 1), (1, 1), (2, 1), (3, 1)]
    with pytest.raises(DumpError, match=r"decode_steps must be in \[0, 3\]"):
        plan_passes(4, 4)


def test_record_dump_holds_what_the_trace_saw(model):
    """Each pass of the dump is the trace's record of that forward pass, in forward order."""
    x = np.array([[3, 1, 4, 1, 5, 9]])
    dump = record_dump(model, x, decode_steps=2, prompt=None)
    with trace(model) as t:
        cache = model(x[:, :4]).past_key_values
        for i in (4, 5):
            model(x[:, i:i + 1], past_key_values=cache)
    assert [(p["start"], p["length"]) for p in dump.passes] == [(0, 4), (4, 1), (5, 1)]
    for index in range(3):
        assert dump.names(index) == t.names()
        for name in t.names():
            assert np.array_equal(dump.tensor(name, index), t.history(name)[index]), (name, index)
    m = dump.manifest
    assert m["input_ids"] == x.tolist() and m["dtype"] == "float32" and m["versions"]["numpy"] == np.__version__
    assert m["model"]["config"]["num_hidden_layers"] == 2
    assert m["model"]["weights_fingerprint"]["digest"] == weights_fingerprint(model.state_dict())["digest"]


def test_fingerprints():
    w = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4, np.float32)}
    fp = weights_fingerprint(w)
    assert weights_fingerprint({k: v.astype(np.float64) for k, v in w.items()})["digest"] == fp["digest"]
    changed = {**w, "b": np.array([1, 1, 1, 1.5], np.float32)}
    assert differing_weights(fp, weights_fingerprint(changed)) == ["b"]
    assert weights_fingerprint({"a": w["a"].reshape(3, 2), "b": w["b"]})["digest"] != fp["digest"]  # shape counts
    big = np.zeros(100_000, np.float32)
    assert weight_digest(big, "sha256-f32-sampled") != weight_digest(big, "sha256-f32")
    c = Qwen2Config(**TINY)
    assert config_fingerprint(c) == config_fingerprint(c.to_dict())
    assert config_fingerprint(c) != config_fingerprint({**c.to_dict(), "rms_norm_eps": 1e-5})
    assert config_fingerprint(c) == config_fingerprint({**c.to_dict(), "eos_token_id": 7})


def _manifest(folder):
    return json.loads((folder / MANIFEST).read_text())


def _rewrite(folder, change):
    m = _manifest(folder)
    change(m)
    (folder / MANIFEST).write_text(json.dumps(m))


@pytest.mark.parametrize("change, message", [
    (lambda m: m.update(format_version=2), "format_version: expected 1"),
    (lambda m: m.update(dtype="int8"), "dtype: expected one of 'float32', 'float64', 'bfloat16', 'float16'"),
    (lambda m: m.update(input_ids=[[1, 2], [3]]), "input_ids: expected"),
    (lambda m: m.update(attention_mask=[[1, 2, 1]]), "attention_mask: expected"),
    (lambda m: m["passes"][0].update(start=1), r"passes\[0\]: expected an object with start = 0"),
    (lambda m: m["passes"][0]["tensors"][0].update(shape=[9]), "says \\[9\\] float32"),
    (lambda m: m["passes"][0]["tensors"][0].update(key="other"), r"passes\[0\].tensors\[0\]"),
    (lambda m: m["passes"][0]["tensors"].pop(), "holds 1 tensor manifest.json does not list"),
    (lambda m: m["passes"][0].update(length=2), "covering the 3 positions"),
    # values that ended in an internal error (exit 1, read by CI as "out of tolerance") before they were checked
    (lambda m: m["input_ids"][0].__setitem__(1, 2**70),
     r"input_ids\[0\]\[1\]: expected a token id, 0 <= id < 2\*\*63, found 1180591620717411303424"),
    (lambda m: m["input_ids"][0].__setitem__(2, -1), r"input_ids\[0\]\[2\]: expected a token id, .* found -1"),
    (lambda m: m["passes"][0].update(positions=[0, 3]), r"passes\[0\].positions: expected null, or the input positions"),
    (lambda m: m.update(model="x"), r"model: expected an object"),
    (lambda m: m.update(model={"config": {"num_hidden_layers": "2"}}), r"model.config.num_hidden_layers: expected"),
    (lambda m: m.update(model={"weights_fingerprint": {"tensors": [1]}}), r"model.weights_fingerprint: expected"),
])
def test_malformed_manifests_are_refused_with_the_field(tmp_path, model, change, message):
    folder = write_dump(record_dump(model, [[1, 2, 3]], include=["logits", "model.norm"], fingerprint=None), tmp_path)
    _rewrite(folder, change)
    with pytest.raises(DumpError, match=message):
        read_dump(folder)


def test_missing_or_broken_files(tmp_path, model):
    with pytest.raises(DumpError, match="not a dump \\(no such folder\\)"):
        read_dump(tmp_path / "nothing")
    folder = write_dump(record_dump(model, [[1, 2, 3]], include=["logits"], fingerprint=None), tmp_path / "d")
    (folder / TENSORS).write_bytes((folder / TENSORS).read_bytes()[:100])
    with pytest.raises(DumpError, match="cannot read the tensors"):
        read_dump(folder)
    (folder / MANIFEST).write_text("{not json")
    with pytest.raises(DumpError, match="not valid JSON"):
        read_dump(folder)
    (folder / MANIFEST).write_text("[" * 100_000 + "]" * 100_000)   # json's parser recurses once per level
    with pytest.raises(DumpError, match="manifest.json: nested too deeply for a manifest"):
        read_dump(folder)


def test_a_stored_tensor_reads_blocks_of_the_file_it_was_read_from(model, tmp_path):
    """Dump.stored reads from the file read_dump opened: a dump replaced meanwhile (--overwrite) is read as it
    was; a block that is not contiguous is refused; a tensor replaced in memory is what `stored` gives."""
    old = record_dump(model, [[1, 2, 3]], include=["logits", "model.norm"], fingerprint=None)
    dump = read_dump(write_dump(old, tmp_path / "d"))
    write_dump(record_dump(model, [[4, 5, 6]], include=["logits", "model.norm"], fingerprint=None), tmp_path / "d",
               overwrite=True)
    stored = dump.stored("logits")                                     # [1, 3, 48]
    assert np.array_equal(np.asarray(stored), old["logits"]) and np.array_equal(stored[0, 1], old["logits"][0, 1])
    assert np.array_equal(stored[:, 1:3], old["logits"][:, 1:3]) and stored[:, 1:1].shape == (1, 0, 48)
    for bad in [(slice(None), slice(None), slice(0, 2)), (slice(None), slice(None, None, 2))]:
        with pytest.raises(IndexError, match="logits"):
            stored[bad]
    dump.tensors["logits"] = dump["logits"] + 1
    assert dump.stored("logits") is dump.tensors["logits"]
    with pytest.raises(DumpError, match="other: not in the dump"):
        dump.stored("other")


def test_the_positions_a_pass_kept_survive_the_file(model, tmp_path):
    """manifest.json once dropped a pass's "positions": a written --positions dump of a padded batch was then
    compared at the wrong positions of the mask (the last ones, not the ones kept)."""
    ids, mask = [[5, 6, 7, 8, 9, 10], [0, 0, 3, 4, 5, 6]], [[1] * 6, [0, 0, 1, 1, 1, 1]]
    for out in (None, tmp_path / "streamed"):
        dump = record_dump(model, ids, mask, include=["logits"], positions="0:3", out=out)
        again = read_dump(write_dump(dump, tmp_path / "written", overwrite=True))
        assert dump.passes[0]["positions"] == again.passes[0]["positions"] == [0, 1, 2]
    good = read_dump(tmp_path / "written")
    tensors = {"logits": good["logits"].copy()}
    tensors["logits"][1, 0] += 1.0                                     # row 1, position 0: padding
    bad = new_dump(producer="x", dtype="float32", input_ids=ids, attention_mask=mask, passes=[
        {"start": 0, "length": 6, "positions": [0, 1, 2], "tensors": [("logits", tensors["logits"])]}])
    bad = read_dump(write_dump(bad, tmp_path / "bad"))
    from qwen2np.golden.compare import compare_dumps

    assert compare_dumps(bad, good).ok
    tensors["logits"][1, 2] += 1.0                                     # row 1, position 2: a token
    worse = new_dump(producer="x", dtype="float32", input_ids=ids, attention_mask=mask, passes=[
        {"start": 0, "length": 6, "positions": [0, 1, 2], "tensors": [("logits", tensors["logits"])]}])
    assert not compare_dumps(read_dump(write_dump(worse, tmp_path / "worse")), good).ok


def qwen2np_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "qwen2np", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def test_the_dump_command_end_to_end(tiny_folder, tmp_path, model):
    out = tmp_path / "d"
    r = qwen2np_cli("dump", "--model", tiny_folder, "--ids", "[[5, 6, 7, 8], [0, 0, 9, 10]]",
                    "--attention-mask", "[[1, 1, 1, 1], [0, 0, 1, 1]]", "--include", "model.layers.1.*", "logits",
                    "--decode-steps", "1", "--out", out)
    assert r.returncode == 0, r.stderr
    assert "wrote 38 tensors" in r.stderr
    dump = read_dump(out)
    assert dump.manifest["attention_mask"] == [[1, 1, 1, 1], [0, 0, 1, 1]]
    expected = record_dump(model, [[5, 6, 7, 8], [0, 0, 9, 10]], [[1, 1, 1, 1], [0, 0, 1, 1]],
                           include=["model.layers.1.*", "logits"], decode_steps=1)
    assert dump.manifest["model"]["weights_fingerprint"] == expected.manifest["model"]["weights_fingerprint"]
    assert all(np.array_equal(dump[k], expected[k]) for k in expected.tensors)


@pytest.mark.parametrize("args, message", [
    (["--ids", "1,2,3", "--include", "model.layers.7.*"], "matches no intermediate"),
    (["--ids", "1,x"], "--ids: item 2 ('x') is not an integer"),
    (["--ids", "[[1, 2], [3]]"], "--ids: row 2 has 1 ids, row 1 has 2"),
    (["--ids", "[[1, 2], [3, true]]"], "--ids: row 2 item 2 (true) is not an integer"),
    (["--ids", "[1, 2"], "--ids: not valid JSON"),
    (["--ids", "1,-2"], "--ids: item 2 (-2) is not a token id"),
    (["--ids", f"1,{2**70}"], f"--ids: item 2 ({2**70}) is not a token id (expected 0 <= id < 2**63)"),
    (["--ids", "[[1, 2], [3, 48]]"], "--ids: id 48 (row 2, item 2) is not a token id of this model (vocab_size 48)"),
    (["--ids", "1", "--attention-mask", "[1, x]"], "--attention-mask: not valid JSON"),
    (["--prompt", "\udcff"], "--prompt is not valid UTF-8: byte 0xff"),
    (["--ids", "1,2", "--decode-steps", "2"], "decode_steps must be in"),
    (["--ids", "1,2", "--attention-mask", "1"], "--attention-mask: expected zeros and ones of the shape"),
    (["--ids", "1,2", "--chat"], "--chat applies to --prompt"),
    (["--ids", "1,2,3", "--positions", "1:2:0"], "positions '1:2:0': a slice's step cannot be 0"),
    (["--ids", "1,2", "--dtype", "int8"], "invalid choice"),
    (["--ids", "1,2", "--prompt", "hi"], "not allowed with"),
])
def test_the_dump_command_explains_bad_input(tiny_folder, tmp_path, args, message):
    """Bad input of any kind is one line and status 2 (0 and 1 are compare's verdicts)."""
    r = qwen2np_cli("dump", "--model", tiny_folder, *args, "--out", tmp_path / "d")
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and len(r.stderr.splitlines()) == 1
    assert not (tmp_path / "d").exists()


def test_the_dump_command_replaces_an_old_dump_only_when_asked(tiny_folder, tmp_path):
    out = tmp_path / "d"
    r = qwen2np_cli("dump", "--model", tiny_folder, "--ids", "1,2,3", "--include", "logits", "--out", out)
    assert r.returncode == 0 and r.stderr.startswith(f"wrote 1 tensor (0.0 MB) of 1 forward pass to {out} in "), r.stderr
    old = read_dump(out).manifest
    r = qwen2np_cli("dump", "--model", tiny_folder, "--ids", "4,5", "--include", "model.norm", "--out", out)
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "the folder holds files (manifest.json, tensors.safetensors); pass overwrite=True (--overwrite" in r.stderr
    assert read_dump(out).manifest == old
    r = qwen2np_cli("dump", "--model", tiny_folder, "--ids", "4,5", "--include", "model.norm", "--out", out, "--overwrite")
    assert r.returncode == 0, r.stderr
    again = read_dump(out)
    assert again.manifest["input_ids"] == [[4, 5]] and again.names() == ["model.norm"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # no temporary folder left beside it
    (tmp_path / "file").write_text("x")
    r = qwen2np_cli("dump", "--model", tiny_folder, "--ids", "1", "--out", tmp_path / "file", "--overwrite")
    assert r.returncode == 2 and "expected a folder to write into, found a file" in r.stderr
    assert r.stderr.count("\n") == 1 and (tmp_path / "file").read_text() == "x"


def test_a_full_disk_leaves_the_old_dump_whole(tiny_folder, tmp_path):
    """The tensors fail to write (ENOSPC, simulated): one line naming the folder, exit 2, the old dump as it was."""
    out = tmp_path / "d"
    assert qwen2np_cli("dump", "--model", tiny_folder, "--ids", "1,2,3", "--include", "logits", "--out", out).returncode == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    script = ("import errno, sys, qwen2np.golden.dump as d\n"
              "def full(source, target):\n"
              "    target.write(b'half')\n"
              "    raise OSError(errno.ENOSPC, 'No space left on device')\n"
              "d._copy_file = full\n"
              "from qwen2np.cli import main\n"
              "sys.exit(main(sys.argv[1:]))\n")
    r = subprocess.run([sys.executable, "-c", script, "dump", "--model", str(tiny_folder), "--ids", "7,8",
                        "--out", str(out), "--overwrite"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr == f"qwen2np dump: error: cannot write {out}: No space left on device\n", \
        r.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_write_dump_refuses_a_folder_that_holds_files(model, tmp_path):
    dump = record_dump(model, [[1, 2, 3]], include=["logits"], fingerprint=None)
    folder = write_dump(dump, tmp_path / "d")
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="holds files"):
        write_dump(dump, folder)
    assert (folder / "notes.txt").read_text() == "mine"
    write_dump(dump, folder, overwrite=True)
    assert sorted(p.name for p in folder.iterdir()) == [MANIFEST, TENSORS]


def test_dump_writer_streams_the_same_dump(model, tmp_path):
    """Tensors added one by one, in any order, make the dump write_dump makes from memory."""
    dump = record_dump(model, [[3, 1, 4, 1]], decode_steps=1, fingerprint=None)
    whole = read_dump(write_dump(dump, tmp_path / "whole"))
    with DumpWriter(tmp_path / "streamed") as writer:
        for key in reversed(list(dump.tensors)):
            writer.add(key, dump.tensors[key])
        assert not (tmp_path / "streamed").exists()  # nothing is visible before finish and the swap
        writer.finish(dump.manifest)
    streamed = read_dump(tmp_path / "streamed")
    assert streamed.manifest == whole.manifest and set(streamed.tensors) == set(whole.tensors)
    assert all(np.array_equal(streamed[k], whole[k]) and streamed[k].dtype == whole[k].dtype for k in whole.tensors)
    assert sorted(p.name for p in (tmp_path / "streamed").iterdir()) == [MANIFEST, TENSORS]


def test_dump_writer_writes_nothing_unless_finished(model, tmp_path):
    dump = record_dump(model, [[1, 2]], include=["logits"], fingerprint=None)
    old = write_dump(dump, tmp_path / "d")
    before = {p.name: p.read_bytes() for p in old.iterdir()}
    with pytest.raises(DumpError, match="left without finish"):
        with DumpWriter(old, overwrite=True) as writer:
            writer.add("logits", dump["logits"])
    with pytest.raises(DumpError, match="passes\\[0\\].tensors\\[0\\]|listed in manifest.json but not"):
        with DumpWriter(old, overwrite=True) as writer:
            writer.add("other", dump["logits"])
            writer.finish(dump.manifest)  # lists "logits", which was not added
    with pytest.raises(KeyboardInterrupt):
        with DumpWriter(old, overwrite=True) as writer:
            writer.add("logits", dump["logits"])
            raise KeyboardInterrupt
    with pytest.raises(DumpError, match="added before"):
        with DumpWriter(old, overwrite=True) as writer:
            writer.add("logits", dump["logits"])
            writer.add("logits", dump["logits"])
    assert {p.name: p.read_bytes() for p in old.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


# -- dumps written as they are recorded, and position selections --------------------------------------


def _same_dumps(a, b):
    assert [(p["start"], p["length"], p.get("positions")) for p in a.passes] == \
           [(p["start"], p["length"], p.get("positions")) for p in b.passes]
    assert a.names() == b.names() and set(a.tensors) == set(b.tensors)
    for key in a.tensors:
        assert np.array_equal(a[key], b[key]), key


def test_a_dump_streamed_to_disk_equals_the_one_built_in_memory(model, tmp_path):
    ids, mask = [[5, 6, 7, 8, 9], [0, 0, 3, 4, 5]], [[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]]
    in_memory = record_dump(model, ids, mask, decode_steps=2)
    streamed = record_dump(model, ids, mask, decode_steps=2, out=tmp_path / "d")
    assert streamed.folder == tmp_path / "d" and (tmp_path / "d" / MANIFEST).is_file()
    _same_dumps(streamed, in_memory)
    _same_dumps(read_dump(tmp_path / "d"), in_memory)


def test_a_streamed_dump_never_holds_its_tensors(tmp_path):
    """The traced peak of Python and NumPy allocations stays far below the dump's size (the in-memory
    dump holds it all): with 8 layers, one layer's temporaries are a small part of the whole."""
    import tracemalloc

    model = Qwen2ForCausalLM(Qwen2Config(**{**TINY, "num_hidden_layers": 8}), seed=0)
    ids = np.random.default_rng(0).integers(1, 48, (2, 64))
    tracemalloc.start()
    try:
        record_dump(model, ids, fingerprint=None)
        _, whole = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        dump = record_dump(model, ids, fingerprint=None, out=tmp_path / "d")
        _, streamed = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    size = sum(a.nbytes for a in dump.tensors.values())
    assert whole > size and streamed < size / 4, (whole, streamed, size)


def test_positions_keep_what_they_select(model):
    ids = [[5, 6, 7, 8, 9, 10], [0, 0, 3, 4, 5, 6]]
    mask = [[1] * 6, [0, 0, 1, 1, 1, 1]]
    full = record_dump(model, ids, mask, decode_steps=1)
    part = record_dump(model, ids, mask, decode_steps=1, positions="-3:-1")   # of the 6: the 4th and 5th
    assert part.passes[0]["positions"] == [3, 4] and part.manifest["options"]["positions"] == [3, 4]
    from qwen2np.inspection.names import position_axes

    for name in full.names():
        t_axis, _ = position_axes(name, full[name].ndim)
        expected = full[name] if t_axis is None else np.take(full[name], [3, 4], axis=t_axis)
        assert np.array_equal(part[name], expected), name
    assert np.array_equal(part["logits@1"], full["logits@1"])          # decode steps whole
    from qwen2np.golden.compare import compare_dumps

    with pytest.raises(DumpError, match="different forward passes"):   # other selections: not comparable
        compare_dumps(part, full)
    same = record_dump(model, ids, mask, decode_steps=1, positions=[4, -3])   # the same positions, spelt otherwise
    assert compare_dumps(part, same).ok
    perturbed = record_dump(model, ids, mask, decode_steps=1, positions="3:5")
    key = "model.layers.1.mlp.down_proj"
    perturbed.tensors[key] = perturbed[key] + np.float32(1e-2)
    assert compare_dumps(perturbed, part).first_failure.name == key


@pytest.mark.parametrize("bad", ["7", "a:b", [0, 99], "5:", [True]])
def test_bad_position_selections_are_refused(model, bad):
    with pytest.raises(DumpError, match="positions"):
        record_dump(model, [[1, 2, 3, 4, 5, 6]], decode_steps=1, positions=bad)


def test_dump_help_says_the_model_default():
    r = qwen2np_cli("dump", "--help")
    assert r.returncode == 0 and "(default: test)" in " ".join(r.stdout.split()), r.stdout
