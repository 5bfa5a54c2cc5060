"""`qwen2np convert model.gguf OUTDIR [--dtype float32|bfloat16|float16]`: a GGUF file as a Hugging Face folder.

Writes into OUTDIR:

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

HELP = "convert a GGUF file into a Hugging Face folder"


def add_arguments(parser):
    parser.add_argument("gguf", metavar="model.gguf", help="the GGUF file (architecture qwen2)")
    parser.add_argument("outdir", metavar="OUTDIR", help="the folder to write (created if needed)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                        help="dtype of the weights written (default float32, exact)")


def run(args):
    from pathlib import Path

    from ..io.gguf_file import load_gguf
    from ..io.gguf_header import read_gguf_header
    from ..io.gguf_tokenizer import gguf_tokenizer_kwargs, write_tokenizer_files
    from ..io.hf_folder import save_hf_folder
    from ..progress import ProgressBar

    outdir = Path(args.outdir)
    header = read_gguf_header(args.gguf, string_arrays=("tokenizer.ggml.tokens", "tokenizer.ggml.merges"))
    tokenizer = gguf_tokenizer_kwargs(args.gguf, header=header)  # checked before the slow part
    checkpoint = load_gguf(args.gguf, "float32", progress=ProgressBar(unit="bytes"))
    config = {**checkpoint.config, "architectures": ["Qwen2ForCausalLM"]}
    print(f"writing {outdir / 'model.safetensors'} ({args.dtype})", file=sys.stderr)
    save_hf_folder(outdir, config, checkpoint.tensors, generation_config=checkpoint.generation_config,
                   dtype=args.dtype)
    write_tokenizer_files(outdir, tokenizer)
    print(f"wrote {outdir}: {len(checkpoint.tensors)} tensors and the tokenizer", file=sys.stderr)
    return 0
