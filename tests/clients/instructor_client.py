"""The unmodified `instructor` library (on the `openai` client) against `qwen-run serve`, used as
its docs show (https://python.useinstructor.com): `response_model=` returns a validated pydantic
model, in JSON_SCHEMA mode (response_format json_schema) and TOOLS mode (a forced tool call),
and streamed partial objects. `max_retries=0`, so a failure is not hidden by a re-ask.

Usage: python3 instructor_client.py BASE_URL   (prints "ok", or "skip: ..." without the library)
"""

import sys
from typing import List, Literal

try:
    import instructor
    from openai import OpenAI
    from pydantic import BaseModel, Field
except ImportError as e:
    print(f"skip: instructor cannot be imported ({e}); pip install -r tests/clients/requirements.txt")
    sys.exit(0)

base = sys.argv[1]
openai_client = OpenAI(base_url=base + "/v1", api_key="none")
model = openai_client.models.list().data[0].id


class Address(BaseModel):
    city: str
    country: str


class UserInfo(BaseModel):
    name: str
    age: int = Field(ge=0, le=150)
    role: Literal["engineer", "designer", "manager"]
    languages: List[str] = Field(min_length=1, max_length=4, description="The programming languages the person uses")
    address: Address


messages = [
    {
        "role": "user",
        "content": "Extract: John Doe is a 30 year old engineer from Lyon, France, who writes Rust and Python.",
    }
]

for mode in (instructor.Mode.JSON_SCHEMA, instructor.Mode.TOOLS):
    client = instructor.from_openai(openai_client, mode=mode)
    user = client.chat.completions.create(
        model=model,
        response_model=UserInfo,
        messages=messages,
        max_retries=0,
        temperature=0,
        max_tokens=200,
    )
    assert isinstance(user, UserInfo), (mode, user)
    assert user.age == 30, (mode, user)
    assert "John" in user.name, (mode, user)


# TOOLS mode with a flat model (no "$defs").
class Person(BaseModel):
    name: str
    age: int


person = instructor.from_openai(openai_client, mode=instructor.Mode.TOOLS).chat.completions.create(
    model=model,
    response_model=Person,
    messages=messages,
    max_retries=0,
    temperature=0,
    max_tokens=100,
)
assert isinstance(person, Person) and person.age == 30 and "John" in person.name, person

# Streamed partial objects (https://python.useinstructor.com/concepts/partial/).
client = instructor.from_openai(openai_client, mode=instructor.Mode.JSON_SCHEMA)
partials = list(
    client.chat.completions.create_partial(
        model=model,
        response_model=UserInfo,
        messages=messages,
        max_retries=0,
        temperature=0,
        max_tokens=200,
    )
)
assert len(partials) > 1, partials
final = UserInfo.model_validate(partials[-1].model_dump())
assert final.age == 30, final

print("ok")
