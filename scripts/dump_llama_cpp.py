#!/usr/bin/env python
"""The llama.cpp side of a golden dump: the flags, names and format of `qwen2np dump`, from llama.cpp itself.

    python scripts/dump_llama_cpp.py --model FILE.gguf --prompt "..." --out DIR [--include GLOB ...]
        [--ids IDS] [--chat] [--decode-steps N] [--requantize F32|Q8_0] [--rope-freq-base X] [--threads N]

llama.cpp runs through llama-cpp-python 0.3.36 (`pip install 'qwen2np[oracle]'`, built with
CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF"), on the CPU, with flash attention off, an F32 KV
cache and the whole prefill in one batch; its `cb_eval` callback sees every node of the graph, and the
nodes that are qwen2np intermediates are copied out and laid out as qwen2np's
(qwen2np/golden/llama_cpp_names.py has the map). Each pass is one `llama_decode` call: the prefill,
then one call per decode step through llama.cpp's own KV cache. The token ids come from qwen2np's
tokenizer (the GGUF's own), so both sides run the same ids.

`--requantize F32` (or Q8_0) runs on the checkpoint converted by llama.cpp's own quantizer, made once
beside the cache (`$QWEN2NP_CACHE/derived/`): F32 holds exactly the dequantized weights of the file, so
qwen2np on the same file is the reference at float32 precision. `--rope-freq-base` overrides RoPE's θ
(llama.cpp's context parameter), to plant a change: the manifest's config records what ran.

The weights fingerprint is of the weights llama.cpp computes with: the file's tensors dequantized
(llama.cpp's dequantization and the gguf package's, which qwen2np uses, agree bit for bit on this
checkpoint: tests/golden/test_llama_cpp.py), so `qwen2np compare --isolate` can check it against a qwen2np
model of the same file. Only one sequence (B = 1): llama.cpp batches sequences its own way.
"""

import argparse
import ctypes
import fnmatch
import os
import sys
import time
from pathlib import Path

import numpy as np

import llama_cpp
import llama_cpp._logger
from qwen2np.cli.dump import FINGERPRINT_METHODS, add_arguments, include_patterns, inputs_from_args
from qwen2np.errors import DumpError, IntermediateNameError, Qwen2npError
from qwen2np.golden.dump import new_dump, plan_passes, write_dump
from qwen2np.golden.fingerprint import architecture, config_fingerprint, weight_digest
from qwen2np.golden.llama_cpp_names import forward_order, mask_name, mask_to_qwen2np, qwen2np_name, to_qwen2np

llama_cpp._logger.set_verbose(False)      # llama.cpp's load log would drown the command's output
REQUANTIZE = {"F32": llama_cpp.LLAMA_FTYPE_ALL_F32, "Q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0}
GGML_TYPE_F32 = 0


# -- ggml's tensor, as the callback sees it (ggml/include/ggml.h, llama-cpp-python 0.3.36) ------------


class GgmlTensor(ctypes.Structure):
    pass


GgmlTensor._fields_ = [
    ("type", ctypes.c_int), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * 4), ("nb", ctypes.c_size_t * 4),
    ("op", ctypes.c_int), ("op_params", ctypes.c_int32 * 16), ("flags", ctypes.c_int32),
    ("src", ctypes.POINTER(GgmlTensor) * 10), ("view_src", ctypes.POINTER(GgmlTensor)), ("view_offs", ctypes.c_size_t),
    ("data", ctypes.c_void_p), ("name", ctypes.c_char * 64), ("extra", ctypes.c_void_p), ("padding", ctypes.c_char * 8),
]


def ggml_library():
    """libggml-base of the installed llama-cpp-python: op names, contiguity, and reading a tensor's data."""
    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    lib.ggml_op_name.restype, lib.ggml_op_name.argtypes = ctypes.c_char_p, [ctypes.c_int]
    lib.ggml_is_contiguous.restype, lib.ggml_is_contiguous.argtypes = ctypes.c_bool, [ctypes.POINTER(GgmlTensor)]
    lib.ggml_nbytes.restype, lib.ggml_nbytes.argtypes = ctypes.c_size_t, [ctypes.POINTER(GgmlTensor)]
    lib.ggml_backend_tensor_get.restype = None
    lib.ggml_backend_tensor_get.argtypes = [ctypes.POINTER(GgmlTensor), ctypes.c_void_p, ctypes.c_size_t,
                                            ctypes.c_size_t]
    return lib


class Recorder:
    """The `cb_eval` callback: copies the graph nodes that are wanted qwen2np intermediates, pass by pass."""

    def __init__(self, patterns, num_layers, head_dim):
        self.lib = ggml_library()
        self.patterns = list(patterns)
        self.scale = head_dim ** -0.5
        self.passes = []          # one {name: array} per llama_decode call
        self.span = None          # (start, length) of the pass running
        self.error = None         # an exception raised inside the callback, re-raised after llama_decode
        known = forward_order(num_layers)
        for p in self.patterns:
            if not fnmatch.filter(known, p):
                raise IntermediateNameError(f"--include {p!r} matches no intermediate llama.cpp has; names look "
                                            f"like {known[3]!r}")
        self.callback = llama_cpp.ggml_backend_sched_eval_callback(self._visit)   # kept alive with self

    def wanted(self, name):
        return name is not None and any(fnmatch.fnmatchcase(name, p) for p in self.patterns)

    def new_pass(self, start, length):
        self.passes.append({})
        self.span = (start, length)

    def _visit(self, pointer, ask, user_data):
        try:
            t = ctypes.cast(pointer, ctypes.POINTER(GgmlTensor))
            node = t.contents
            weight = node.src[0].contents.name.decode() if node.src[0] else ""
            name = qwen2np_name(node.name.decode(), self.lib.ggml_op_name(node.op).decode(), weight)
            with_mask = name is not None and name.endswith(".probs") and self.wanted(mask_name(name))
            if ask:
                return self.wanted(name) or with_mask
            start, length = self.span
            if self.wanted(name):
                self.passes[-1][name] = to_qwen2np(name, self._values(t), list(node.ne), start + length, self.scale)
            if with_mask:   # the additive mask is a graph input: the softmax's second source
                self.passes[-1][mask_name(name)] = mask_to_qwen2np(self._values(node.src[1]), list(node.src[1].contents.ne),
                                                                   length, start + length)
            return True
        except Exception as e:   # an exception cannot cross into C: keep it for after llama_decode
            self.error = self.error or e
            return False

    def _values(self, t):
        """A float32 node's data, copied from its backend."""
        node = t.contents
        if node.type != GGML_TYPE_F32 or not self.lib.ggml_is_contiguous(t):
            raise DumpError(f"llama.cpp node {node.name.decode()!r}: expected a contiguous F32 tensor (type {node.type})")
        out = np.empty(int(np.prod(list(node.ne))), dtype=np.float32)
        self.lib.ggml_backend_tensor_get(t, out.ctypes.data, 0, out.nbytes)
        return out


# -- the checkpoint -------------------------------------------------------------------------------------


def requantized(source, kind, cache=None):
    """`source` converted by llama.cpp's quantizer to `kind` (F32 or Q8_0), made once into the cache."""
    from qwen2np.io.fetch import default_cache_dir

    folder = Path(cache or default_cache_dir()) / "derived"
    target = folder / f"{Path(source).stem}-{kind}.gguf"
    stamp = f"{Path(source).name} {Path(source).stat().st_size} llama-cpp-python {llama_cpp.__version__}"
    stamp_file = target.with_suffix(".source")
    if target.is_file() and stamp_file.is_file() and stamp_file.read_text() == stamp:
        return target
    folder.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread, params.ftype, params.allow_requantize = os.cpu_count() or 2, REQUANTIZE[kind], True
    try:
        if llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), params) != 0:
            raise DumpError(f"llama.cpp could not convert {source} to {kind}")
        os.replace(tmp, target)
        stamp_file.write_text(stamp)
    finally:
        if tmp.exists():
            tmp.unlink()
    return target


def gguf_description(path, method, rope_theta=None):
    """The manifest's "model" object for a GGUF as llama.cpp runs it: config (θ as overridden), file type,
    and the fingerprint of the dequantized weights, hashed one tensor at a time (no model in memory).

    The tensors are dequantized by the gguf package, as qwen2np's GGUF reader does (qwen2np/io/gguf_file.py).
    """
    import hashlib

    import gguf

    from qwen2np import Qwen2Config
    from qwen2np.io.gguf_file import gguf_config
    from qwen2np.io.gguf_header import read_gguf_header
    from qwen2np.io.gguf_names import hf_name

    config = Qwen2Config.from_dict(gguf_config(read_gguf_header(path)))
    if rope_theta is not None:
        config.rope_parameters = {**config.rope_parameters, "rope_theta": float(rope_theta)}
    reader = gguf.GGUFReader(path)
    weights = None
    if method is not None:
        digests, shapes = {}, {}
        for tensor in reader.tensors:
            shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))     # ggml ne -> NumPy order
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(shape)
            name = hf_name(tensor.name)
            digests[name], shapes[name] = weight_digest(values, method), shape
        if "lm_head.weight" not in digests:   # tied: the model's state_dict has lm_head = the embedding
            digests["lm_head.weight"] = digests["model.embed_tokens.weight"]
            shapes["lm_head.weight"] = shapes["model.embed_tokens.weight"]
        lines = "".join(f"{n} {'x'.join(map(str, shapes[n]))} {digests[n]}\n" for n in sorted(digests))
        weights = {"method": method, "digest": hashlib.sha256(lines.encode()).hexdigest(), "tensors": digests}
    field = reader.fields.get("general.file_type")
    file_type = None
    if field is not None:
        value = int(field.parts[field.data[0]][0])
        try:
            file_type = gguf.LlamaFileType(value).name.replace("MOSTLY_", "").replace("ALL_", "")
        except ValueError:
            file_type = str(value)
    return config, {"path": str(path), "class": "Qwen2ForCausalLM", "config": architecture(config),
                    "config_fingerprint": config_fingerprint(config), "weights_fingerprint": weights,
                    "file_type": file_type}


# -- the dump -------------------------------------------------------------------------------------------


def record_dump(path, input_ids, include=("*",), decode_steps=0, prompt=None, chat=False,
                fingerprint="sha256-f32", rope_theta=None, threads=None):
    """Run llama.cpp on `path` over `input_ids` [1, N] and dump the intermediates matching `include`."""
    ids = np.asarray(input_ids, dtype=np.int64)
    if ids.ndim != 2 or ids.shape[0] != 1:
        raise DumpError(f"llama.cpp dumps take one sequence (input_ids [1, N]), found shape {list(ids.shape)}: "
                        f"dump each prompt on its own")
    plan = plan_passes(ids.shape[1], decode_steps)
    config, description = gguf_description(path, fingerprint, rope_theta)
    recorder = Recorder(include, config.num_hidden_layers, config.head_dim)

    llama_cpp.llama_backend_init()
    model_params = llama_cpp.llama_model_default_params()
    model_params.n_gpu_layers = 0
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), model_params)
    if not model:
        raise DumpError(f"{path}: llama.cpp could not load it")
    N = ids.shape[1]
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = 256 * -(-N // 256)                   # whole cells of 256: llama.cpp pads the KV view so
    params.n_batch = params.n_ubatch = plan[0][1]       # the prefill in one graph
    params.n_seq_max = 1
    params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED    # kq, kq_soft_max exist only without it
    params.type_k = params.type_v = GGML_TYPE_F32
    params.n_threads = params.n_threads_batch = threads or os.cpu_count() or 2
    params.rope_freq_base = 0.0 if rope_theta is None else float(rope_theta)
    params.no_perf = True
    params.cb_eval = recorder.callback
    context = llama_cpp.llama_init_from_model(model, params)
    try:
        if not context:
            raise DumpError(f"{path}: llama.cpp could not make a context")
        for start, length in plan:
            batch = llama_cpp.llama_batch_init(length, 0, 1)
            try:
                for i in range(length):
                    batch.token[i], batch.pos[i], batch.n_seq_id[i] = int(ids[0, start + i]), start + i, 1
                    batch.seq_id[i][0], batch.logits[i] = 0, 1    # every position's logits, as qwen2np's
                batch.n_tokens = length
                recorder.new_pass(start, length)
                status = llama_cpp.llama_decode(context, batch)
            finally:
                llama_cpp.llama_batch_free(batch)
            if recorder.error is not None:
                raise recorder.error
            if status != 0:
                raise DumpError(f"llama_decode returned {status} for positions {start}..{start + length - 1}")
    finally:
        if context:
            llama_cpp.llama_free(context)
        llama_cpp.llama_model_free(model)

    order = {n: i for i, n in enumerate(forward_order(config.num_hidden_layers))}
    passes = [{"start": s, "length": n, "tensors": sorted(recorder.passes[i].items(), key=lambda kv: order[kv[0]])}
              for i, (s, n) in enumerate(plan)]
    import qwen2np

    versions = {"llama-cpp-python": llama_cpp.__version__, "qwen2np": qwen2np.__version__, "numpy": np.__version__}
    options = {"include": list(include), "decode_steps": decode_steps, "backend": "llama.cpp (CPU)",
               "flash_attn": False, "kv_cache": "F32", "n_threads": params.n_threads}
    if rope_theta is not None:
        options["rope_freq_base"] = float(rope_theta)
    return new_dump(producer=f"llama.cpp (llama-cpp-python {llama_cpp.__version__}, scripts/dump_llama_cpp.py)",
                    versions=versions, dtype="float32", input_ids=ids, prompt=prompt, chat=chat, passes=passes,
                    model=description, options=options)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="dump_llama_cpp.py", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    dtype_flag = next(a for a in parser._actions if a.dest == "dtype")
    dtype_flag.choices, dtype_flag.help = ["float32"], "llama.cpp computes in float32 (on the file's weights)"
    parser.add_argument("--requantize", choices=list(REQUANTIZE),
                        help="run on the file converted by llama.cpp's quantizer (made once in $QWEN2NP_CACHE/derived)")
    parser.add_argument("--rope-freq-base", type=float, metavar="THETA", help="override RoPE's θ (plants a change)")
    parser.add_argument("--threads", type=int, metavar="N", help="llama.cpp's threads (default: every core)")
    args = parser.parse_args(argv)
    try:
        from qwen2np import Qwen2Tokenizer
        from qwen2np.io.hub import resolve_model_path

        path = Path(resolve_model_path(args.model))
        if path.suffix != ".gguf":
            raise DumpError(f"--model {args.model}: llama.cpp runs GGUF files, not {path}")
        ids, mask, prompt = inputs_from_args(
            args, lambda: Qwen2Tokenizer.from_pretrained(resolve_model_path(args.tokenizer or path)))
        if mask is not None and not mask.all():
            raise DumpError("llama.cpp dumps take one sequence without padding: dump each prompt on its own")
        plan_passes(ids.shape[1], args.decode_steps)
        started = time.perf_counter()
        if args.requantize:
            path = requantized(path, args.requantize)
        dump = record_dump(path, ids, include_patterns(args), args.decode_steps, prompt, args.chat,
                           FINGERPRINT_METHODS[args.fingerprint], args.rope_freq_base, args.threads)
        folder = write_dump(dump, args.out, overwrite=args.overwrite)
    except Qwen2npError as e:
        print(f"dump_llama_cpp.py: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {len(dump.tensors)} tensors of {len(dump.passes)} forward pass(es) to {folder} "
          f"in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
