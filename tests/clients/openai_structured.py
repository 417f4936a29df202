"""The unmodified `openai` Python client against `qwen-run serve`, used as its docs show:
structured outputs with `chat.completions.parse(response_format=<pydantic model>)`, streamed and
not, and tool calls with `tool_choice` "required" and a named function.

Usage: python3 openai_structured.py BASE_URL   (prints "ok", or "skip: ..." without the client)
"""

import json
import sys
from enum import Enum
from typing import List, Literal

try:
    import openai
    from pydantic import BaseModel, Field
except ImportError as e:
    print(f"skip: the openai client cannot be imported ({e}); pip install -r tests/clients/requirements.txt")
    sys.exit(0)

base = sys.argv[1]
client = openai.OpenAI(base_url=base + "/v1", api_key="none")
model = client.models.list().data[0].id


class Genre(str, Enum):
    fiction = "fiction"
    non_fiction = "non-fiction"
    poetry = "poetry"


class Author(BaseModel):
    name: str
    alive: bool


class Book(BaseModel):
    title: str
    year: int = Field(ge=1000, le=2100)
    genre: Genre
    mood: Literal["joyful", "sad", "tense"]
    characters: List[str] = Field(min_length=1, max_length=3)
    author: Author


messages = [{"role": "user", "content": "Describe your favourite book in one sentence."}]

# Structured outputs, as https://platform.openai.com/docs/guides/structured-outputs shows.
completion = client.chat.completions.parse(
    model=model, messages=messages, response_format=Book, temperature=0, max_tokens=300
)
book = completion.choices[0].message.parsed
assert isinstance(book, Book), completion
assert 1000 <= book.year <= 2100, book
assert completion.choices[0].finish_reason == "stop", completion

# The same, streamed: the client's own stream helper assembles and parses the same answer.
with client.chat.completions.stream(
    model=model, messages=messages, response_format=Book, temperature=0, max_tokens=300
) as stream:
    deltas = [e.delta for e in stream if e.type == "content.delta"]
    final = stream.get_final_completion()
assert len(deltas) > 1, deltas
streamed = final.choices[0].message.parsed
assert isinstance(streamed, Book), final
assert streamed == book, (streamed, book)
assert "".join(deltas) == completion.choices[0].message.content, (deltas, completion)

# Tools (https://platform.openai.com/docs/guides/function-calling).
tools = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the current weather in a given city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "description": "The city, e.g. Paris"}},
                "required": ["city"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "Get the current time in a time zone",
            "parameters": {
                "type": "object",
                "properties": {"zone": {"type": "string", "description": "An IANA time zone"}},
                "required": ["zone"],
                "additionalProperties": False,
            },
        },
    },
]

# "required": a greeting still gets a tool call.
r = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "Hello!"}],
    tools=tools,
    tool_choice="required",
    temperature=0,
    max_tokens=100,
)
calls = r.choices[0].message.tool_calls
assert calls, r
assert r.choices[0].finish_reason == "tool_calls", r
for c in calls:
    assert c.type == "function", c
    assert c.function.name in ("get_weather", "get_time"), c
    assert isinstance(json.loads(c.function.arguments), dict), c

# A named function is the one called, even when the other fits the question better.
r = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "What's the weather like in Paris right now?"}],
    tools=tools,
    tool_choice={"type": "function", "function": {"name": "get_time"}},
    temperature=0,
    max_tokens=100,
)
calls = r.choices[0].message.tool_calls
assert calls and all(c.function.name == "get_time" for c in calls), r
assert "zone" in json.loads(calls[0].function.arguments), r


# Strict function tools from a pydantic model, parsed by the client
# (`openai.pydantic_function_tool`, as the structured-outputs guide shows).
class GetTime(BaseModel):
    """Get the current time in a time zone"""

    zone: str


r = client.chat.completions.parse(
    model=model,
    messages=[{"role": "user", "content": "What time is it in Tokyo?"}],
    tools=[openai.pydantic_function_tool(GetTime)],
    tool_choice="required",
    temperature=0,
    max_tokens=100,
)
call = r.choices[0].message.tool_calls[0]
assert call.function.name == "GetTime", r
assert isinstance(call.function.parsed_arguments, GetTime), r

print("ok")
