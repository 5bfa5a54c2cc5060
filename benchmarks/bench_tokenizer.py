"""Encode throughput of qwen2np's tokenizer and of the Rust `tokenizers` (through transformers 5.24),
on the same ~2 MB mixed corpus in the same process. Prints one JSON object.

    python benchmarks/bench_tokenizer.py [--rounds 3] [--target-mb 2.0]

The corpus is built deterministically from files every machine of this kind has:

* code: the Python standard library's own sources (sorted, first files until the quota is met);
* English: the msgid (English) strings of the gettext catalogs in /usr/share/locale, and the licence
  texts in /usr/share/common-licenses;
* 25 other languages: the msgstr (translated) strings of those catalogs, the same quota per language.

It is cut into documents of about 4 KB at line ends, and every tokenizer encodes them one string at a
time with no special tokens added. qwen2np "cold" is a new tokenizer with an empty piece cache (the
parsed vocabulary/merges tables are reused, that is load time, measured separately); "warm" is a second
pass of the same tokenizer. Rust runs single-threaded (TOKENIZERS_PARALLELISM=false, RAYON_NUM_THREADS=1).
Each figure is the median over --rounds rounds, run interleaved so machine load hits both alike.
"""

import argparse
import gettext
import glob
import hashlib
import json
import os
import statistics
import sys
import sysconfig
import time

os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["RAYON_NUM_THREADS"] = "1"

LANGUAGES = ["zh_CN", "ja", "ko", "ru", "uk", "ar", "he", "fa", "hi", "bn", "ta", "th", "vi", "el", "tr",
             "de", "fr", "es", "pt", "it", "pl", "cs", "hu", "id", "sv"]
DOC_BYTES = 4096


def _catalog_strings(lang):
    """(msgids, msgstrs) of the gettext catalogs of `lang`, in sorted file and key order."""
    ids, strs = [], []
    for mo in sorted(glob.glob(f"/usr/share/locale/{lang}/LC_MESSAGES/*.mo")):
        try:
            with open(mo, "rb") as f:
                catalog = gettext.GNUTranslations(f)._catalog
        except Exception:  # a catalog that the gettext module cannot parse: skip it
            continue
        for key in sorted(k for k in catalog if isinstance(k, str) and k):
            value = catalog[key]
            if isinstance(value, str) and value:
                ids.append(key)
                strs.append(value)
    return ids, strs


def _take(strings, quota):
    out, size = [], 0
    for s in strings:
        if size >= quota:
            break
        out.append(s)
        size += len(s.encode("utf-8")) + 1
    return "\n".join(out)


def build_corpus(target_mb):
    """The corpus as a list of documents, and what it is made of."""
    target = int(target_mb * 1_000_000)
    parts = {}
    stdlib = sysconfig.get_paths()["stdlib"]
    sources = []
    for path in sorted(glob.glob(os.path.join(stdlib, "*.py"))):
        with open(path, encoding="utf-8", errors="replace") as f:
            sources.append(f.read())
    parts["code"] = _take(sources, target * 30 // 100)
    english = []
    per_language = (target * 45 // 100) // len(LANGUAGES)
    have = []
    for lang in LANGUAGES:
        ids, strs = _catalog_strings(lang)
        if strs:
            parts[lang] = _take(strs, per_language)
            english.extend(ids[: len(strs) // 3])
            have.append(lang)
    for path in sorted(glob.glob("/usr/share/common-licenses/*")):
        if os.path.isfile(path):
            with open(path, encoding="utf-8", errors="replace") as f:
                english.append(f.read())
    parts["english"] = _take(english, target * 25 // 100)
    docs = []
    for text in parts.values():
        doc = []
        size = 0
        for line in text.splitlines(keepends=True):
            doc.append(line)
            size += len(line.encode("utf-8"))
            if size >= DOC_BYTES:
                docs.append("".join(doc))
                doc, size = [], 0
        if doc:
            docs.append("".join(doc))
    info = {name: len(text.encode("utf-8")) for name, text in parts.items()}
    return docs, info, have


def timed(fn, cpu=None):
    """(wall seconds, result); with a list `cpu`, also append the process CPU seconds to it."""
    t0, c0 = time.perf_counter(), time.process_time()
    result = fn()
    if cpu is not None:
        cpu.append(time.process_time() - c0)
    return time.perf_counter() - t0, result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--target-mb", type=float, default=2.0)
    args = parser.parse_args()

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from qwen2np.tokenizer import Qwen2Tokenizer
    from qwen2np.tokenizer.bpe import bpe_long
    from qwen2np.tokenizer.loading import bundled_tokenizer_dir

    docs, parts, languages = build_corpus(args.target_mb)
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    digest = hashlib.sha256("\x00".join(docs).encode("utf-8")).hexdigest()[:16]

    load_qwen2np, _ = timed(Qwen2Tokenizer.from_pretrained)
    import transformers

    transformers.logging.set_verbosity_error()
    load_rust, rust = timed(lambda: transformers.Qwen2Tokenizer.from_pretrained(bundled_tokenizer_dir()))

    names = ("qwen2np_cold", "qwen2np_warm", "rust_cold", "rust_warm")
    figures = {k: [] for k in names}  # wall-clock seconds per round
    cpu = {k: [] for k in names}  # process CPU seconds per round (less sensitive to other jobs)
    identical = True
    for _ in range(args.rounds):
        rust = transformers.Qwen2Tokenizer.from_pretrained(bundled_tokenizer_dir())
        t, want = timed(lambda: [rust.encode(d, add_special_tokens=False) for d in docs], cpu["rust_cold"])
        figures["rust_cold"].append(t)
        figures["rust_warm"].append(
            timed(lambda: [rust.encode(d, add_special_tokens=False) for d in docs], cpu["rust_warm"])[0])
        tok = Qwen2Tokenizer.from_pretrained()
        t, got = timed(lambda: [tok.encode(d, add_special_tokens=False) for d in docs], cpu["qwen2np_cold"])
        figures["qwen2np_cold"].append(t)
        figures["qwen2np_warm"].append(
            timed(lambda: [tok.encode(d, add_special_tokens=False) for d in docs], cpu["qwen2np_warm"])[0])
        identical = identical and got == want

    import numpy as np

    piece = "".join(np.random.default_rng(0).choice(np.array(list("abcdefghijklmnopqrstuvwxyz")), 100_000))
    tok = Qwen2Tokenizer.from_pretrained()
    ids = list(map(tok._byte_ids.__getitem__, piece.encode("utf-8")))
    bpe_seconds, _ = timed(lambda: bpe_long(ids, tok._merge_table))
    encode_seconds, long_ids = timed(lambda: Qwen2Tokenizer.from_pretrained().encode(piece))
    long_identical = long_ids == rust.encode(piece, add_special_tokens=False)

    mbps = {k: round(n_bytes / statistics.median(v) / 1e6, 3) for k, v in figures.items()}
    mbps_cpu = {k: round(n_bytes / statistics.median(v) / 1e6, 3) for k, v in cpu.items()}
    print(json.dumps({
        "corpus": {"bytes": n_bytes, "documents": len(docs), "sha256_16": digest, "bytes_by_part": parts,
                   "languages": len(languages)},
        "encode_MB_per_s": mbps,
        "encode_MB_per_cpu_s": mbps_cpu,
        "ratio_qwen2np_cold_over_rust_cold": round(mbps["qwen2np_cold"] / mbps["rust_cold"], 3),
        "ratio_qwen2np_warm_over_rust_warm": round(mbps["qwen2np_warm"] / mbps["rust_warm"], 3),
        "ratio_cpu_qwen2np_cold_over_rust_cold": round(mbps_cpu["qwen2np_cold"] / mbps_cpu["rust_cold"], 3),
        "identical_ids": identical,
        "piece_100k_no_spaces": {"bpe_seconds": round(bpe_seconds, 3), "encode_seconds": round(encode_seconds, 3),
                                 "tokens": len(long_ids), "identical_to_rust": long_identical},
        "load_seconds": {"qwen2np": round(load_qwen2np, 3), "rust_via_transformers": round(load_rust, 3)},
        "rounds": args.rounds,
        "seconds_per_round": {k: [round(x, 3) for x in v] for k, v in figures.items()},
    }, indent=2))


if __name__ == "__main__":
    main()
