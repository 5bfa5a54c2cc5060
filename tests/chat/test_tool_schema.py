"""Tools given as Python functions become the JSON schema transformers 5.24's `get_json_schema` builds,
and a function that cannot become one is refused with a ChatTemplateError that names the tool."""

import enum
import typing

import pytest

from qwen2np.chat.tool_schema import get_json_schema
from qwen2np.errors import ChatTemplateError


class Color(enum.Enum):
    RED = "red"
    GREEN = "green"


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


def paint(color: Color, mode: typing.Literal["fill", "stroke", 3], size: int | float,
          where: tuple[int, int], options: dict[str, bool], tags: list[list[str]] | None = None,
          anything: typing.Any = None, note: typing.Optional[str] = None) -> None:
    """Paint something.

    Args:
        color: Which color
        mode: How to paint
        size: How big
        where: The position (x, y)
        options: Flags by name
        tags: Nested tags
        anything: Whatever
        note: An optional note
    """


class Calculator:
    def add(self, x: float, y: float = 0.0) -> float:
        """Add two numbers.

        Args:
            x: The first number
            y: The second number

        Returns:
            The sum
        """
        return x + y


def no_arguments():
    """Do nothing, with no arguments."""


TOOLS = [get_weather, paint, Calculator().add, no_arguments]


def test_a_function_becomes_its_schema():
    schema = get_json_schema(get_weather)["function"]
    assert schema["name"] == "get_weather" and schema["description"] == "Get the weather forecast."
    params = schema["parameters"]
    assert params["required"] == ["city"]
    assert params["properties"]["unit"] == {"type": "string", "enum": ["celsius", "fahrenheit"],
                                            "description": "The unit"}
    assert params["properties"]["days"] == {"type": "array", "items": {"type": "integer"}, "nullable": True,
                                            "description": "Which days ahead, counted from today"}
    assert schema["return"] == {"type": "object", "description": "The forecast"}


def test_type_hints_map_to_json_types():
    props = get_json_schema(paint)["function"]["parameters"]["properties"]
    assert props["color"]["enum"] == ["red", "green"] and props["color"]["type"] == "string"
    assert props["mode"]["enum"] == ["fill", "stroke", 3] and props["mode"]["type"] == ["string", "integer"]
    assert props["size"]["type"] == ["integer", "number"]
    assert props["where"]["prefixItems"] == [{"type": "integer"}, {"type": "integer"}]
    assert props["options"]["additionalProperties"] == {"type": "boolean"}
    assert props["tags"]["items"] == {"type": "array", "items": {"type": "string"}} and props["tags"]["nullable"]
    assert props["anything"] == {"description": "Whatever"}
    assert props["note"] == {"type": "string", "nullable": True, "description": "An optional note"}


def test_a_method_leaves_out_self():
    params = get_json_schema(Calculator().add)["function"]["parameters"]
    assert list(params["properties"]) == ["x", "y"] and params["required"] == ["x"]


@pytest.mark.oracle
@pytest.mark.parametrize("tool", TOOLS, ids=lambda t: t.__name__)
def test_schemas_match_transformers(oracle, tool):
    from transformers.utils import get_json_schema as theirs

    assert get_json_schema(tool) == theirs(tool)


def _no_docstring(x: int):
    pass


def _no_hint(x):
    """Do.

    Args:
        x: an x
    """


def _undocumented_argument(x: int, y: int):
    """Do.

    Args:
        x: an x
    """


def _variable_tuple(x: tuple[int, ...]):
    """Do.

    Args:
        x: some numbers
    """


def _unknown_type(x: "NoSuchType"):  # noqa: F821 (a forward reference to nothing)
    """Do.

    Args:
        x: an x
    """


def _bad_choices(x: str):
    """Do.

    Args:
        x: an x (choices: [a, b])
    """


def _set_hint(x: set[int]):
    """Do.

    Args:
        x: a set
    """


@pytest.mark.parametrize("tool, message", [
    (_no_docstring, "tool _no_docstring: a function needs a docstring"),
    (_no_hint, "tool _no_hint: argument x has no type hint"),
    (_undocumented_argument, "tool _undocumented_argument: the docstring has no description for argument 'y'"),
    (_variable_tuple, "tool _variable_tuple: use list\\[...\\] rather than"),
    (_unknown_type, "tool _unknown_type: cannot read its signature and type hints \\(NameError"),
    (_bad_choices, "tool _bad_choices: argument 'x': the docstring's \\(choices: ...\\) must be a JSON list"),
    (_set_hint, "tool _set_hint: cannot convert the type hint"),
    (5, "cannot read its signature"),
])
def test_a_function_that_cannot_become_a_schema_is_refused(tool, message):
    with pytest.raises(ChatTemplateError, match=message):
        get_json_schema(tool)


@pytest.mark.oracle
@pytest.mark.parametrize("tool", [_no_docstring, _no_hint, _undocumented_argument, _variable_tuple, _set_hint],
                         ids=lambda t: t.__name__)
def test_transformers_refuses_the_same_functions(oracle, tool):
    from transformers.utils import get_json_schema as theirs

    with pytest.raises(Exception):
        theirs(tool)
