"""The unmodified `openai` and `ollama` Python clients' embedding calls against
`qwen-run serve --embedding`, used as their docs show: `client.embeddings.create(...)` (which asks
for base64 and decodes it) and `ollama.Client.embed(...)` / `.embeddings(...)`.

Usage: python3 embeddings_client.py BASE_URL   (prints "ok", or "skip: ..." without a client)
"""

import math
import sys

try:
    import ollama
    import openai
except ImportError as e:
    print(f"skip: a client cannot be imported ({e}); pip install -r tests/clients/requirements.txt")
    sys.exit(0)

base = sys.argv[1]
texts = ["The cat sat on the mat.", "A cat was sitting on the rug."]


def norm(v):
    return math.sqrt(sum(x * x for x in v))


client = openai.OpenAI(base_url=base + "/v1", api_key="none")
model = client.models.list().data[0].id
made = client.embeddings.create(model="text-embedding-3-small", input=texts)
assert made.model == model, made.model
assert [d.index for d in made.data] == [0, 1], made
a, b = (d.embedding for d in made.data)
assert len(a) == len(b) > 0
assert abs(norm(a) - 1) < 1e-4 and abs(norm(b) - 1) < 1e-4
floats = client.embeddings.create(model=model, input=texts[0], encoding_format="float")
assert max(abs(x - y) for x, y in zip(floats.data[0].embedding, a)) < 1e-6
assert made.usage.prompt_tokens > 0 and made.usage.total_tokens == made.usage.prompt_tokens
try:
    client.embeddings.create(model=model, input=texts[0], dimensions=8)
    raise AssertionError("dimensions=8 was accepted")
except openai.BadRequestError:
    pass

o = ollama.Client(host=base)
e = o.embed(model=model, input=texts)
assert len(e.embeddings) == 2, e
assert max(abs(x - y) for x, y in zip(e.embeddings[0], a)) < 1e-6
one = o.embed(model=model, input=texts[1])
assert max(abs(x - y) for x, y in zip(one.embeddings[0], b)) < 1e-6
old = o.embeddings(model=model, prompt=texts[0])
assert len(old.embedding) == len(a)
print("ok")
