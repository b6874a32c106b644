"""The official `openai` client against `performer serve`: a non-streaming and a streaming
greedy completion must both return exactly the text `performer generate` printed for the same
request (passed in a file), the streaming one resuming the whole prompt from the prefix cache
(`usage.prompt_tokens_details.cached_tokens`). Structured output through `response_format` (the client's
`extra_body`, as the Completions API has no such parameter of its own): sampled completions at
temperature 1 parse as JSON and validate against their schemas (tests/fixtures/schemas/); invalid schemas and grammars are 400s.
Chat completions (streaming, `n`, logprobs) and the Responses API: a three-turn conversation
through `previous_response_id`, streaming and not, equal to the whole conversation sent through
chat completions; a fork of one response into two continuations; retrieve and delete.
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
    chat(client, model)
    responses(client, model)

    print(f"openai client: ok ({len(expected)} bytes, streaming and not; structured output; chat; responses)")
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


def chat(client, model):
    messages = [{"role": "system", "content": "Tell a story."}, {"role": "user", "content": "Once upon a time"}]
    done = client.chat.completions.create(model=model, messages=messages, max_tokens=24, temperature=0)
    text = done.choices[0].message.content
    assert done.choices[0].message.role == "assistant" and text, done
    pieces, usage, roles = [], None, []
    for chunk in client.chat.completions.create(
        model=model, messages=messages, max_tokens=24, temperature=0, stream=True,
        stream_options={"include_usage": True},
    ):
        for c in chunk.choices:
            pieces.append(c.delta.content or "")
            if c.delta.role:
                roles.append(c.delta.role)
        if chunk.usage is not None:
            usage = chunk.usage
    assert "".join(pieces) == text, ("".join(pieces), text)
    assert roles == ["assistant"], roles
    assert usage is not None and usage.completion_tokens == len(text.encode()), usage

    done = client.chat.completions.create(
        model=model, messages=messages, max_tokens=12, temperature=1.0, seed=5, n=3,
        logprobs=True, top_logprobs=2,
    )
    assert [c.index for c in done.choices] == [0, 1, 2], done.choices
    for c in done.choices:
        entries = c.logprobs.content
        assert len(entries) == len(c.message.content.encode()), (entries, c.message.content)
        assert all(len(e.top_logprobs) == 2 and e.logprob <= 0 for e in entries), entries
    try:
        client.chat.completions.create(model=model, messages=[], max_tokens=1)
        raise AssertionError("empty messages were accepted")
    except openai.BadRequestError as e:
        assert e.status_code == 400


def turn_stream(client, model, **kw):
    """A streamed response: its text (from the deltas) and its final object."""
    text, final, kinds = [], None, []
    for event in client.responses.create(model=model, stream=True, **kw):
        kinds.append(event.type)
        if event.type == "response.output_text.delta":
            text.append(event.delta)
        elif event.type in ("response.completed", "response.incomplete"):
            final = event.response
    assert kinds[0] == "response.created" and final is not None, kinds
    assert final.output_text == "".join(text), (final.output_text, text)
    return final


def responses(client, model):
    turns = ["Once upon a time", "And then?", "What next?"]
    for streaming in (False, True):
        prev, history = None, [{"role": "system", "content": "Tell a story."}]
        for k, turn in enumerate(turns):
            kw = dict(input=turn, max_output_tokens=24, temperature=0)
            if prev is None:
                kw["instructions"] = "Tell a story."
            else:
                kw["previous_response_id"] = prev.id
            r = turn_stream(client, model, **kw) if streaming else client.responses.create(model=model, **kw)
            history.append({"role": "user", "content": turn})
            whole = client.chat.completions.create(model=model, messages=history, max_tokens=24, temperature=0)
            assert r.output_text == whole.choices[0].message.content, (k, streaming, r.output_text, whole)
            if k > 0:
                # Only the new input is ingested, never the history.
                assert r.usage.input_tokens < whole.usage.prompt_tokens, (r.usage, whole.usage)
            history.append({"role": "assistant", "content": r.output_text})
            prev = r

    # A fork: two continuations of one response, the same greedy text; the original stays.
    first = client.responses.create(model=model, input="Once upon a time", max_output_tokens=16, temperature=0)
    a = client.responses.create(model=model, input="More.", previous_response_id=first.id, max_output_tokens=16, temperature=0)
    b = client.responses.create(model=model, input="More.", previous_response_id=first.id, max_output_tokens=16, temperature=0)
    assert a.id != b.id and a.output_text == b.output_text, (a, b)
    got = client.responses.retrieve(first.id)
    assert got.id == first.id and got.output_text == first.output_text, got
    for r in (first, a, b):
        client.responses.delete(r.id)
    try:
        client.responses.retrieve(first.id)
        raise AssertionError("a deleted response was retrieved")
    except openai.NotFoundError:
        pass


if __name__ == "__main__":
    sys.exit(main())
