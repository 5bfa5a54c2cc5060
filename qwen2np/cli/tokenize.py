"""`qwen2np tokenize "text" [--model PATH]`: show how the tokenizer cuts a text.

    $ qwen2np tokenize "Hello world"
    |Hello|·world|
    2 tokens, 11 characters, 11 bytes
      id  token   text
    9707  Hello   Hello
    1879  Ġworld  ·world

In the table, spaces show as ``·``, newlines as ``↵``, tabs as ``→`` and other control characters as
``\\xNN``; a token that is only part of a character (an emoji's first bytes) decodes to ``�``.
"""

from ..tokenizer import Qwen2Tokenizer
from ..tokenizer.tokenizer import load_bundled
from . import check_text

HELP = "show how the tokenizer splits a text: pieces and ids"

_VISIBLE = {" ": "·", "\n": "↵", "\t": "→", "\r": "␍"}


def visible(text):
    """Make whitespace and control characters visible.

    >>> visible(" a\\nb\\t\\x01")
    '·a↵b→\\\\x01'
    """
    out = []
    for ch in text:
        if ch in _VISIBLE:
            out.append(_VISIBLE[ch])
        elif ord(ch) < 32 or 0x7F <= ord(ch) < 0xA0:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return "".join(out)


def add_arguments(parser):
    parser.add_argument("text", help="the text to tokenize (use $'a\\nb' in bash for newlines)")
    parser.add_argument("--model", metavar="PATH", default=None,
                        help="a tokenizer folder, a tokenizer.json or a .gguf file (default: the bundled Qwen2.5 tokenizer)")
    parser.add_argument("--split-special-tokens", action="store_true",
                        help="tokenize special tokens such as <|im_end|> as ordinary text")
    parser.add_argument("--ids-only", action="store_true", help="print only the ids, separated by spaces")


def render(tok, text, split_special_tokens=False):
    """The lines printed for `text`: the pieces with | between them, a summary, and the table.

    >>> from qwen2np.tokenizer.tokenizer import load_bundled
    >>> print("\\n".join(render(load_bundled(), "Hi!\\n")))
    |Hi|!↵|
    2 tokens, 4 characters, 4 bytes
       id  token  text
    13048  Hi     Hi
     4894  !Ċ     !↵
    """
    ids = tok(text, split_special_tokens=split_special_tokens)["input_ids"]
    pieces = [tok.decode([i]) for i in ids]
    tokens = [tok.convert_ids_to_tokens(i) for i in ids]
    lines = ["|" + "|".join(visible(p) for p in pieces) + "|",
             f"{len(ids)} tokens, {len(text)} characters, {len(text.encode('utf-8', 'surrogatepass'))} bytes"]
    w_id = max([len(str(i)) for i in ids] + [3])
    w_tok = max([len(t) for t in tokens] + [5])
    lines.append(f"{'id':>{w_id}}  {'token':<{w_tok}}  text")
    for i, t, p in zip(ids, tokens, pieces):
        lines.append(f"{i:>{w_id}}  {t:<{w_tok}}  {visible(p)}")
    return lines


def run(args):
    check_text(args.text, "TEXT")
    tok = load_bundled() if args.model is None else Qwen2Tokenizer.from_pretrained(args.model)
    if args.ids_only:
        print(" ".join(map(str, tok(args.text, split_special_tokens=args.split_special_tokens)["input_ids"])))
        return 0
    print("\n".join(render(tok, args.text, args.split_special_tokens)))
    return 0
