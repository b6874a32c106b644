"""The official `openai` client against `performer serve`: a non-streaming and a streaming
greedy completion must both return exactly the text `performer generate` printed for the same
request (passed in a file). Usage: openai_client.py BASE_URL EXPECTED_TEXT_FILE PROMPT MAX_TOKENS
"""

import sys

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

    try:
        client.completions.create(model=model, prompt=prompt, max_tokens=1, temperature=-1)
        raise AssertionError("a negative temperature was accepted")
    except openai.BadRequestError as e:
        assert e.status_code == 400

    print(f"openai client: ok ({len(expected)} bytes, streaming and not)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
