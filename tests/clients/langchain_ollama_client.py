"""The unmodified `langchain-ollama` integration against `qwen-run serve`'s Ollama API, used as
its docs show (https://python.langchain.com/docs/integrations/chat/ollama/, .../text_embedding/
ollama/): `ChatOllama(...).invoke`, streaming, `with_structured_output(Model)` (Ollama's `format`
with a JSON schema), `bind_tools` tool calls, and `OllamaEmbeddings` for queries and documents.

Usage: python3 langchain_ollama_client.py BASE_URL   (prints "ok", or "skip: ..." without it)
"""

import math
import sys
from typing import Literal

try:
    import ollama
    from langchain_core.messages import AIMessage
    from langchain_core.tools import tool
    from langchain_ollama import ChatOllama, OllamaEmbeddings
    from pydantic import BaseModel
except ImportError as e:
    print(f"skip: langchain-ollama cannot be imported ({e}); pip install -r tests/clients/requirements.txt")
    sys.exit(0)

base = sys.argv[1]
model = ollama.Client(host=base).list().models[0].model
llm = ChatOllama(model=model, base_url=base, temperature=0, num_predict=40)

reply = llm.invoke([("system", "You are brief."), ("human", "Say hello.")])
assert isinstance(reply, AIMessage) and reply.content.strip(), reply
streamed = "".join(chunk.content for chunk in llm.stream([("system", "You are brief."), ("human", "Say hello.")]))
assert streamed == reply.content, (streamed, reply.content)


class Pet(BaseModel):
    """A pet."""

    name: str
    kind: Literal["cat", "dog", "fish"]
    age: int


pet = ChatOllama(model=model, base_url=base, temperature=0, num_predict=100).with_structured_output(Pet).invoke(
    "Invent a pet and describe it."
)
assert isinstance(pet, Pet), pet


@tool
def get_weather(city: str) -> str:
    """Get the current weather in a given city."""
    return f"It is sunny in {city}."


msg = ChatOllama(model=model, base_url=base, temperature=0, num_predict=100).bind_tools([get_weather]).invoke(
    "What is the weather in Paris? Use the tool."
)
assert isinstance(msg, AIMessage) and msg.tool_calls, msg
call = msg.tool_calls[0]
assert call["name"] == "get_weather" and isinstance(call["args"].get("city"), str), call

emb = OllamaEmbeddings(model=model, base_url=base)
q = emb.embed_query("a cat sat on the mat")
docs = emb.embed_documents(["a cat sat on the mat", "quarterly revenue grew by four percent"])
assert len(q) == len(docs[0]) == len(docs[1]) > 0, (len(q), [len(d) for d in docs])
norm = math.sqrt(sum(x * x for x in q))
assert abs(norm - 1.0) < 1e-3, norm
same = sum(a * b for a, b in zip(q, docs[0]))
other = sum(a * b for a, b in zip(q, docs[1]))
assert same > 0.99 and same > other, (same, other)

print("ok")
