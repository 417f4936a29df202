"""The unmodified `ollama` Python client against `qwen-run serve`, used as its docs show
(https://github.com/ollama/ollama-python): structured outputs with `format=<schema>` and
`format="json"`, tools given as Python functions, streaming, and list/show/ps.

Usage: python3 ollama_client.py BASE_URL   (prints "ok", or "skip: ..." without the client)
"""

import json
import sys
from typing import List, Literal

try:
    import ollama
    from pydantic import BaseModel, Field
except ImportError as e:
    print(f"skip: the ollama client cannot be imported ({e}); pip install -r tests/clients/requirements.txt")
    sys.exit(0)

base = sys.argv[1]
client = ollama.Client(host=base)

# list(), show(), ps()
listed = client.list()
names = [m.model for m in listed.models]
assert len(names) == 1, listed
model = names[0]
shown = client.show(model)
assert shown.modelinfo, shown
assert shown.details is not None and shown.details.format == "gguf", shown
running = client.ps()
assert isinstance(running.models, list), running


class Author(BaseModel):
    name: str
    alive: bool


class Book(BaseModel):
    title: str
    year: int = Field(ge=1000, le=2100)
    genre: Literal["fiction", "non-fiction", "poetry"]
    characters: List[str] = Field(min_length=1, max_length=3)
    author: Author


messages = [{"role": "user", "content": "Describe your favourite book in one sentence."}]
options = {"temperature": 0, "seed": 42, "num_predict": 300}

# Structured outputs (https://ollama.com/blog/structured-outputs).
response = client.chat(model=model, messages=messages, format=Book.model_json_schema(), options=options)
book = Book.model_validate_json(response.message.content)
assert 1000 <= book.year <= 2100, book
assert response.done and response.done_reason == "stop", response

# Streamed: the chunks join to the same answer.
parts = []
last = None
for chunk in client.chat(
    model=model, messages=messages, format=Book.model_json_schema(), options=options, stream=True
):
    parts.append(chunk.message.content)
    last = chunk
assert len(parts) > 1, parts
assert "".join(parts) == response.message.content, (parts, response.message.content)
assert last.done and last.eval_count == response.eval_count, (last, response)

# format="json": any JSON object.
generated = client.generate(
    model=model, prompt="List three colours.", format="json", options={"temperature": 0, "num_predict": 100}
)
assert isinstance(json.loads(generated.response), dict), generated


# Tools as Python functions (https://ollama.com/blog/functions-as-tools): the client builds
# the tool's schema from the signature and the Google-style docstring.
def add_two_numbers(a: int, b: int) -> int:
    """
    Add two numbers

    Args:
      a: The first number
      b: The second number

    Returns:
      int: The sum of the two numbers
    """
    return a + b


response = client.chat(
    model=model,
    messages=[{"role": "user", "content": "What is 10 + 10? Use the add_two_numbers tool."}],
    tools=[add_two_numbers],
    options={"temperature": 0},
)
calls = response.message.tool_calls
assert calls, response
call = calls[0]
assert call.function.name == "add_two_numbers", call
assert add_two_numbers(**call.function.arguments) == 20, call

# The tool's result goes back as the docs show (the response's message, then a "tool" message
# with tool_name): the server takes the client's shapes of both. What the 0.5B says next is not
# checked: given a tool's result it tends to call the tool again rather than answer (on the
# OpenAI API too), so only the exchange itself is.
followup = client.chat(
    model=model,
    messages=[
        {"role": "user", "content": "What is 10 + 10? Use the add_two_numbers tool."},
        response.message,
        {"role": "tool", "content": str(add_two_numbers(**call.function.arguments)), "tool_name": call.function.name},
    ],
    tools=[add_two_numbers],
    options={"temperature": 0, "num_predict": 40},
)
assert followup.done and followup.message.role == "assistant", followup
assert followup.prompt_eval_count > response.prompt_eval_count, (followup, response)

print("ok")
