"""Chat templates: a conversation as the model's prompt text, as transformers 5.24 renders it.

* ``template.py``     `apply_chat_template` and `render`: the conversation, tools and documents through the template
* ``sandbox.py``      the sandboxed Jinja environment and its bounds on one rendering (time, characters)
* ``tool_schema.py``  tools given as Python functions: their JSON schema, from type hints and docstrings

The tokenizer's `apply_chat_template` is the way in (docs/generation.md).
"""
