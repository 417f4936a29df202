"""The unmodified `llama-index-llms-ollama` LLM class against `qwen-run serve`'s Ollama API, used
as its docs show (https://docs.llamaindex.ai/en/stable/examples/llm/ollama/): `complete`, `chat`,
their streaming forms, `as_structured_llm` (Ollama's `format` with a JSON schema), tools through
`chat_with_tools` / `get_tool_calls_from_response`, and the async `achat`.

(`llama-index-llms-openai-like` is not used: its `llama-index-llms-openai` needs openai<3, and
requirements.txt pins openai 3.3.0 for instructor.)

Usage: python3 llama_index_client.py BASE_URL   (prints "ok", or "skip: ..." without it)
"""

import asyncio
import sys

try:
    import ollama
    from llama_index.core.llms import ChatMessage
    from llama_index.core.tools import FunctionTool
    from llama_index.llms.ollama import Ollama
    from pydantic import BaseModel
except ImportError as e:
    print(f"skip: llama-index-llms-ollama cannot be imported ({e}); pip install -r tests/clients/requirements.txt")
    sys.exit(0)

base = sys.argv[1]
model = ollama.Client(host=base).list().models[0].model
# The docs' constructor, with the context window set as they suggest "to limit memory usage";
# left out, the class asks /api/show for the model's trained context and sends it as num_ctx.
llm = Ollama(model=model, base_url=base, request_timeout=120.0, temperature=0, context_window=4096,
             additional_kwargs={"num_predict": 40})

# KNOWN: left to its default, context_window is read from /api/show (the model's trained context)
# and sent as options.num_ctx, which qwen-run refuses (400) above its --ctx-size, where Ollama
# would load the model with that context.
try:
    Ollama(model=model, base_url=base, request_timeout=120.0, additional_kwargs={"num_predict": 1}).complete("Hi")
except Exception as e:
    if "exceeds the server's context" not in str(e):
        raise
    print("known: Ollama(...) without context_window sends the trained context as num_ctx: 400 above --ctx-size")

resp = llm.complete("Say hello.")
assert resp.text.strip(), resp
streamed = "".join(r.delta for r in llm.stream_complete("Say hello."))
assert streamed == resp.text, (streamed, resp.text)

messages = [
    ChatMessage(role="system", content="You are brief."),
    ChatMessage(role="user", content="Name a primary colour."),
]
reply = llm.chat(messages)
assert reply.message.role == "assistant" and reply.message.content.strip(), reply
streamed = "".join(r.delta for r in llm.stream_chat(messages))
assert streamed == reply.message.content, (streamed, reply.message.content)
again = asyncio.run(llm.achat(messages))
assert again.message.content == reply.message.content, (again, reply)


class Song(BaseModel):
    """A song."""

    name: str
    artist: str


sllm = Ollama(model=model, base_url=base, request_timeout=120.0, temperature=0, context_window=4096,
              additional_kwargs={"num_predict": 80}).as_structured_llm(Song)
song = sllm.chat([ChatMessage(role="user", content="Name a song and its artist.")]).raw
assert isinstance(song, Song) and song.name and song.artist, song


def get_weather(city: str) -> str:
    """Get the current weather in a city."""
    return f"sunny in {city}"


tool = FunctionTool.from_defaults(fn=get_weather)
resp = llm.chat_with_tools([tool], user_msg="What is the weather in Paris? Use the tool.")
calls = llm.get_tool_calls_from_response(resp, error_on_no_tool_call=True)
assert calls[0].tool_name == "get_weather", calls
assert "paris" in str(calls[0].tool_kwargs.get("city", "")).lower(), calls

print("ok")
