"""The official `openai` client against `performer serve`: a non-streaming and a streaming
greedy completion must both return exactly the text `performer generate` printed for the same
request (passed in a file), the streaming one resuming the whole prompt from the prefix cache
(`usage.prompt_tokens_details.cached_tokens`). Structured output through `response_format` (the client's
`extra_body`, as the Completions API has no such parameter of its own): sampled completions at
temperature 1 parse as JSON and validate against their schemas (tests/fixtures/schemas/); invalid schemas and grammars are 400s.
Usage: openai_client.py BASE_URL EXPECTED_TEXT_FILE PROMPT MAX_TOKENS
"""

import json
import re
import sys
from pathlib import Path

import openai


def main() -> int:
    base, expected_file, prompt, max_tokens = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    with open(expected_file, encoding="utf-8") as f:
        # Off a terminal, `performer generate` prints exactly the generated text.
        expected = f.read()
    client = openai.OpenAI(base_url=base + "/v1", api_key="test-key")

    models = client.models.list()
    model = models.data[0].id

    done = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0)
    text = done.choices[0].text
    assert text == expected, f"non-streaming: {text!r} != {expected!r}"
    assert done.choices[0].finish_reason == "length", done.choices[0].finish_reason
    assert done.usage.prompt_tokens == len(prompt.encode()), done.usage
    assert done.usage.completion_tokens == max_tokens, done.usage
    # The first request with this prompt: nothing cached. The streaming one below repeats it and
    # resumes from the prefix cache's state at its end, with the same text.
    assert done.usage.prompt_tokens_details.cached_tokens == 0, done.usage

    pieces, usage, reasons = [], None, []
    stream = client.completions.create(
        model=model,
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        for c in chunk.choices:
            pieces.append(c.text)
            if c.finish_reason:
                reasons.append(c.finish_reason)
        if chunk.usage is not None:
            usage = chunk.usage
    streamed = "".join(pieces)
    assert streamed == expected, f"streaming: {streamed!r} != {expected!r}"
    assert reasons == ["length"], reasons
    assert usage is not None and usage.completion_tokens == max_tokens, usage
    assert usage.prompt_tokens_details.cached_tokens == len(prompt.encode()), usage

    try:
        client.completions.create(model=model, prompt=prompt, max_tokens=1, temperature=-1)
        raise AssertionError("a negative temperature was accepted")
    except openai.BadRequestError as e:
        assert e.status_code == 400

    structured(client, model)

    print(f"openai client: ok ({len(expected)} bytes, streaming and not; structured output)")
    return 0


SCHEMAS = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "schemas"


def check(schema, value, path="$"):
    """A validator for the keywords the fixture schemas use (the venv holds only `openai`)."""
    if "enum" in schema:
        assert value in schema["enum"], (path, value)
    t = schema.get("type")
    if t == "object":
        assert isinstance(value, dict), (path, value)
        props = schema.get("properties", {})
        for k in schema.get("required", []):
            assert k in value, (path, k, value)
        if schema.get("additionalProperties") is False:
            assert set(value) <= set(props), (path, value)
        for k, v in value.items():
            if k in props:
                check(props[k], v, f"{path}.{k}")
    elif t == "array":
        assert isinstance(value, list), (path, value)
        assert schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", 1 << 30), (path, value)
        for i, v in enumerate(value):
            check(schema["items"], v, f"{path}[{i}]")
    elif t == "string":
        assert isinstance(value, str), (path, value)
        assert schema.get("minLength", 0) <= len(value) <= schema.get("maxLength", 1 << 30), (path, value)
        if "pattern" in schema:
            assert re.search(schema["pattern"], value), (path, value)
    elif t in ("integer", "number"):
        assert isinstance(value, (int, float)) and not isinstance(value, bool), (path, value)
        if t == "integer":
            assert isinstance(value, int), (path, value)
        assert value >= schema.get("minimum", value), (path, value)
        assert value <= schema.get("maximum", value), (path, value)
        if "exclusiveMinimum" in schema:
            assert value > schema["exclusiveMinimum"], (path, value)
        if "exclusiveMaximum" in schema:
            assert value < schema["exclusiveMaximum"], (path, value)
    elif t == "boolean":
        assert isinstance(value, bool), (path, value)


def structured(client, model):
    for name in ("person", "items", "nested", "pattern", "bounds"):
        schema = json.loads((SCHEMAS / f"{name}.json").read_text())
        fmt = {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}
        done = client.completions.create(
            model=model, prompt="Data: ", max_tokens=400, temperature=1.0, n=4, seed=7,
            extra_body={"response_format": fmt},
        )
        for c in done.choices:
            assert c.finish_reason == "stop", (name, c.finish_reason, c.text)
            check(schema, json.loads(c.text))
        # Streaming: the pieces make one valid document.
        pieces = []
        for chunk in client.completions.create(
            model=model, prompt="Data: ", max_tokens=400, temperature=1.0, seed=8, stream=True,
            extra_body={"response_format": fmt},
        ):
            pieces.extend(c.text for c in chunk.choices)
        check(schema, json.loads("".join(pieces)))

    # Any object: its keys are unbounded strings, which this model may fill with prose until
    # the limit; a choice that ends is an object, one cut short is a prefix of one.
    done = client.completions.create(
        model=model, prompt="{", max_tokens=100, temperature=1.0, seed=3, n=4,
        extra_body={"response_format": {"type": "json_object"}},
    )
    for c in done.choices:
        if c.finish_reason == "stop":
            assert isinstance(json.loads(c.text), dict), c.text
        else:
            assert c.finish_reason == "length" and c.text.startswith("{"), c

    # A grammar (Lark), and max_tokens cutting a document short: "length".
    done = client.completions.create(
        model=model, prompt="Q: ", max_tokens=20, temperature=1.0, seed=1,
        extra_body={"grammar": 'start: ("yes" | "no") "!"'},
    )
    assert done.choices[0].text in ("yes!", "no!") and done.choices[0].finish_reason == "stop", done
    done = client.completions.create(
        model=model, prompt="Data: ", max_tokens=3, temperature=1.0,
        extra_body={"response_format": {"type": "json_object"}},
    )
    assert done.choices[0].finish_reason == "length" and len(done.choices[0].text) == 3, done

    # Bad ones: a 400 naming the problem.
    bad = [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}}}, "schema"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "unevaluatedProperties": False}}}}, "unevaluatedProperties"),
        ({"grammar": "start: nope"}, "nope"),
    ]
    for extra, named in bad:
        try:
            client.completions.create(model=model, prompt="x", max_tokens=5, extra_body=extra)
            raise AssertionError(f"accepted: {extra}")
        except openai.BadRequestError as e:
            assert e.status_code == 400 and named in str(e), str(e)


if __name__ == "__main__":
    sys.exit(main())
