"""Chat templates render exactly as transformers 5.24 renders them, and the sandbox holds.

The oracle is transformers' own Qwen2Tokenizer loaded from the same files as qwen2np's bundled tokenizer
(vocab.json, merges.txt, tokenizer_config.json), given the same template.
"""

import json
from pathlib import Path

import numpy as np
import pytest

import qwen2np
from qwen2np.chat.template import apply_chat_template, get_json_schema
from qwen2np.errors import ChatTemplateError

# The Qwen2-Instruct template (Qwen2-0.5B/1.5B/7B/72B-Instruct tokenizer_config.json): one line, a default
# system prompt, no tool support.
QWEN2_INSTRUCT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Weather now in a city",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "description": "the city, e.g. Zürich"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["city"]}}},
    {"type": "function", "function": {"name": "now", "description": "The time", "parameters": {
        "type": "object", "properties": {}}}},
]

CONVERSATIONS = {
    "user only": [{"role": "user", "content": "Write a haiku about NumPy."}],
    "system": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}],
    "several turns": [
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Bonjour !"},
        {"role": "user", "content": "How are you?\n\nReally?"},
        {"role": "assistant", "content": "Très bien."},
        {"role": "user", "content": "  spaces  "},
    ],
    "non-ascii": [{"role": "user", "content": "你好，世界 🌍 — naïve café ½ \u200b"},
                  {"role": "assistant", "content": "こんにちは 👋🏽"}],
    "tool calls": [
        {"role": "user", "content": "Weather in Zürich and Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}},
            {"type": "function", "function": {"name": "get_weather",
                                              "arguments": {"city": "Paris", "unit": "celsius"}}}]},
        {"role": "tool", "name": "get_weather", "content": "{\"temp\": 21}"},
        {"role": "tool", "name": "get_weather", "content": "18 °C"},
        {"role": "assistant", "content": "Zürich 21 °C, Paris 18 °C."},
        {"role": "user", "content": "Thanks"},
    ],
    "tool call with content": [
        {"role": "system", "content": "Use tools."},
        {"role": "user", "content": "Time?"},
        {"role": "assistant", "content": "Let me check.", "tool_calls": [
            {"name": "now", "arguments": {}}]},
        {"role": "tool", "content": "12:00"},
    ],
    "continue": [{"role": "user", "content": "Count to three"}, {"role": "assistant", "content": "One, two,"}],
}


@pytest.fixture(scope="module")
def ours():
    return qwen2np.Qwen2Tokenizer.from_pretrained()


@pytest.fixture(scope="module")
def theirs(oracle, ours, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    ours.save_pretrained(folder)  # the same vocab, merges, added tokens and template
    return oracle.AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module", params=["qwen2-instruct", "qwen2.5"])
def template(request, ours):
    return QWEN2_INSTRUCT_TEMPLATE if request.param == "qwen2-instruct" else ours.chat_template


@pytest.mark.slow
@pytest.mark.checkpoint
def test_bundled_template_is_the_gguf_one(ours, test_gguf):
    import gguf  # the gguf extra: installed with the oracle
    reader = gguf.GGUFReader(str(test_gguf))
    field = reader.fields["tokenizer.chat_template"]
    assert bytes(field.parts[field.data[0]]).decode("utf-8") == ours.chat_template


@pytest.mark.oracle
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("with_tools", [False, True])
def test_rendering_matches_transformers(ours, theirs, template, name, add_generation_prompt, with_tools):
    conv = CONVERSATIONS[name]
    kw = dict(chat_template=template, add_generation_prompt=add_generation_prompt,
              tools=TOOLS if with_tools else None)
    want = theirs.apply_chat_template(conv, tokenize=False, **kw)
    got = ours.apply_chat_template(conv, tokenize=False, **kw)
    assert got == want
    want_ids = theirs.apply_chat_template(conv, **kw)
    got_ids = ours.apply_chat_template(conv, **kw)
    assert list(got_ids["input_ids"]) == list(want_ids["input_ids"])
    assert list(got_ids["attention_mask"]) == list(want_ids["attention_mask"])
    assert ours.apply_chat_template(conv, return_dict=False, **kw) == want_ids["input_ids"]


@pytest.mark.oracle
def test_continue_final_message_matches(ours, theirs, template):
    conv = CONVERSATIONS["continue"]
    want = theirs.apply_chat_template(conv, tokenize=False, continue_final_message=True, chat_template=template)
    got = ours.apply_chat_template(conv, tokenize=False, continue_final_message=True, chat_template=template)
    assert got == want and got.endswith("One, two,")
    with pytest.raises(ChatTemplateError, match="not compatible"):
        ours.apply_chat_template(conv, continue_final_message=True, add_generation_prompt=True)


@pytest.mark.oracle
def test_batched_conversations_match(ours, theirs, template):
    batch = [CONVERSATIONS["system"], CONVERSATIONS["non-ascii"], CONVERSATIONS["user only"]]
    kw = dict(chat_template=template, add_generation_prompt=True)
    assert ours.apply_chat_template(batch, tokenize=False, **kw) == theirs.apply_chat_template(
        batch, tokenize=False, **kw)
    want = theirs.apply_chat_template(batch, padding=True, **kw)
    got = ours.apply_chat_template(batch, padding=True, return_tensors="np", **kw)
    assert isinstance(got["input_ids"], np.ndarray)
    assert got["input_ids"].tolist() == want["input_ids"]
    assert got["attention_mask"].tolist() == want["attention_mask"]


@pytest.mark.oracle
def test_python_function_tools_match(oracle, ours, theirs):
    from transformers.utils import get_json_schema as hf_get_json_schema

    def get_weather(city: str, unit: str = "celsius", days: list[int] | None = None) -> dict:
        """
        Get the weather forecast.

        Args:
            city: The city, e.g. Zürich
            unit: The unit (choices: ["celsius", "fahrenheit"])
            days: Which days ahead,
                counted from today

        Returns:
            The forecast
        """

    assert get_json_schema(get_weather) == hf_get_json_schema(get_weather)
    conv = CONVERSATIONS["user only"]
    assert ours.apply_chat_template(conv, tools=[get_weather], tokenize=False) == theirs.apply_chat_template(
        conv, tools=[get_weather], tokenize=False)


@pytest.mark.oracle
def test_documents_and_extra_context_match(ours, theirs):
    template = ("{% for d in documents %}[{{ d.title }}] {{ d.text }}\n{% endfor %}{{ eos_token }}|{{ pad_token }}|"
                "{{ who }}|{{ {'b': 1, 'a': 'é'} | tojson(sort_keys=True) }}|{{ 3 | tojson(indent=2) }}"
                "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.content }}{% endfor %}")
    docs = [{"title": "A", "text": "<b>&'x'</b>"}, {"title": "Ω", "text": "ü"}]
    kw = dict(chat_template=template, documents=docs, who="Zoë", tokenize=False)
    conv = CONVERSATIONS["several turns"]
    assert ours.apply_chat_template(conv, **kw) == theirs.apply_chat_template(conv, **kw)


def test_sandbox_blocks_python_internals(ours):
    conv = CONVERSATIONS["user only"]
    escapes = [
        "{{ ''.__class__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ messages.__class__ }}",
        "{{ raise_exception.__globals__ }}",
        "{% set ns = namespace(__init__=1) %}",
        "{% set ns = namespace() %}{% set ns._secret = 1 %}",
        "{{ messages.append(1) }}",
    ]
    for template in escapes:
        with pytest.raises(ChatTemplateError) as info:
            ours.apply_chat_template(conv, chat_template=template, tokenize=False)
        assert type(info.value.__cause__).__name__ == "SecurityError", template
    assert ours.apply_chat_template(conv, tokenize=False) == ours.apply_chat_template(conv, tokenize=False)


def test_template_errors_are_chat_template_errors(ours):
    conv = CONVERSATIONS["user only"]
    with pytest.raises(ChatTemplateError, match="raised an error: no tools here"):
        ours.apply_chat_template(conv, chat_template="{{ raise_exception('no tools here') }}", tokenize=False)
    with pytest.raises(ChatTemplateError, match="syntax error at line 1"):
        ours.apply_chat_template(conv, chat_template="{% for %}", tokenize=False)
    with pytest.raises(ChatTemplateError, match="empty conversation"):
        ours.apply_chat_template([], tokenize=False)
    with pytest.raises(ChatTemplateError, match="message 0"):
        ours.apply_chat_template(["hello"], tokenize=False)
    with pytest.raises(ChatTemplateError, match="strings"):  # content concatenated with + must be a str
        ours.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                                 chat_template=QWEN2_INSTRUCT_TEMPLATE, tokenize=False)


def test_missing_and_named_templates():
    class Tok:
        special_tokens_map = {"eos_token": "</s>"}
        chat_template = None

    with pytest.raises(ChatTemplateError, match="no chat template"):
        apply_chat_template(Tok(), CONVERSATIONS["user only"], tokenize=False)
    Tok.chat_template = {"default": "D{{ eos_token }}", "tool_use": "T{{ tools | length }}"}
    conv = CONVERSATIONS["user only"]
    assert apply_chat_template(Tok(), conv, tokenize=False) == "D</s>"
    assert apply_chat_template(Tok(), conv, tools=TOOLS, tokenize=False) == "T2"
    assert apply_chat_template(Tok(), conv, chat_template="default", tools=TOOLS, tokenize=False) == "D</s>"
    Tok.chat_template = {"a": "A", "b": "B"}
    with pytest.raises(ChatTemplateError, match=r"\['a', 'b'\]"):
        apply_chat_template(Tok(), conv, tokenize=False)
    assert apply_chat_template(Tok(), conv, chat_template="b", tokenize=False) == "B"


def test_strftime_now_and_none_values_dropped():
    class Tok:
        special_tokens_map = {}
        chat_template = "{{ strftime_now('%Y') | length }}|{{ messages[0].content is defined }}"

    # a None content is dropped (OpenAI-style messages), so the template sees it undefined
    assert apply_chat_template(Tok(), [{"role": "assistant", "content": None}], tokenize=False) == "4|False"


def test_saved_template_round_trip_through_json(ours, tmp_path):
    ours.save_pretrained(tmp_path)
    config = json.loads(Path(tmp_path, "tokenizer_config.json").read_text(encoding="utf-8"))
    template = config.get("chat_template")
    if template is None:  # newer layout: chat_template.jinja beside the config
        template = Path(tmp_path, "chat_template.jinja").read_text(encoding="utf-8")
    assert template == ours.chat_template


# -- bounded rendering, and messages checked before it -----------------------------------------------------

# Most of what jinja2 templates do, to show that the checks woven into loops, output, calls, operators and
# filters change nothing a real template renders (compared with transformers below)
FEATURES_TEMPLATE = """
{%- macro show(m, sep) -%}{{ m.role | upper }}{{ sep }}{{ caller() if caller else '' }}{%- endmacro -%}
{%- set ns = namespace(count=0, text='') -%}
{%- for m in messages -%}
  {%- set ns.count = ns.count + 1 -%}{%- set ns.text = ns.text ~ m.role[0] -%}
  {{ loop.index }}/{{ loop.length }}{{ '!' if loop.last }} {{ loop.cycle('a', 'b') }} {{ loop.previtem.role if loop.previtem }}
  {% call show(m, ': ') %}{{ m.content | trim | replace('a', 'A') | wordwrap(20) }}{% endcall %}
{% endfor -%}
{%- set block %}{% for i in range(3) %}{{ i * 2 }},{% endfor %}{% endset -%}
{{ block }}|{{ ns.count }}|{{ ns.text }}|{{ 'ab' * 3 }}|{{ '%05.1f|%s' % (3.14159, 'x') }}|{{ '{:>6}|{}'.format('r', 2) }}
{{ messages | map(attribute='role') | join(', ') }}|{{ messages | selectattr('role', 'equalto', 'user') | list | length }}
{{ {'b': [1, 2], 'a': 'é'} | tojson(indent=2) }}|{{ [3, 1, 2] | sort | sum }}|{{ [[1], [2]] | sum(start=[]) }}
{{ 'x' | center(7) }}|{{ 'l1\nl2' | indent(3, first=True) }}|{{ range(7) | batch(3, 0) | list }}|{{ {'z': 1, 'y': 2} | dictsort }}
{%- for node in [{'n': 1, 'kids': [{'n': 2, 'kids': [{'n': 3, 'kids': []}]}]}] recursive %}[{{ node.n }}{{ loop(node.kids) }}]{% endfor %}
{% filter upper %}shout {{ undefined_name | default('dflt') }}{% endfilter %} {{ 2 ** 10 }} {{ 7 // 2 }} {{ -3 | abs }}
{%- if add_generation_prompt %}<|im_start|>assistant{% endif %}"""


@pytest.mark.oracle
def test_the_bounds_change_nothing_a_template_renders(ours, theirs):
    for conv in CONVERSATIONS.values():
        kw = dict(chat_template=FEATURES_TEMPLATE, tokenize=False, add_generation_prompt=True)
        assert ours.apply_chat_template(conv, **kw) == theirs.apply_chat_template(conv, **kw)


def _render(template, conv=None, **kw):
    class Tok:
        special_tokens_map = {}
        chat_template = template

    return apply_chat_template(Tok(), CONVERSATIONS["user only"] if conv is None else conv, tokenize=False, **kw)


def test_rendering_is_bounded_in_time():
    # 10**10 loop iterations that print nothing; without the bound this runs for hours
    endless = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    with pytest.raises(ChatTemplateError, match=r"still rendering after 0.2 s \(render_timeout\)"):
        _render(endless, render_timeout=0.2)
    with pytest.raises(ChatTemplateError, match="render_timeout must be a number of seconds > 0"):
        _render("x", render_timeout=0)


@pytest.mark.parametrize("template, message", [
    ("{{ 'x' * 10**9 }}", "the result of '\\*' would hold 1,000,000,000"),
    ("{{ ([0] * 10**9) | length }}", "the result of '\\*' would hold"),
    ("{{ '%999999999d' % 1 }}", "a '%' format field"),
    ("{{ '%*d' % (999999999, 1) }}", "a '%' format field"),
    ("{{ '{:>999999999}'.format(1) }}", "a format\\(\\) field"),
    ("{{ '{:>{}}'.format(1, 999999999) }}", "a format\\(\\) field"),
    ("{{ 'x'.center(999999999) }}", "the result of center\\(\\)"),
    ("{{ 'x' | center(999999999) }}", "the result of the center filter"),  # a constant: jinja2 would fold it
    ("{{ ('a\n' * 100000) | indent(1000) }}", "the result of the indent filter"),
    ("{{ ('a' * 100000) | replace('', 'b' * 100000) }}", "the result of the replace filter"),
    ("{{ ('a' * 100000).replace('', 'b' * 100000) }}", "the result of replace\\(\\)"),
    ("{{ (['b' * 1000000] * 100000) | join }}", "the result of the join filter"),
    ("{{ ''.join(['b' * 1000000] * 100000) }}", "the result of join\\(\\)"),
    ("{{ ('\t' * 1000).expandtabs(100000000) }}", "the result of expandtabs\\(\\)"),
    ("{{ messages | tojson(indent=100000000) }}", "the indent of tojson"),
    ("{{ ([[1] * 1000] * 10000) | sum(start=[]) | length }}", "the work of the sum filter"),
    ("{{ ('a ' * 1000000) | wordwrap(1, wrapstring='x' * 10000) }}", "the result of the wordwrap filter"),
    ("{% set ns = namespace(s='x') %}{% for i in range(100) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
     "namespace attribute 's' would hold"),
    ("{% set big = 'x' * 1000000 %}{% set y %}{% for i in range(100000) %}{{ big }}{% endfor %}{% endset %}",
     "produced more than 10,000,000 characters"),
    ("{% for i in range(100000) %}" + "y" * 1000 + "{% endfor %}", "produced more than 10,000,000 characters"),
])
def test_rendering_is_bounded_in_size(template, message):
    with pytest.raises(ChatTemplateError, match=message):
        _render(template)


def test_the_size_bound_is_configurable():
    assert _render("{{ 'x' * 50 }}", render_max_chars=50) == "x" * 50
    with pytest.raises(ChatTemplateError, match="produced more than 49 characters"):
        _render("{{ 'x' * 25 }}{{ 'x' * 25 }}", render_max_chars=49)


@pytest.mark.parametrize("template", [
    "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "{% for m in [[1]] recursive %}{{ loop([m]) }}{% endfor %}",
    "{{" + "(" * 5000 + "1" + ")" * 5000 + "}}",
])
def test_recursion_is_a_template_error(template):
    with pytest.raises(ChatTemplateError, match="too deeply"):
        _render(template)


def test_other_python_errors_in_a_template_are_template_errors():
    with pytest.raises(ChatTemplateError, match="ZeroDivisionError"):
        _render("{{ 1 / 0 }}")
    with pytest.raises(ChatTemplateError, match="OverflowError"):
        _render("{{ range(10**30) | length }}")


@pytest.mark.parametrize("conversation, message", [
    ([{"content": "hi"}], "message 0: no 'role'"),
    ([{"role": "user", "content": "hi"}, {"role": b"user", "content": "hi"}], "message 1: 'role' must be a string, found bytes"),
    ([{"role": "user", "content": b"hi"}], "message 0: 'content' must be a string, None or a list of parts .* found bytes \\(decode"),
    ([{"role": "user", "content": 3}], "message 0: 'content' must be a string, None or a list of parts .* found int"),
    ([{"role": "user", "content": {"text": "hi"}}], "found dict"),
    ([{"role": "user", "content": ["hi"]}], "message 0: content part 0: expected a dict with a string 'type'"),
    ([{"role": "user", "content": [{"type": "text", "text": b"hi"}]}], "content part 0: a text part needs a string 'text', found bytes"),
    ([[{"role": "user", "content": "ok"}], [{"role": "user"}, {"role": 1}]], "conversation 1, message 1: 'role' must be a string"),
    ("hello", "expected a list of messages"),
    (0, "expected a list of messages .* found int"),
])
def test_malformed_messages_are_refused_with_their_index(conversation, message):
    with pytest.raises(ChatTemplateError, match=message):
        _render("{{ messages }}", conversation)


def test_well_formed_messages_are_passed_on_as_they_are():
    tool_call = {"type": "function", "function": {"name": "now", "arguments": {}}}
    conv = [{"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "image", "url": "x.png"}]},
            {"role": "assistant", "content": None, "tool_calls": [tool_call]},
            {"role": "tool", "name": "now", "content": "12:00"}]
    out = _render("{% for m in messages %}{{ m.role }}:{{ m.content is defined }}:{{ m.tool_calls | default('-') }}:"
                  "{{ m.name | default('-') }};{% endfor %}", conv)
    assert out == (f"user:True:-:-;assistant:False:{[tool_call]}:-;tool:True:-:now;")
    looped = [{"role": "user", "content": "hi"}]
    looped[0]["self"] = looped
    with pytest.raises(ChatTemplateError, match="nested too deeply"):
        _render("{{ messages }}", looped)


def test_bounds_belong_to_their_rendering():
    """A rendering's budget is its own: other threads render with theirs, and nothing is left behind."""
    import threading

    from qwen2np.chat import sandbox

    results = []
    slow = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    thread = threading.Thread(target=lambda: results.append(pytest.raises(ChatTemplateError, _render, slow,
                                                                          render_timeout=0.5)))
    thread.start()
    for _ in range(50):  # meanwhile, quick renders in this thread under the default budget
        assert _render("{{ messages[0].content }}") == "Write a haiku about NumPy."
    thread.join()
    assert len(results) == 1 and sandbox._BUDGET.get() is None
    compiled = sandbox.compile_template("{{ 'x' | center(5) }}")  # outside render: no budget, no bound
    assert compiled.render() == "  x  "


def test_a_template_must_be_text():
    with pytest.raises(ChatTemplateError, match="a chat template must be a string .* found int"):
        _render(5)


def test_a_template_too_long_to_compile_quickly_is_refused():
    from qwen2np.chat.template import MAX_TEMPLATE_CHARS

    with pytest.raises(ChatTemplateError, match="characters long; qwen2np compiles templates of at most 200,000"):
        _render("{{ 1 }}" * (MAX_TEMPLATE_CHARS // 7 + 1))
