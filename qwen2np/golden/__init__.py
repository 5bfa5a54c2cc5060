"""Golden values: dumps of named intermediate tensors, their comparison and isolation, and model fingerprints.

* dump.py: the dump format (manifest.json + tensors.safetensors) — `new_dump`, `write_dump`, `read_dump`.
* record.py: run a qwen2np model under a trace and make a dump — `record_dump`.
* compare.py: compare two dumps tensor by tensor, name the first divergence — `compare_dumps`.
* isolate.py: recompute each operation of a dump from its own inputs, name every root cause — `isolate_dump`.
* recipes.py: those operations, a second implementation in plain NumPy that shares no code with the model
  it checks; rotary.py its RoPE tables, rounding.py its half-precision rounding.
* metrics.py: how far one array is from another (rel, NMSE, cosine, ulps, logits' KL and top-k), for both.
* report.py: the text and JSON reports of a comparison and of an isolation — `format_report`, `format_isolation`.
* policies.py, tolerances.py: what a correct implementation of each precision may reach (docs/tolerances.md).
* fingerprint.py: sha256 fingerprints of a config and of the weights.
* llama_cpp_names.py: llama.cpp's graph nodes as qwen2np's intermediates (scripts/dump_llama_cpp.py).

docs/dump-format.md specifies the format; docs/inspection.md shows the whole workflow.
"""
