"""Golden values: dumps of named intermediate tensors, their comparison, and model fingerprints.

* dump.py: the dump format (manifest.json + tensors.safetensors) — `new_dump`, `write_dump`, `read_dump`.
* record.py: run a qwen2np model under a trace and make a dump — `record_dump`.
* compare.py: compare two dumps tensor by tensor, name the first divergence — `compare_dumps`.
* tolerances.py: the tolerance policy per dtype and tensor kind (docs/tolerances.md).
* fingerprint.py: sha256 fingerprints of a config and of the weights.

docs/dump-format.md specifies the format; docs/inspection.md shows the whole workflow.
"""
