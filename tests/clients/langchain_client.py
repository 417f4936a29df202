"""The unmodified `langchain-openai` chat model against `qwen-run serve`, used as its docs show
(https://python.langchain.com/docs/how_to/structured_output/, .../tool_calling/):
`with_structured_output(Model, method="json_schema" | "function_calling")` returns the model, and
`bind_tools([tool], tool_choice="required")` returns an AIMessage with tool_calls.

Usage: python3 langchain_client.py BASE_URL   (prints "ok", or "skip: ..." without the library)
"""

import sys
from typing import List, Literal

try:
    from langchain_core.messages import AIMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI
    from openai import OpenAI
    from pydantic import BaseModel, Field
except ImportError as e:
    print(f"skip: langchain-openai cannot be imported ({e}); pip install -r tests/clients/requirements.txt")
    sys.exit(0)

base = sys.argv[1]
model = OpenAI(base_url=base + "/v1", api_key="none").models.list().data[0].id
llm = ChatOpenAI(base_url=base + "/v1", api_key="none", model=model, temperature=0, max_tokens=200)


class Author(BaseModel):
    """The book's author."""

    name: str
    alive: bool


class Book(BaseModel):
    """A book."""

    title: str = Field(description="The book's title")
    year: int = Field(ge=1000, le=2100, description="The year it was published")
    genre: Literal["fiction", "non-fiction", "poetry"]
    characters: List[str] = Field(min_length=1, max_length=3)
    author: Author


prompt = "Describe your favourite book in one sentence."

for method in ("json_schema", "function_calling"):
    book = llm.with_structured_output(Book, method=method).invoke(prompt)
    assert isinstance(book, Book), (method, book)
    assert 1000 <= book.year <= 2100, (method, book)


@tool
def get_weather(city: str) -> str:
    """Get the current weather in a given city."""
    return f"It is sunny in {city}."


msg = llm.bind_tools([get_weather], tool_choice="required").invoke("Hello!")
assert isinstance(msg, AIMessage), msg
assert msg.tool_calls, msg
assert msg.tool_calls[0]["name"] == "get_weather", msg
assert isinstance(msg.tool_calls[0]["args"].get("city"), str), msg

# The tool runs and its ToolMessage goes back with the AIMessage, as the docs show: the server
# takes LangChain's shapes of both. What the 0.5B says next is not checked: given a tool's result
# it tends to call the tool again rather than answer.
weather = llm.bind_tools([get_weather], max_tokens=40)
question = [("human", "What's the weather like in Paris right now?")]
ai = weather.invoke(question)
assert ai.tool_calls and ai.tool_calls[0]["name"] == "get_weather", ai
answer = weather.invoke(question + [ai, get_weather.invoke(ai.tool_calls[0])])
assert isinstance(answer, AIMessage), answer
assert answer.usage_metadata["input_tokens"] > ai.usage_metadata["input_tokens"], (answer, ai)

print("ok")
