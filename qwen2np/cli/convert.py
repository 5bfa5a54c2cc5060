"""`qwen2np convert model.gguf OUTDIR [--dtype float32|bfloat16|float16] [--overwrite]`: a GGUF file as a
Hugging Face folder.

Writes the folder OUTDIR whole (qwen2np/io/folders.py): every file goes into a temporary sibling that
then replaces OUTDIR, so an old tokenizer.json or chat_template.jinja never survives beside the new
model (it would take precedence over the new tokenizer files), and a failure or Ctrl-C leaves OUTDIR
as it was. An OUTDIR that holds files is refused unless `--overwrite`. OUTDIR gets:

* config.json: the config transformers 5.24 derives from the GGUF metadata, with
  `architectures: ["Qwen2ForCausalLM"]` and the dtype written;
* model.safetensors: every tensor dequantized (float32, or rounded to bfloat16/float16);
* generation_config.json: only what the GGUF states (bos, eos, pad ids). subtle: the original
  Qwen2.5 instruct checkpoints ship eos [151645, 151643], pad 151643 and sampling defaults
  (temperature 0.7, top_p 0.8, top_k 20, repetition_penalty 1.05/1.1); a GGUF does not carry them,
  so they are not invented here;
* vocab.json, merges.txt, tokenizer_config.json (with the chat template): the GGUF's tokenizer.

transformers 5.24 and qwen2np both load the result; a float32 model.safetensors loads memory-mapped.
"""

import sys
from pathlib import Path

from ..errors import CheckpointError
from ..io.folders import check_target, write_folder
from ..io.gguf_header import read_gguf_header
from ..io.hf_folder import write_hf_files
from ..tokenizer.gguf import gguf_tokenizer_kwargs, write_tokenizer_files
from ..weights.store import load_checkpoint
from .progress import ProgressBar

HELP = "convert a GGUF file into a Hugging Face folder"


def add_arguments(parser):
    parser.add_argument("gguf", metavar="model.gguf", help="the GGUF file (architecture qwen2)")
    parser.add_argument("outdir", metavar="OUTDIR", help="the folder to write (created if needed; refused if it "
                                                          "holds files, unless --overwrite)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                        help="dtype of the weights written (default float32, exact)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace OUTDIR whole if it holds files, once the new folder is written")


def run(args):
    gguf = Path(args.gguf)
    if not gguf.is_file():  # a FIFO would block the read for ever
        what = "no such file" if not gguf.exists() else "a folder" if gguf.is_dir() else "not a regular file"
        raise CheckpointError(f"{gguf}: expected a GGUF file, found {what}")
    outdir = Path(args.outdir)
    check_target(outdir, args.overwrite)  # refuse a folder that holds files before the slow part
    header = read_gguf_header(args.gguf, string_arrays=("tokenizer.ggml.tokens", "tokenizer.ggml.merges"))
    tokenizer = gguf_tokenizer_kwargs(args.gguf, header=header)  # checked before the slow part
    checkpoint = load_checkpoint(args.gguf, "float32", progress=ProgressBar(unit="bytes"))
    config = {**checkpoint.config, "architectures": ["Qwen2ForCausalLM"]}
    print(f"writing {outdir / 'model.safetensors'} ({args.dtype})", file=sys.stderr)
    with write_folder(outdir, overwrite=args.overwrite) as tmp:
        write_hf_files(tmp, config, checkpoint.tensors, generation_config=checkpoint.generation_config,
                       dtype=args.dtype)
        write_tokenizer_files(tmp, tokenizer)
    print(f"wrote {outdir}: {len(checkpoint.tensors)} tensors and the tokenizer", file=sys.stderr)
    return 0
